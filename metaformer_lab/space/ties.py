"""Ties between stages, and the rule that one parameter name means one distribution.

``share`` ties are name aliases: the choice at ``stages[k].<path>`` (and every choice nested in its
options, whose names start with it) takes the name of the first listed stage's choice, so a sampler
sees one parameter. ``non_decreasing`` ties are constraints checked on each decoded point.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from metaformer_lab.core.errors import Issue
from metaformer_lab.space.schema import SearchSpace, TieSpec
from metaformer_lab.space.tree import VARIANT, Choice, Template, all_choices, show_label


def tie_stages(tie: TieSpec, count: int) -> list[int]:
    return list(range(count)) if tie.stages == "all" else list(tie.stages)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith((prefix + ".", prefix + "["))


def _rename(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, Choice):
        name = node.name
        for old, new in renames.items():
            if _under(name, old):
                name = new + name[len(old):]
                break
        return replace(node, name=name, options=tuple(_rename(o, renames) for o in node.options))
    if isinstance(node, dict):
        return {k: _rename(v, renames) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename(v, renames) for v in node]
    return node


def _stage_has_field(stage: Any, field: str) -> bool:
    if not isinstance(stage, dict):
        return False
    if field in stage:
        return True
    variant = stage.get(VARIANT)
    return isinstance(variant, Choice) and all(isinstance(o, dict) and field in o for o in variant.options)


def _check_stages(k: int, tie: TieSpec, count: int) -> list[Issue]:
    if tie.stages == "all":
        return [] if count >= 2 else [Issue(f"ties[{k}].stages", "a tie needs at least two stages")]
    issues = []
    for j, i in enumerate(tie.stages):
        if i >= count:
            issues.append(Issue(f"ties[{k}].stages[{j}]", f"stage {i} does not exist; the space has {count} "
                                                         f"stage(s), 0..{count - 1}"))
    return issues


def apply_ties(space: SearchSpace) -> tuple[SearchSpace, list[Issue]]:
    """The space with its ``share`` ties applied as renames, and the problems of every tie."""
    issues: list[Issue] = []
    renames: dict[str, str] = {}
    count = space.max_stages
    names = {c.name for c in all_choices(space.template)}
    for k, tie in enumerate(space.ties):
        if (tie.share is None) == (tie.non_decreasing is None):
            issues.append(Issue(f"ties[{k}]", "give exactly one of share, non_decreasing"))
            continue
        stage_issues = _check_stages(k, tie, count)
        issues += stage_issues
        if stage_issues:
            continue
        stages = tie_stages(tie, count)
        if tie.share is not None:
            issues += _share(k, tie.share, stages, names, renames)
        else:
            field = tie.non_decreasing.split(".")[0]  # type: ignore[union-attr]
            for i in stages:
                if not _stage_has_field(space.template.stages[i], field):
                    issues.append(Issue(f"ties[{k}].non_decreasing", f"stage {i} has no field '{field}'"))
    template = space.template
    if renames:
        template = Template(parts=_rename(dict(template.parts), renames),
                            stages=tuple(_rename(s, renames) for s in template.stages),
                            num_stages=template.num_stages)
    return replace(space, template=template), issues


def _share(k: int, rel: str, stages: list[int], names: set[str], renames: dict[str, str]) -> list[Issue]:
    issues = []
    first = f"stages[{stages[0]}].{rel}"
    for i in stages:
        own = f"stages[{i}].{rel}"
        if own not in names:
            local = sorted(n.removeprefix(f"stages[{i}].") for n in names if n.startswith(f"stages[{i}]."))
            close = difflib.get_close_matches(rel, local, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            issues.append(Issue(f"ties[{k}].share", f"stage {i} has no choice '{rel}'{hint}"))
        elif own != first:
            renames[own] = first
    return issues


def distribution_issues(choices: Iterable[Choice]) -> list[Issue]:
    """One name, one distribution: choices that share a name (a tie or an explicit ``name``) must offer
    the same values."""
    first: dict[str, Choice] = {}
    issues = []
    for choice in choices:
        seen = first.setdefault(choice.name, choice)
        if seen is not choice and not seen.same_distribution(choice):
            issues.append(Issue(choice.path, f"is parameter '{choice.name}' like {seen.path}, but offers "
                                             f"{choice.describe()} instead of {seen.describe()}"))
    return issues


def constraint_issues(space: SearchSpace, data: dict[str, Any]) -> list[Issue]:
    """The ``non_decreasing`` ties a decoded point breaks."""
    stages = data.get("stages", [])
    issues = []
    for k, tie in enumerate(space.ties):
        if tie.non_decreasing is None:
            continue
        field = tie.non_decreasing
        present = [i for i in tie_stages(tie, space.max_stages) if i < len(stages)]
        for a, b in zip(present, present[1:], strict=False):
            x, y = stages[a].get(field), stages[b].get(field)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y < x:
                issues.append(Issue(f"stages[{b}].{field}", f"{show_label(y)} is below stages[{a}].{field} "
                                                            f"{show_label(x)}, but ties[{k}] says {field} must "
                                                            "not decrease"))
    return issues
