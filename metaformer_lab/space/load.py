"""Loading a space: parse, apply ties, check every option against the spec schema, check the references.

Options are checked by *covering* instances: instance ``k`` takes option ``k mod n`` of every choice (the
low, high and middle of ranges), so every option of every choice is validated at least once with a few
instances in all. Schema problems (an unknown op, a field an op does not have, a value out of bounds)
do not depend on the other choices, so covering finds them all; shape problems do depend on them
(a head count against a width) and make a point invalid, not the space.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from metaformer_lab.core.errors import Issue, SpaceError, SpecError
from metaformer_lab.space.decode import InvalidPoint, finish, point_name
from metaformer_lab.space.schema import SearchSpace, parse_space, read_raw
from metaformer_lab.space.ties import apply_ties, distribution_issues
from metaformer_lab.space.tree import Choice, State, all_choices, expand_once, show_label
from metaformer_lab.spec.load import read_spec

MAX_COVER = 64

SpaceSource = SearchSpace | str | os.PathLike[str] | Mapping[str, Any]


class _Cover:
    """Instance ``k`` of the covering set."""

    def __init__(self, k: int) -> None:
        self.k = k

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        if loc == "num_stages":
            return [max(choice.values() or [1])]
        if choice.kind == "categorical":
            return [choice.labels[self.k % len(choice.labels)]]
        ends = [choice.low, choice.high, (choice.low + choice.high) / 2]
        value = ends[self.k % 3]
        if choice.kind == "int":
            step = int(choice.step or 1)
            return [int(choice.low) + (int(value) - int(choice.low)) // step * step]
        return [value]

    def accept(self, loc: str, value: Any, state: State) -> bool:
        return True


def _space_path(path: str, state: State) -> str:
    """A spec path of a covering instance -> the path in the space file (through the option taken there)."""
    best = ("", "")
    for loc, source in state.origins:
        if (path == loc or path.startswith((loc + ".", loc + "["))) and len(loc) > len(best[0]):
            best = (loc, source)
    loc, source = best
    return source + path[len(loc):] if loc else path


def schema_issues(space: SearchSpace) -> list[Issue]:
    """Problems of any option with the spec schema, at their paths in the space file."""
    choices = all_choices(space.template)
    count = max([len(c.labels) for c in choices if c.kind == "categorical"] + [3])
    issues: dict[Issue, None] = {}
    for k in range(min(count, MAX_COVER)):
        data, state = expand_once(space.template, _Cover(k))
        data = {"name": point_name(space, state.params), **data}
        try:
            read_spec(data, block_dirs=space.block_dirs)
        except SpecError as err:
            for issue in err.issues:
                issues[Issue(_space_path(issue.path, state), issue.message)] = None
    return list(issues)


class _Assignment:
    """Decodes a reference: values from the assignment, every problem recorded."""

    def __init__(self, ref: str, params: Mapping[str, Any]) -> None:
        self.ref, self.params = ref, params
        self.used: set[str] = set()
        self.issues: list[Issue] = []

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        where = f"references.{self.ref}"
        if choice.name not in self.params:
            self.issues.append(Issue(where, f"parameter '{choice.name}' is missing ({choice.describe()})"))
            return [choice.labels[0] if choice.kind == "categorical" else choice.low]
        value = self.params[choice.name]
        self.used.add(choice.name)
        if not choice.contains(value):
            self.issues.append(Issue(f"{where}.{choice.name}", f"{show_label(value)} is not {choice.describe()}"))
            return [choice.labels[0] if choice.kind == "categorical" else choice.low]
        return [value]

    def accept(self, loc: str, value: Any, state: State) -> bool:
        return True


def reference_issues(space: SearchSpace) -> list[Issue]:
    """Each reference must name exactly the parameters of its point, with allowed values, and decode."""
    issues: list[Issue] = []
    for ref, params in space.references.items():
        chooser = _Assignment(ref, params)
        data, state = expand_once(space.template, chooser)
        issues += chooser.issues
        for extra in sorted(set(params) - chooser.used):
            close = difflib.get_close_matches(extra, sorted(set(state.params) - chooser.used), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            issues.append(Issue(f"references.{ref}.{extra}", f"is not a parameter of this point{hint}"))
        if chooser.issues:
            continue
        try:
            finish(space, data, state)
        except InvalidPoint as err:
            issues += [Issue(f"references.{ref}", f"does not decode: {i}") for i in err.issues]
    return issues


def load_space(source: SpaceSource) -> SearchSpace:
    """A checked search space from a path, the name of a shipped space (``tiny``, ``metaformer``) or a mapping.

    Raises:
        SpaceError: listing every problem as ``path: message`` (paths in the space file).
    """
    if isinstance(source, SearchSpace):
        return source
    data, path = read_raw(source)
    space, issues = parse_space(data, path)
    if issues:
        raise SpaceError(issues)
    space, issues = apply_ties(space)
    issues += distribution_issues(all_choices(space.template))
    if issues:
        raise SpaceError(issues)
    issues = schema_issues(space)
    if issues:
        raise SpaceError(issues)
    issues = reference_issues(space)
    if issues:
        raise SpaceError(issues)
    return space
