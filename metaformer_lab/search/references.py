"""The space's references (hand-designed models) in a search: placed by latency, scored when near the budget.

References show where the known models sit; they are never the user's trials. So:

- they never count towards ``trials`` (:func:`~metaformer_lab.search.run.finished` leaves them out);
- each one's latency is found first (screening alone: decode -> latency -> size, nothing built);
- a reference within :data:`NEAR_BUDGET` budgets is queued before the searched trials, nearest the budget
  first, and scored like any candidate (over budget it stays infeasible: never best, never on the front);
- one further over is *placed*: recorded from its latency alone (state PRUNED, reason ``over_budget``,
  no score), so the plot and the summary show it without evaluating it; with ``score_references`` it is
  scored after the searched trials instead.

Screening a reference runs in a throwaway in-memory study, so the real study receives either a queued
trial or a finished one, never a half-made one.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from metaformer_lab.search.objective import Rejected, Screening

if TYPE_CHECKING:
    from metaformer_lab.search.study import Search

NEAR_BUDGET = 1.25
"""References at most this many budgets slow are scored during the search; slower ones are placed."""

PLACED = "placed"
"""User attribute of a reference recorded from its latency alone."""
SCORE_LATER = "score_later"
"""User attribute of a reference queued after the searched trials (``score_references``)."""


@dataclass
class ReferencePlan:
    """What happens to each of the space's references in this run."""

    scored: list[str] = field(default_factory=list)
    """Queued before the searched trials, nearest the budget first."""
    placed: list[str] = field(default_factory=list)
    """Recorded from their latency alone."""
    later: list[str] = field(default_factory=list)
    """Far over the budget, scored after the searched trials (``score_references``)."""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


def nearness(latency_ms: float, budget_ms: float) -> float:
    """How far a latency is from the budget, either way (0 on it): ``|log(latency / budget)|``."""
    return abs(math.log(max(latency_ms, 1e-9) / budget_ms))


def _screen(screening: Screening, name: str, params: dict[str, Any]) -> FrozenTrial:
    """The reference screened in a throwaway study: its params with their distributions, latency and size."""
    scratch = optuna.create_study(directions=["maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        scratch.enqueue_trial(dict(params), user_attrs={"reference": name})
        trial = scratch.ask()
        with contextlib.suppress(Rejected):  # an invalid reference point: recorded as such
            screening(trial)
        scratch.tell(trial, state=TrialState.PRUNED)
    return scratch.trials[0]


def plan_references(study: optuna.Study, screening: Screening, *, score_later: bool) -> ReferencePlan:
    """Screen the references the study has not seen; queue the near ones, place (or defer) the far ones.

    A reference counts as seen when the study has a trial for it that is queued, running, scored, or placed
    (a placed one is scored after all when ``score_later`` asks for it)."""
    plan = ReferencePlan()
    space = screening.space
    seen: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("reference"):
            seen.setdefault(t.user_attrs["reference"], []).append(t)
    budget = screening.budget_ms
    near: list[tuple[float, str, dict[str, Any]]] = []
    for name, params in space.references.items():
        plan.params[name] = dict(params)
        trials = seen.get(name, [])
        if trials:  # scored, queued, running, failed, or placed earlier (scored now if asked)
            if score_later and all(t.user_attrs.get(PLACED) for t in trials):
                plan.later.append(name)
            continue
        screened = _screen(screening, name, params)
        latency = screened.user_attrs.get("latency_ms")
        if latency is None:  # invalid: record it as it is
            _add(study, screened, screened.user_attrs.get("detail", ""), placed=False)
            continue
        if latency <= NEAR_BUDGET * budget:
            near.append((nearness(latency, budget), name, dict(params)))
        elif score_later:
            plan.later.append(name)
        else:
            _add(study, screened, f"{latency:.3f} ms > {NEAR_BUDGET:g} x budget {budget:g} ms (a reference: placed "
                                  "from its latency alone; --score-references scores it after the search)", placed=True)
            plan.placed.append(name)
    for _, name, params in sorted(near):
        _enqueue(study, name, params)
        plan.scored.append(name)
    return plan


def queue_later(study: optuna.Study, plan: ReferencePlan) -> int:
    """Queue the references kept for after the searched trials; returns how many."""
    for name in plan.later:
        _enqueue(study, name, plan.params[name], later=True)
    return len(plan.later)


def _enqueue(study: optuna.Study, name: str, params: dict[str, Any], *, later: bool = False) -> None:
    attrs: dict[str, Any] = {"reference": name, **({SCORE_LATER: True} if later else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.enqueue_trial(params, user_attrs=attrs)


def _add(study: optuna.Study, screened: FrozenTrial, detail: str, *, placed: bool) -> None:
    attrs = {**screened.user_attrs, "detail": detail, **({PLACED: True} if placed else {})}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.PRUNED, params=screened.params, distributions=screened.distributions, user_attrs=attrs,
        constraints=screened.constraints))


def reference_counts(study: optuna.Study) -> dict[str, Any]:
    """How many references were scored and placed, and the rule that decided (for the summary)."""
    latest: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("reference"):
            latest[t.user_attrs["reference"]] = t
    scored = sorted(n for n, t in latest.items() if "score" in t.user_attrs)
    placed = sorted(n for n, t in latest.items() if t.user_attrs.get(PLACED))
    return {"scored": len(scored), "placed": len(placed), "scored_names": scored, "placed_names": placed,
            "why": f"references within {NEAR_BUDGET:g}x the budget are scored before the searched trials, nearest "
                   f"the budget first; those further over are placed from their latency alone (--score-references "
                   f"scores them after the searched trials); references never count towards --trials"}


def plan_for(search: Search) -> ReferencePlan:
    """Screen a prepared search's references and queue or place them; the plan is kept on the search."""
    plan = plan_references(search.study, Screening(search.space, search.config, search.source),
                           score_later=search.config.score_references)
    search.references = plan
    return plan
