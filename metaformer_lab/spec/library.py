"""The block library described from its registries: every op's role, tag, one-line description and
fields. ``metaformer-lab ops`` prints it and the README's op table is generated from it, so the docs
list exactly the ops there are."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import Act
from metaformer_lab.spec.arch import TokenMixerSpec  # its import resolves the composites' forward references

_NAMED_LITERALS = {typing.get_args(Act): "activation"}


@dataclass(frozen=True)
class FieldRow:
    name: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class OpRow:
    role: str
    tag: str
    description: str
    fields: tuple[FieldRow, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _role_of_union(members: set[Any]) -> str | None:
    for role, registry in REGISTRIES.items():
        if members and members <= set(registry.specs()):
            return role
    return None


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type (``int``, ``'avg' | 'max'``, ``list[token_mixer]``, ``norm``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return _NAMED_LITERALS.get(args) or " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        members = {a for a in args if a is not type(None)}
        role = _role_of_union(members)
        name = role if role is not None else " | ".join(type_name(a) for a in args if a is not type(None))
        return f"{name} | None" if type(None) in args else name
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        role = _role_of_union({annotation})
        return role if role is not None else annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "required"
        if field.default_factory_takes_validated_data:
            return "from other fields"
        value = field.default_factory()
        return f"{{type: {value.type}}}" if isinstance(value, BaseModel) and hasattr(value, "type") else repr(value)
    if isinstance(field.default, BaseModel):
        return f"{{type: {getattr(field.default, 'type', '...')}}}"
    return "null" if field.default is None else repr(field.default)


def first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses and code."""
    depth, code = 0, False
    for i, ch in enumerate(text):
        if ch == "`":
            code = not code
        elif not code and ch in "([":
            depth += 1
        elif not code and ch in ")]":
            depth -= 1
        elif ch == "." and not code and depth == 0 and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[: i + 1]
    return text


def op_rows(role: str | None = None) -> list[OpRow]:
    """Every op of ``role`` (all roles when None), in registry order."""
    rows = []
    for name, registry in REGISTRIES.items():
        if role is not None and name != role:
            continue
        for op in registry:
            fields = tuple(FieldRow(f, type_name(info.annotation), _default(info), info.description or "")
                           for f, info in op.spec.model_fields.items() if f != "type")
            rows.append(OpRow(name, op.tag, first_sentence(op.description), fields))
    return rows


def markdown_table() -> str:
    """The README's op table: one row per op, its role, tag and description."""
    lines = ["| role | type | what it is |", "|---|---|---|"]
    for row in op_rows():
        lines.append(f"| {REGISTRIES[row.role].kind} | `{row.tag}` | {row.description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


__all__ = ["FieldRow", "OpRow", "TokenMixerSpec", "markdown_table", "op_rows", "type_name"]
