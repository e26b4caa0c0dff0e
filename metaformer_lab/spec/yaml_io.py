"""Safe YAML in and out.

Read with a safe loader only: no Python tags (never constructed), duplicate keys are errors, aliases
cannot expand a document past :data:`MAX_NODES`, files must be UTF-8 text of at most
:data:`MAX_BYTES`. Every problem is a :class:`SpecError` issue ``file:line:col: message``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from metaformer_lab.core.errors import SpecError

MAX_BYTES = 1 << 20
MAX_NODES = 100_000

_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """A safe constructor that refuses duplicate keys and reports where."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let the base class report it
                break
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_LIBYAML: type | None = getattr(yaml, "CSafeLoader", None)  # None: PyYAML built without libyaml


class _Loader(_NoDuplicateKeys, _LIBYAML or yaml.SafeLoader):  # type: ignore[misc]
    """The safe loader on libyaml's parser where PyYAML has it (several times faster)."""


class _ExplainingLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """The pure-Python safe loader: it re-reads a document the fast one rejects, since its messages are more
    precise (``found character '\\t' that cannot start any token``)."""


for _cls in (_Loader, _ExplainingLoader):
    # YAML 1.1 (PyYAML) reads 1e-6 as a string; accept exponent floats without a dot, as YAML 1.2 does.
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _expanded_size(node: Node, memo: dict[int, int], depth: int = 0) -> int:
    """Node count with every alias expanded, computed without expanding (memo per node)."""
    if id(node) in memo:
        return memo[id(node)]
    if depth > 200:
        raise yaml.YAMLError("nesting deeper than 200 levels")
    size = 1
    if isinstance(node, SequenceNode):
        size += sum(_expanded_size(child, memo, depth + 1) for child in node.value)
    elif isinstance(node, MappingNode):
        size += sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    memo[id(node)] = size
    return size


def _where(origin: str, mark: Any) -> str:
    return f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin


def parse_yaml(text: str, origin: str = "<string>") -> Any:
    """Parse one YAML document safely; raises SpecError."""
    try:
        return _parse(_Loader, text, origin)
    except SpecError:
        if _LIBYAML is None:
            raise
    return _parse(_ExplainingLoader, text, origin)  # the same verdict, in PyYAML's words


def _parse(loader_class: type[yaml.SafeLoader], text: str, origin: str) -> Any:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError.single(origin, "the document is empty")
        if _expanded_size(node, {}) > MAX_NODES:
            raise SpecError.single(origin, f"aliases expand the document past {MAX_NODES} nodes")
        return loader.construct_document(node)
    except ConstructorError as err:
        raise SpecError.single(_where(origin, err.problem_mark), _constructor_message(err)) from None
    except yaml.MarkedYAMLError as err:
        problem = ", ".join(p for p in (err.context, err.problem) if p) or "cannot be parsed"
        raise SpecError.single(_where(origin, err.problem_mark), f"invalid YAML: {problem.rstrip('.')}") from None
    except yaml.YAMLError as err:
        raise SpecError.single(origin, f"invalid YAML: {err}") from None
    except RecursionError:
        raise SpecError.single(origin, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _constructor_message(err: ConstructorError) -> str:
    problem = err.problem or "cannot be read"
    tag = re.search(r"tag '([^']+)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        if "python" in name:
            return f"tag '{name}' is not allowed (Python objects are never constructed)"
        return f"tag '{name}' is not allowed"
    return problem


def read_text(path: Path) -> str:
    """The UTF-8 text of a spec file; raises SpecError naming the path."""
    where = str(path)
    if not path.exists():
        raise SpecError.single(where, "no such file")
    if path.is_dir():
        raise SpecError.single(where, "is a directory, not a YAML file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise SpecError.single(where, f"cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_BYTES:
        raise SpecError.single(where, f"is larger than {MAX_BYTES // 1024} KiB")
    if b"\x00" in raw:
        raise SpecError.single(where, "is a binary file, not YAML text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError.single(where, f"is not UTF-8 text (byte {err.start})") from None


def load_yaml_file(path: Path) -> Any:
    return parse_yaml(read_text(path), str(path))


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
