"""Imports point one way only (docs/architecture.md, "Layers"), and only the CLI prints, exits or uses typer/rich."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import metaformer_lab

PACKAGE = Path(__file__).resolve().parents[1] / "metaformer_lab"
LAYERS = ["core", "ops", "spec", "graph", "compile", "zoo", "space", "latency", "search", "summary", "export", "api",
          "timm_models", "cli"]
FILES = sorted(PACKAGE.rglob("*.py"))
ROOT_OWN = {"__version__"}  # defined in the root itself, not re-exported from a layer


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "metaformer_lab":
        raise ValueError(module)
    if len(parts) == 1:
        return len(LAYERS)  # the package root re-exports the API
    return LAYERS.index(parts[1])


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Imported module names, leaving out `if TYPE_CHECKING:` blocks.

    ``from metaformer_lab import name`` counts as an import of the module that defines ``name`` (the root
    resolves its public names lazily from there), so it is held to that module's layer; names the root
    defines itself (``__version__``) import nothing else and are left out. A bare ``import metaformer_lab``
    counts as the root, the top layer.
    """
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "metaformer_lab" and node.level == 0:
            names.extend(metaformer_lab._EXPORTS.get(alias.name, "metaformer_lab") for alias in node.names
                         if alias.name not in ROOT_OWN)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    own = _layer(_module_name(path))
    tree = ast.parse(path.read_text())
    upward = [m for m in _runtime_imports(tree) if _in_package(m) and _layer(m) > own]
    assert not upward, f"{path.name} imports a higher layer: {upward}"


def _in_package(module: str) -> bool:
    return module == "metaformer_lab" or module.startswith("metaformer_lab.")


def test_the_root_imports_nothing_of_the_package_at_runtime() -> None:
    """Every layer may take ``__version__`` from the root only because the root loads no layer itself (no cycle)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [m for m in _runtime_imports(tree) if _in_package(m)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_cli_prints_or_exits(path: Path) -> None:
    if "cli" in path.relative_to(PACKAGE).parts:
        return
    tree = ast.parse(path.read_text())
    imports = _runtime_imports(tree)
    assert not [m for m in imports if m.split(".")[0] in ("typer", "rich", "click")]
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert not [f for f in calls if isinstance(f, ast.Name) and f.id in ("print", "exit", "quit")]
    assert not [f for f in calls if isinstance(f, ast.Attribute) and f.attr == "exit"
                and isinstance(f.value, ast.Name) and f.value.id == "sys"]


def test_no_import_circle_between_modules() -> None:
    """No module imports another that imports it back, counting imports inside functions (a circle hidden in a
    function still ties both modules to each other's insides)."""
    import networkx as nx

    modules = {_module_name(path): path for path in FILES}
    graph = nx.DiGraph()
    for name, path in modules.items():
        for imported in _runtime_imports(ast.parse(path.read_text())):
            target = next((m for m in (imported, imported.rsplit(".", 1)[0]) if m in modules), None)
            if target is not None and target != name and target != "metaformer_lab":
                graph.add_edge(name, target)
    circles = sorted(sorted(c) for c in nx.simple_cycles(graph))
    assert not circles, f"import circles: {circles}"
