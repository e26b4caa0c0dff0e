"""The command line starts at once: ``--help``, ``--version``, ``zoo list`` and checking a spec (``validate``,
``space size``) import neither torch nor timm, and ``space size`` not even networkx.

Each check runs in a fresh interpreter, since this test process has long since imported both. The root
package resolves its public names lazily; its ``TYPE_CHECKING`` imports and its lookup table must agree.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "metaformer_lab.compile")  # the compiler: only commands that build need it
PROBE = """
import json, sys
from metaformer_lab.cli import main
heavy = json.loads(sys.argv[2])
sys.argv = ["metaformer-lab", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as stop:
    code = stop.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": sorted(m for m in heavy if m in sys.modules)}), file=sys.stderr)
"""


def _heavy_imports(*args: str, heavy: tuple[str, ...] = HEAVY) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(heavy)], capture_output=True,
                          text=True, timeout=120, check=False)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    return result["code"], result["heavy"]


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("space", "--help"), ("latency", "--help"),
                                  ("zoo", "list"), ("zoo", "list", "--family", "vit", "--json")], ids=" ".join)
def test_help_version_and_zoo_list_import_neither_torch_nor_timm(args: tuple[str, ...]) -> None:
    assert _heavy_imports(*args) == (0, [])


def test_importing_the_package_imports_neither_torch_nor_timm() -> None:
    probe = f"import sys, metaformer_lab, metaformer_lab.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


LAZY_PACKAGES = {"metaformer_lab": ["__version__"], "metaformer_lab.zoo": []}  # package -> names it defines itself


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_names_match_the_type_checking_imports(package: str) -> None:
    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__ or "").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    declared = {alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert declared == module._EXPORTS
    assert sorted(module.__all__) == sorted([*module._EXPORTS, *LAZY_PACKAGES[package]])


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_public_name_resolves_and_is_listed(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None and not inspect.ismodule(value), name  # a function, never its module's namesake
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_caformer.yaml"


@pytest.mark.parametrize("args", [("validate", str(EXAMPLE)), ("space", "size", "tiny", "--samples", "50")],
                         ids=["validate", "space"])
def test_checking_a_spec_imports_neither_torch_nor_timm(args: tuple[str, ...]) -> None:
    """The op files read without torch (``core.lazy_torch``); timm and the compiler come only with a module."""
    assert _heavy_imports(*args) == (0, [])


def test_counting_valid_points_builds_no_graph() -> None:
    """``space size`` checks shapes on the lowering's records; the networkx graph (and networkx) is not needed."""
    assert _heavy_imports("space", "size", "tiny", "--samples", "50", heavy=(*HEAVY, "networkx")) == (0, [])
