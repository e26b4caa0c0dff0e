"""Turn pydantic's validation errors into ``path: message`` issues in the user's terms.

pydantic's ``loc`` names union tags and union members (``('stem', 'conv', 'kernel')``,
``('input', 'size', 'constrained-int')``); the path shown is the path in the user's YAML, found by
walking the input data alongside the ``loc``.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel, Tag, ValidationError

from metaformer_lab.core.errors import Issue


def show(value: Any) -> str:
    """A value as the user wrote it, without Python reprs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"'{value[:40]}...'" if len(value) > 40 else f"'{value}'"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _walk(loc: Sequence[int | str], data: Any, error_type: str) -> tuple[str, Any, bool]:
    """(user path, the input value there, whether the loc went through a union member)."""
    path, cur, in_union = "", data, False
    for i, seg in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(seg, int):
            if isinstance(cur, list):
                path, cur = f"{path}[{seg}]", cur[seg] if seg < len(cur) else None
            elif seg != 0:  # index 0 of a single item a validator wrapped into a list: not shown
                path, cur = f"{path}[{seg}]", None
            continue
        if isinstance(cur, dict) and seg in cur:
            path, cur = f"{path}.{seg}" if path else seg, cur[seg]
        elif isinstance(cur, dict) and cur.get("type") == seg:
            continue  # the tag of a tagged union
        elif error_type == "missing" and last:
            path, cur = f"{path}.{seg}" if path else seg, None
        else:
            in_union = True  # a union member's name, such as 'int' or 'list[constrained-int]'
    return path, cur, in_union


@dataclass(frozen=True)
class _Tagged:
    """A union member that a callable discriminator names by ``tag`` (pydantic puts the tag in the loc)."""

    tag: str
    members: tuple[Any, ...]


def _members(annotation: Any) -> list[Any]:
    tag = None
    while typing.get_origin(annotation) is typing.Annotated:
        tag = next((m.tag for m in annotation.__metadata__ if isinstance(m, Tag)), tag)
        annotation = typing.get_args(annotation)[0]
    if tag is not None:
        return [_Tagged(tag, tuple(_members(annotation)))]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        out = []
        for arg in typing.get_args(annotation):
            out.extend(_members(arg))
        return out
    return [annotation]


def types_at(root: type[BaseModel], loc: Sequence[int | str]) -> list[Any]:
    """The candidate types at ``loc`` (a union tag in the loc selects one member)."""
    candidates: list[Any] = [root]
    for seg in loc:
        nxt: list[Any] = []
        for cand in candidates:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                if isinstance(seg, str) and seg in cand.model_fields:
                    nxt.extend(_members(cand.model_fields[seg].annotation))
                elif _tag(cand) == seg:
                    nxt.append(cand)
            elif typing.get_origin(cand) is list and isinstance(seg, int):
                nxt.extend(_members(typing.get_args(cand)[0]))
            elif typing.get_origin(cand) is dict and isinstance(seg, str):  # a block's steps, by name
                nxt.extend(_members(typing.get_args(cand)[1]))
            elif isinstance(cand, _Tagged) and cand.tag == seg:
                nxt.extend(cand.members)
        if not nxt:
            return []
        tagged = [c for c in nxt if _tag(c) == seg]
        candidates = tagged or nxt
    return candidates


def _tag(cls: Any) -> str | None:
    if isinstance(cls, type) and issubclass(cls, BaseModel) and "type" in cls.model_fields:
        default = cls.model_fields["type"].default
        return default if isinstance(default, str) else None
    return None


def model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class the ``loc`` points into (used to list allowed fields)."""
    models = [c for c in types_at(root, loc) if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None


def _tags(root: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    return [t for t in (_tag(c) for c in types_at(root, loc)) if t is not None]


def _message(err: dict[str, Any], value: Any, root: type[BaseModel]) -> tuple[str, str]:
    """(suffix added to the path, message)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    loc = err["loc"]
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        allowed = _tags(root, loc)
        close = difflib.get_close_matches(tag, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; one of: {', '.join(allowed)}"
        return ".type", f"unknown '{tag}'{hint}"
    if kind == "union_tag_not_found":
        return ".type", f"is required; one of: {', '.join(_tags(root, loc))}"
    if kind == "extra_forbidden":
        model = model_at(root, loc[:-1])
        allowed = [f for f in model.model_fields if f != "type"] if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return "", f"unknown field{hint}"
    return "", _plain_message(kind, ctx, value, err["msg"])


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "null",
}


def _plain_message(kind: str, ctx: dict[str, Any], value: Any, msg: str) -> str:
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {show(value)}"
    if kind == "missing":
        return "is required"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        return f"{show(value)} must be {op} {show(ctx.get(key))}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"allows at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "literal_error":
        return f"{show(value)} is not one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"{show(value)} may contain only letters, digits, '_', '-' and '.'"
    if kind in ("string_too_short", "string_too_long"):
        return f"{show(value)} must have {'at least' if kind.endswith('short') else 'at most'} " \
               f"{ctx.get('min_length', ctx.get('max_length'))} characters"
    if kind == "finite_number":
        return f"{show(value)} must be a finite number"
    text = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return text[:1].lower() + text[1:]


def issues_from(err: ValidationError, data: Any, root: type[BaseModel]) -> list[Issue]:
    """Every error of ``err`` as an Issue; alternatives of one union field are merged into one line."""
    merged: dict[str, list[str]] = {}
    union_paths: set[str] = set()
    for e in err.errors(include_url=False):
        path, value, in_union = _walk(e["loc"], data, e["type"])
        suffix, message = _message(dict(e), value, root)
        messages = merged.setdefault(path + suffix, [])
        if message not in messages:
            messages.append(message)
        if in_union:
            union_paths.add(path + suffix)
    for path in union_paths:
        merged[path] = _merge_union(merged[path])
    return [Issue(path, m) for path, ms in merged.items() for m in ms]


def _merge_union(messages: list[str]) -> list[str]:
    """One line for the alternatives of a union field: a member whose type matched explains best
    ('100000 must be <= 4096'); else 'expected an integer or a list, got x'."""
    specific = [m for m in messages if not m.startswith("expected ")]
    if specific:
        return specific
    kinds = [m.removeprefix("expected ").rpartition(", got ")[0] for m in messages]
    got = messages[0].rpartition(", got ")[2]
    return [f"expected {' or '.join(kinds)}, got {got}"]
