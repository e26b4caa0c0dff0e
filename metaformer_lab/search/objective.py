"""One trial of a search, as named steps: decode -> latency -> reject over budget -> build -> evaluate -> record.

What a trial leaves in storage (``trial.user_attrs``): ``spec`` (the YAML), ``spec_name``, ``params``,
``flops``, ``latency_ms`` with ``latency_source`` / ``latency_label``, ``budget_ms``, ``worker`` (host and
pid of the process that evaluated it), and ``score`` with the evaluator's metrics; a trial that did not
finish says why in ``reason``:

- rejected before any evaluation, state PRUNED with a violated constraint (so TPE and NSGA-II steer away):
  ``invalid`` (the point gives no valid spec; ``detail`` has the issue), ``over_budget``; a reference point
  over budget is scored all the same (state COMPLETE, constraint violated: never best, never on the front),
  so the plot shows where the hand-designed models sit;
- stopped by the pruner: ``pruned`` (state PRUNED, constraints satisfied);
- failed, state FAIL: ``nan_loss``, ``out_of_memory``, or another evaluation failure.

The budget is a hard constraint through ``trial.set_constraint`` (Optuna 5): ``latency`` is
``latency_ms - budget_ms`` and ``valid`` is 1 for an invalid point, 0 otherwise.

The steps are shared by both backends: :class:`Screening` runs where the sampler is (the Optuna process, or
Ray's driver), :func:`evaluate_candidate` where the trial runs (the same process, or a Ray worker).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.sizes import format_bytes
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.cost import graph_cost, memory_need
from metaformer_lab.latency.lease import host_lease
from metaformer_lab.latency.source import Latency, LatencySource
from metaformer_lab.search.config import SearchConfig
from metaformer_lab.search.datasets import Dataset
from metaformer_lab.search.evaluators import EvalResult, EvaluationFailed, Evaluator, MemoryLimitExceeded
from metaformer_lab.search.latency import margin
from metaformer_lab.search.memory import held_bytes, release, step_limit
from metaformer_lab.search.study import Outcome
from metaformer_lab.space import InvalidPoint, SearchSpace, decode_point
from metaformer_lab.space.decode import Point
from metaformer_lab.spec.load import dump_spec

INVALID_PENALTY = 1.0


class Rejected(optuna.TrialPruned):
    """A candidate turned away before evaluation (an outcome, not an error)."""


@dataclass
class Screening:
    """The steps before evaluation: decode -> latency -> reject over budget -> record size. Both backends run
    them where the sampler lives (the Optuna process, Ray's driver); ``trial`` only needs Optuna's trial API."""

    space: SearchSpace
    config: SearchConfig
    source: LatencySource

    @property
    def budget_ms(self) -> float:
        return self.config.budget_ms

    @functools.cached_property
    def margin(self) -> float:
        """The budget margin (a fraction): a candidate is within budget when latency x (1 + margin) is."""
        return margin(self.config, self.source).fraction

    @property
    def multi(self) -> bool:
        return self.config.objectives == "score,latency"

    def __call__(self, trial: optuna.Trial) -> tuple[Point, Latency]:
        """The candidate and its latency; raises :class:`Rejected` (reason recorded) for one not to evaluate.

        Each path sets the trial's two constraints once: ``valid`` (0, or a penalty for a point that cannot
        be evaluated) and ``latency`` (latency x (1 + margin) - budget)."""
        trial.set_user_attr("budget_ms", self.budget_ms)
        point = self.decode(trial)
        measured = self.source.kind == "measured"
        if measured:  # timing builds the candidate: make sure it fits first
            self.check_memory(trial, point, latency_ms=None)
        latency = self.latency(trial, point)
        trial.set_user_attr("spec_name", point.spec.name)
        trial.set_user_attr("spec", dump_spec(point.spec))
        over = latency.ms * (1 + self.margin) - self.budget_ms
        if over > 0:
            trial.set_constraint("valid", 0.0)
            trial.set_constraint("latency", over)
            margin = f" + {self.margin:.1%} margin" if self.margin else ""
            detail = f"{latency.ms:.3f} ms{margin} > budget {self.budget_ms:g} ms"
            if not is_reference(trial):  # rejected before the per-node costs, which the decision does not need
                self.reject(trial, Outcome.OVER_BUDGET, detail)
            # a hand-designed reference is scored anyway, to show where it sits; it stays infeasible
            trial.set_user_attr("reason", Outcome.OVER_BUDGET.value)
            trial.set_user_attr("detail", detail + " (a reference: scored, never chosen)")
        else:
            if not measured:
                self.check_memory(trial, point, latency_ms=latency.ms)
            trial.set_constraint("valid", 0.0)
            trial.set_constraint("latency", over)
        self.record_size(trial, point)
        return point, latency

    def check_memory(self, trial: optuna.Trial, point: Point, *, latency_ms: float | None) -> None:
        """Reject, before it is built, a candidate whose weights alone exceed what a trial may allocate
        (``max_memory``, or the default share of what is free): building it would exhaust the machine.
        Activations are the evaluator's concern (it fits its batch under the same limit)."""
        device = "cuda" if self.config.device.startswith("cuda") else "cpu"
        limit = step_limit(self.config.max_memory_bytes, device)
        need = memory_need(point.graph, self.config.batch_size)
        if need.params_bytes > limit:
            part, _ = need.dominant
            trial.set_constraint("valid", INVALID_PENALTY)  # infeasible, as an invalid point is
            trial.set_constraint("latency", 0.0 if latency_ms is None else
                                 latency_ms * (1 + self.margin) - self.budget_ms)
            self.reject(trial, Outcome.OUT_OF_MEMORY,
                        f"{part}: its weights alone need {format_bytes(need.params_bytes)}, more than the "
                        f"{format_bytes(limit)} a trial may allocate (--max-memory)")

    def decode(self, trial: optuna.Trial) -> Point:
        try:
            return decode_point(self.space, trial)
        except InvalidPoint as err:
            trial.set_constraint("valid", INVALID_PENALTY)
            trial.set_constraint("latency", 0.0)
            self.reject(trial, Outcome.INVALID, str(err.issues[0]))
        raise AssertionError("unreachable")  # reject() raises

    def latency(self, trial: optuna.Trial, point: Point) -> Latency:
        latency = self.source.latency(point.graph)
        for key, value in latency.attrs().items():
            trial.set_user_attr(key, value)
        return latency

    def record_size(self, trial: optuna.Trial, point: Point) -> None:
        cost = graph_cost(point.graph)
        trial.set_user_attr("params", cost.params)
        trial.set_user_attr("flops", cost.flops)

    @staticmethod
    def reject(trial: optuna.Trial, reason: Outcome, detail: str) -> None:
        trial.set_user_attr("reason", reason.value)
        trial.set_user_attr("detail", detail)
        raise Rejected(f"{reason}: {detail}")

    def prunable(self, trial: optuna.Trial) -> bool:
        """Whether the trial's epochs go to the pruner: single-objective studies only (Optuna reports
        intermediate values for those alone), and not a reference scored over budget, so that within-budget
        candidates are judged against their own kind."""
        return not self.multi and trial.user_attrs.get("reason") != Outcome.OVER_BUDGET


