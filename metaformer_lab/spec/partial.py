"""A spec with schema problems, patched so that the shape rules can still check the rest of it.

``validate`` should list every problem in one run: a wrong field in the head must not hide a shape error in
stage 2. pydantic stops at the schema, so each of its errors is neutralised where that is safe for the
shapes:

- inside an op config (a stem, a token mixer, a composite's branch, ...): the config is replaced by a
  placeholder of its role, and its spec path is reported as *unknown*: the lowering skips that op's shape
  rule and passes its input type on when the op keeps the type (mixers, norms; known from its ``type``
  tag), else leaves what follows untyped and unchecked;
- an unknown field outside op configs: dropped (its value reached nothing);
- an invalid value in a field that no shape depends on (``name``, ``description``, drop path, layer and
  res scale init values): replaced by a neutral one.

Any other error (a stage's ``depth`` or ``dim``, the input size, a block without a token mixer) leaves no
spec to check, and only the schema problems are reported.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from metaformer_lab.core.registry import CompositeDef, Registry
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.issues import types_at

NEUTRAL = {"name": "spec", "description": "", "drop_path_rate": 0.0, "layer_scale": None, "res_scale": None}
"""Fields no shape rule reads -> the value that replaces an invalid one for the shape check."""

Key = str | int


@dataclass(frozen=True)
class PartialSpec:
    """``spec`` is the patched spec; ``unknown`` maps the spec path of each replaced op config to whether
    that op keeps its input type (see :func:`metaformer_lab.graph.lower.lower`)."""

    spec: ArchSpec
    unknown: dict[str, bool]


@dataclass
class _Region:
    path: str  # the op config's spec path, as the lowering writes it
    keys: tuple[Key, ...]  # where it sits in the data
    registry: Registry


def _role(candidates: Sequence[Any]) -> Registry | None:
    """The registry whose union the candidates are (a field typed by one role's union), or None."""
    candidates = [c for c in candidates if c is not type(None)]  # an optional op: null is allowed too
    classes = {c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)}
    if not classes or len(classes) != len(candidates):
        return None
    for registry in REGISTRIES.values():
        if classes <= set(registry.specs()):
            return registry
    return None


def _region(loc: Sequence[Key], data: Any, error_type: str) -> tuple[_Region | None, tuple[Key, ...], bool]:
    """The op config (a node of the graph) holding the error at ``loc``, the data keys the loc reaches, and
    whether the loc reached its last segment in the data. Op configs nested in a leaf op (a stem's norm) are
    part of it; a composite's branches are ops of their own."""
    cur, path, keys, region = data, "", (), None
    for i, seg in enumerate(loc):
        moved = False
        if isinstance(seg, int):
            if isinstance(cur, list) and seg < len(cur):
                cur, path, keys, moved = cur[seg], f"{path}[{seg}]", (*keys, seg), True
            elif isinstance(cur, list) or seg != 0:
                return region, keys, False
        elif isinstance(cur, dict) and (seg in cur or (error_type == "missing" and i == len(loc) - 1)):
            cur, path, keys, moved = cur.get(seg), f"{path}.{seg}" if path else seg, (*keys, seg), True
        if not moved:
            continue  # a union tag or member name: the data stays where it is
        registry = _role(types_at(ArchSpec, loc[: i + 1]))
        if registry is not None and (region is None or _in_branches(region, path)):
            region = _Region(path, keys, registry)
    return region, keys, True


def _in_branches(region: _Region, path: str) -> bool:
    """Whether ``path`` is a branch of the op at ``region`` (only composite mixers have ``branches``)."""
    return re.fullmatch(re.escape(region.path) + r"\.branches\[\d+\]", path) is not None


def _placeholder(registry: Registry) -> dict[str, Any]:
    """A valid config of the role: its first op's first example case."""
    opdef = next(iter(registry))
    return {"type": opdef.tag, **opdef.cases[0].config}


def _keeps_type(registry: Registry, value: Any) -> bool:
    tag = value.get("type") if isinstance(value, dict) else None
    if not isinstance(tag, str) or tag not in registry:
        return False
    opdef = registry.get(tag)
    return isinstance(opdef, CompositeDef) or opdef.preserves_type


def _at(data: Any, keys: Sequence[Key]) -> Any:
    for key in keys:
        data = data[key]
    return data


def partial_spec(data: dict[str, Any], err: ValidationError) -> PartialSpec | None:
    """``data`` (resolved, invalid as ``err`` says) patched for the shape check, or None where that is not
    safe (see the module docstring)."""
    patched = copy.deepcopy(data)
    regions: dict[tuple[Key, ...], _Region] = {}
    extras: list[tuple[Key, ...]] = []
    neutral: list[tuple[Key, ...]] = []
    for e in err.errors(include_url=False):
        region, keys, reached = _region(e["loc"], data, e["type"])
        if region is not None:
            regions[region.keys] = region
        elif reached and e["type"] == "extra_forbidden":
            extras.append(keys)
        elif reached and keys and keys[-1] in NEUTRAL:
            neutral.append(keys)
        else:
            return None
    unknown: dict[str, bool] = {}
    for keys, region in sorted(regions.items(), key=lambda kv: -len(kv[0])):  # inner first: branches, then ops
        unknown[region.path] = _keeps_type(region.registry, _at(data, keys) if _exists(data, keys) else None)
        _at(patched, keys[:-1])[keys[-1]] = _placeholder(region.registry)
    for keys in extras:
        if not any(keys[: len(k)] == k for k in regions):
            del _at(patched, keys[:-1])[keys[-1]]
    for keys in neutral:
        _at(patched, keys[:-1])[keys[-1]] = NEUTRAL[str(keys[-1])]
    try:
        return PartialSpec(ArchSpec.model_validate(patched), unknown)
    except (ValidationError, KeyError, IndexError, TypeError):
        return None


def _exists(data: Any, keys: Sequence[Key]) -> bool:
    try:
        _at(data, keys)
    except (KeyError, IndexError, TypeError):
        return False
    return True
