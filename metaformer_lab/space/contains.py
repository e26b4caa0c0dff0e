"""Is a spec a point of a space? Find the assignment that decodes to it exactly, or the choice that excludes it.

The template is expanded against the target spec with backtracking: a range or a choice of scalars takes
the target's value at that location (when allowed), a choice of mappings tries each option, and every
expanded value is compared with the target's value at its location (validated with the target's own
type, so defaults left out compare equal). The first complete expansion that validates to the target
(name and description aside) gives the assignment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from metaformer_lab.core.errors import SpecError
from metaformer_lab.space.decode import point_name
from metaformer_lab.space.schema import SearchSpace
from metaformer_lab.space.ties import constraint_issues
from metaformer_lab.space.tree import ROOT_ORDER, Choice, Decision, State, expand_root, show_label
from metaformer_lab.spec.arch import (
    INHERITED_BLOCK_FIELDS,
    ArchSpec,
    BlockSpec,
    FirstThenCycleSpec,
    StageSpec,
    StepSpec,
    inherit_fields,
    map_blocks,
)
from metaformer_lab.spec.load import compact, read_spec, spec_to_dict
from metaformer_lab.spec.yaml_io import dump_yaml

_SEG = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
MISSING = object()
MAX_CANDIDATES = 1000


def value_at(obj: Any, loc: str) -> Any:
    """The target's value at spec location ``loc`` (MISSING when it has none); a single block in a path
    stands for a block list of one."""
    for name, index in _SEG.findall(loc):
        if name:
            if isinstance(obj, list):
                if len(obj) != 1:
                    return MISSING
                obj = obj[0]
            if isinstance(obj, dict):  # a block's steps, by name
                obj = obj.get(name, MISSING)
                if obj is MISSING:
                    return MISSING
                continue
            if not (isinstance(obj, BaseModel) and name in type(obj).model_fields):
                return MISSING
            obj = getattr(obj, name)
        else:
            if not (isinstance(obj, list) and int(index) < len(obj)):
                return MISSING
            obj = obj[int(index)]
    return obj


def _same_scalar(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass
class _Miss:
    progress: int
    loc: str
    message: str
    decisions: tuple[Decision, ...]


def _rank(loc: str) -> tuple[int, int]:
    """Where a location comes in the spec's decision order (the stem before stage 0 before stage 1 ...)."""
    head = _SEG.findall(loc)
    first = head[0][0] if head else ""
    order = ROOT_ORDER.index(first) if first in ROOT_ORDER else -1
    stage = int(head[1][1]) if first == "stages" and len(head) > 1 and head[1][1] else -1
    return order, stage


def _under(loc: str, prefix: str) -> bool:
    return loc == prefix or loc.startswith((prefix + ".", prefix + "["))