def is_reference(trial: optuna.Trial) -> bool:
    return bool(trial.user_attrs.get("reference"))


class Failure(Exception):
    """An evaluation that ended without a score, with the ``reason`` and ``detail`` a trial records."""

    def __init__(self, reason: Outcome, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def evaluate_candidate(graph: ArchGraph, evaluator: Evaluator, data: Dataset, *, seed: int, device: str,
                       report: Callable[[int, float], None] | None, max_memory: int | None = None) -> EvalResult:
    """Build the candidate with weights drawn from ``seed`` and score it; both backends' evaluation.

    ``max_memory`` caps what this process may hold (what it holds already counts; None: the default share of
    what is free now, :func:`.memory.step_limit`); the evaluator fits its step under what is left, or fails
    with ``out_of_memory`` before allocating. Raises :class:`Failure` for a candidate that could not be scored
    (``nan_loss``, ``out_of_memory``, ...); whatever ``report`` raises goes through."""
    with torch.random.fork_rng():  # a candidate's score depends on its architecture and the seed alone
        torch.manual_seed(seed)
        net = compile_graph(graph)
    limit = step_limit(max_memory, device)
    limited = dataclasses.replace(evaluator, max_memory=limit)  # type: ignore[type-var]
    try:
        with host_lease("compute"):  # a latency measurement on this host waits until no trial computes
            return limited.evaluate(net, data, report=report, seed=seed, device=device)
    except MemoryLimitExceeded as err:
        if max_memory is None:
            left = f"the {format_bytes(limit)} allowed (a share of the memory free now; --max-memory sets it)"
        else:
            held = f"the process holds {format_bytes(held_bytes(device))}"
            left = (f"the {format_bytes(limit)} left of --max-memory {format_bytes(max_memory)} ({held})"
                    if limit > 1 else f"--max-memory {format_bytes(max_memory)} allows ({held} already)")
        raise Failure(err.reason, f"{err.what} needs {err.estimate.describe()}, more than {left}") from err
    except EvaluationFailed as err:
        raise Failure(err.reason, str(err)) from err
    except torch.OutOfMemoryError as err:
        raise Failure(Outcome.OUT_OF_MEMORY, str(err).splitlines()[0] if str(err) else "out of memory") from err
    finally:
        del net
        release(device)  # the next candidate starts from the same footprint, whatever this one's peak


def record_result(trial: optuna.Trial | optuna.trial.FrozenTrial, result: EvalResult) -> None:
    trial.set_user_attr("score", result.score)
    trial.set_user_attr("metrics", {k: float(v) for k, v in result.metrics.items()})
    trial.set_user_attr("eval_seconds", result.seconds)


@dataclass
class Objective:
    """The callable ``study.optimize`` runs: screening, then evaluation in the same process."""

    space: SearchSpace
    config: SearchConfig
    data: Dataset
    evaluator: Evaluator
    source: LatencySource
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.screen = Screening(self.space, self.config, self.source)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})  # which process ran it
        point, latency = self.screen(trial)
        report = self.reporter(trial) if self.screen.prunable(trial) else None
        try:
            result = evaluate_candidate(point.graph, self.evaluator, self.data, seed=self.config.seed,
                                        device=self.device, report=report, max_memory=self.config.max_memory_bytes)
        except Failure as err:
            trial.set_user_attr("reason", err.reason.value)
            trial.set_user_attr("detail", err.detail)
            raise
        record_result(trial, result)
        return (result.score, latency.ms) if self.screen.multi else result.score

    @staticmethod
    def reporter(trial: optuna.Trial) -> Callable[[int, float], None]:
        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("reason", Outcome.PRUNED.value)
                trial.set_user_attr("detail", f"stopped by the pruner after epoch {epoch} at {value:.4f}")
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        return report


def attrs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return dict(trial.user_attrs)