@dataclass
class _Matcher:
    target: ArchSpec
    misses: list[_Miss] = field(default_factory=list)
    options: dict[str, Choice] = field(default_factory=dict)  # location -> a choice of mappings tried there

    def inherited(self) -> dict[str, Any]:
        defaults = self.target.defaults
        return {k: _plain(getattr(defaults, k)) for k in INHERITED_BLOCK_FIELDS}

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        want = value_at(self.target, loc) if loc != "num_stages" else len(self.target.stages)
        scalar = all(not isinstance(o, (dict, list, Choice)) for o in choice.options)
        if choice.kind != "categorical":
            found = [want] if want is not MISSING and choice.contains(want) else []
        elif scalar:
            found = [lb for lb, o in zip(choice.labels, choice.options, strict=True) if _same_scalar(o, want)]
        else:
            self.options.setdefault(loc, choice)
            return list(choice.labels)
        if not found:
            has = "no such field" if want is MISSING else _describe(want)
            self.miss(state, loc, f"the spec has {has}; the space offers {choice.describe()}")
        return found

    def accept(self, loc: str, value: Any, state: State) -> bool:
        if loc in ("", "stages", "num_stages"):  # the stage count was matched when it was chosen
            return True
        want = value_at(self.target, loc)
        if want is MISSING:
            self.miss(state, loc, "the spec has no such field")
            return False
        ok, why = self.agrees(loc, value, want)
        if not ok:
            self.miss(state, loc, why)
        return ok

    def agrees(self, loc: str, value: Any, want: Any) -> tuple[bool, str]:
        if isinstance(want, dict):  # a block's steps: each by name
            if not isinstance(value, dict) or list(value) != list(want):
                return False, f"the spec has steps {list(want)}; the space gives {_describe(value)}"
            for key, item in value.items():
                ok, why = self.agrees(f"{loc}.{key}", item, want[key])
                if not ok:
                    return ok, f"{key}: {why}"
            return True, ""
        if isinstance(want, BaseModel) or (isinstance(want, list) and want and isinstance(want[0], BaseModel)):
            got = self.normalise(loc, value, want)
            if got is None:
                return False, f"the spec has {_describe(want)}; the space gives {_describe(value)}"
            return (got == want), _difference(want, got)
        if isinstance(want, list):
            same = isinstance(value, list) and len(value) == len(want) and all(map(_same_scalar, value, want))
            return same, f"the spec has {_describe(want)}; the space gives {_describe(value)}"
        return _same_scalar(value, want), f"the spec has {_describe(want)}; the space gives {_describe(value)}"

    def normalise(self, loc: str, value: Any, want: Any) -> Any:
        """``value`` validated as the target's type at ``loc`` (blocks with the inherited defaults)."""
        try:
            if isinstance(want, list):  # a block list (a single block stands for a list of one) or branches
                items = value if isinstance(value, list) else [value]
                if len(items) != len(want):
                    return None
                return [self.normalise(loc, v, w) for v, w in zip(items, want, strict=True)]
            def inherit(block: Any, _path: str) -> Any:
                return inherit_fields(block, self.inherited())

            if isinstance(want, BlockSpec) and isinstance(value, dict):
                value = inherit(value, "")
            if isinstance(want, FirstThenCycleSpec) and isinstance(value, dict):
                value = map_blocks(value, "", inherit)
            if isinstance(want, StageSpec) and isinstance(value, dict):
                value = {**value, "block": map_blocks(value.get("block"), "", inherit)}
            if isinstance(want, StepSpec) and isinstance(value, dict):  # the fields it leaves out: its block's
                block = value_at(self.target, loc.rpartition(".steps.")[0])
                block = block[0] if isinstance(block, list) and len(block) == 1 else block
                if isinstance(block, BlockSpec):
                    value = {**{k: _plain(getattr(block, k)) for k in INHERITED_BLOCK_FIELDS}, **value}
            return type(want).model_validate(value)
        except (ValidationError, TypeError, ValueError):
            return None

    def miss(self, state: State, loc: str, message: str) -> None:
        self.misses.append(_Miss(len(state.decisions), loc, message, state.decisions))

    def explanation(self) -> tuple[str, str]:
        if not self.misses:
            return "", "no point of the space gives this spec"
        # the miss furthest into the spec explains best (the parts before it matched); then the one after most
        # decisions, the deepest, and one that is not a different op type (the option whose op matched came closest)
        best = max(self.misses, key=lambda m: (_rank(m.loc), m.progress, m.loc.count(".") + m.loc.count("["),
                                               not m.loc.endswith(".type")))
        taken = [d for d in best.decisions if d.loc in self.options and _under(best.loc, d.loc)]
        if not taken:
            return best.loc, best.message
        outer = taken[0]
        choice = self.options[outer.loc]
        rel = best.loc[len(outer.loc):].lstrip(".")
        where = f"{rel}: " if rel else ""
        return outer.loc, (f"no option of the space fits ({choice.describe()}); the closest, "
                           f"'{show_label(outer.value)}', differs at {where}{best.message}")


def _plain(value: Any) -> Any:
    return value.model_dump(mode="python") if isinstance(value, BaseModel) else value


def _describe(value: Any) -> str:
    if value is MISSING:
        return "nothing"
    if isinstance(value, BaseModel):
        value = spec_to_dict(value) if isinstance(value, ArchSpec) else compact(value)
    if isinstance(value, list):
        value = [compact(v) if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, (dict, list)):
        text = dump_yaml(value).strip() if not isinstance(value, dict) else _flow(value)
        return text if len(text) <= 160 else text[:157] + "..."
    return show_label(value) if not isinstance(value, str) else f"'{value}'"


def _flow(value: dict[str, Any]) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _difference(want: Any, got: Any) -> str:
    """The first field in which two specs differ, in words."""
    if isinstance(want, list) and isinstance(got, list):
        for k, (w, g) in enumerate(zip(want, got, strict=True)):
            if w != g:
                return f"[{k}]: " + _difference(w, g)
    if isinstance(want, BaseModel) and isinstance(got, BaseModel) and type(want) is type(got):
        for name in type(want).model_fields:
            w, g = getattr(want, name), getattr(got, name)
            if w != g:
                if isinstance(w, BaseModel) and isinstance(g, BaseModel) and type(w) is type(g):
                    return f"{name}.{_difference(w, g)}"
                return f"{name}: the spec has {_describe(w)}; the space gives {_describe(g)}"
    return f"the spec has {_describe(want)}; the space gives {_describe(got)}"


@dataclass(frozen=True)
class Containment:
    """The answer of :func:`contains`: the assignment (None when the spec is not a point) or why not."""

    params: Mapping[str, Any] | None
    path: str = ""
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.params is not None


def contains(space: SearchSpace, spec: ArchSpec) -> Containment:
    """The assignment of ``space`` that decodes exactly to ``spec`` (name and description aside), or where
    the space excludes it."""
    matcher = _Matcher(spec)
    for k, (data, state) in enumerate(expand_root(space.template, matcher)):
        if k >= MAX_CANDIDATES:
            break
        if _decodes_to(space, data, state, spec):
            return Containment(dict(state.params))
    path, reason = matcher.explanation()
    return Containment(None, path, reason)


def _decodes_to(space: SearchSpace, data: dict[str, Any], state: State, spec: ArchSpec) -> bool:
    data = {"name": point_name(space, state.params), **data}
    if constraint_issues(space, data):
        return False
    try:
        got = read_spec(data, block_dirs=space.block_dirs)
    except SpecError:
        return False
    return got.model_copy(update={"name": spec.name, "description": spec.description}) == spec
