"""Measuring many networks at once, interleaved: robust numbers on a machine whose speed wanders.

On a shared host the speed of one CPU thread changes from second to second (seen here: the median of a
32x32 network over one-second windows moves between 7 and 12 ms while nothing else runs in the VM), so
two one-shot medians of the same network can differ by 20-50 %. Interleaving spreads every network's
runs over the same long window, in short bursts taken in turn, so all of them see the same mix of
fast and slow spells; the 10th percentile of those runs then repeats within a few percent from one
measurement to the next (the median does not). Latency profiles are fitted to, and evaluated
against, this statistic (``p10_ms``); the median and p90 are reported with it.

Comparing two networks, :func:`paired_ratio` goes one step further: every round times each network in a burst
next to the others', so the ratio of two networks within one round is taken at one speed of the machine, and the
median of those ratios over the rounds is steadier still than the ratio of two medians (each of which saw its own
mix of slow spells: a 0.3-0.7 s network gets only 8-20 runs in a bounded benchmark).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from metaformer_lab.core.errors import LatencyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.latency.load import contention, cpu_snapshot, neighbour_load
from metaformer_lab.latency.measure import (
    LatencyResult,
    TimingPlan,
    cpu_timer,
    module_and_shape,
    prepare,
    provenance,
    timing_plan,
    warm_up,
)
from metaformer_lab.latency.stats import summarize
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.spec.load import SpecSource


def measure_interleaved(items: Sequence[nn.Module | ArchGraph | SpecSource], target: LatencyTarget, *,
                        time_per_item_s: float = 2.0, burst_s: float = 0.02, min_runs: int = 30,
                        max_time_per_item_s: float = 20.0, max_cv: float = 0.5,
                        progress: Callable[[int, int], None] | None = None) -> list[LatencyResult]:
    """CPU latency of every item at ``target`` (a CPU target; each item at its own input size unless the
    target sets one), measured in turns (see the module docstring).

    Each item runs bursts of ``burst_s`` (at least one forward) in round-robin order until it has
    ``min_runs`` runs and ``time_per_item_s`` seconds of them, or ``max_time_per_item_s``. A result is
    ``noisy`` when other processes took the cores it needed during the window, or when its spread is
    beyond ``max_cv`` (a cv of 0.2-0.3 is ordinary here; the p10 copes with it).
    """
    if target.kind != "cpu":
        raise LatencyError.single("device", f"interleaved measurement is for the CPU, not {target.device}")
    plan = timing_plan(target, min_runs=min_runs, max_runs=1_000_000, min_time_s=time_per_item_s,
                       max_time_s=max_time_per_item_s, max_warmup_s=2.0, max_cv=max_cv, retries=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.inference_mode():
            runs, shapes = _runners(items, plan)
            samples, rounds, load = _rounds(runs, plan, time_per_item_s, burst_s, min_runs, max_time_per_item_s,
                                            progress)
    finally:
        torch.set_num_threads(previous)
    contended = contention(load, plan.threads, plan.tolerance) if load is not None else None
    return [_result(s, r, shape, plan, load, contended) for s, r, shape in zip(samples, rounds, shapes, strict=True)]


def paired_ratio(result: LatencyResult, reference: LatencyResult) -> float:
    """``result`` / ``reference`` of two networks measured together by :func:`measure_interleaved`: the median
    over the rounds that timed both of (mean of ``result``'s runs in the round) / (mean of ``reference``'s). Each
    round's ratio compares bursts taken next to each other, so a drift of the machine's speed cancels out."""
    mine, theirs = _round_means(result), _round_means(reference)
    shared = sorted(mine.keys() & theirs.keys())
    if not shared:
        raise ValueError("the two results share no round: not measured together by measure_interleaved")
    return statistics.median(mine[r] / theirs[r] for r in shared)


def _round_means(result: LatencyResult) -> dict[int, float]:
    if len(result.sample_rounds) != len(result.samples_ms):
        raise ValueError("the result does not record its rounds: not measured by measure_interleaved")
    by_round: defaultdict[int, list[float]] = defaultdict(list)
    for ms, r in zip(result.samples_ms, result.sample_rounds, strict=True):
        by_round[r].append(ms)
    return {r: statistics.fmean(v) for r, v in by_round.items()}


def _runners(items: Sequence[Any], plan: TimingPlan) -> tuple[list[Callable[[], float]], list[tuple[int, ...]]]:
    runs, shapes = [], []
    for item in items:
        module, shape, owned = module_and_shape(item, plan.target)
        fn, x = prepare(module, shape, plan, owned=owned)
        run = cpu_timer(fn, x)
        warm_up(run, plan.max_warmup_s)
        runs.append(run)
        shapes.append(shape)
    return runs, shapes


def _rounds(runs: Sequence[Callable[[], float]], plan: TimingPlan, want_s: float, burst_s: float, min_runs: int,
            max_s: float, progress: Callable[[int, int], None] | None
            ) -> tuple[list[list[float]], list[list[int]], Any]:
    samples: list[list[float]] = [[] for _ in runs]
    rounds: list[list[int]] = [[] for _ in runs]  # the round of each sample
    round_no = 0
    spent = [0.0] * len(runs)
    active = set(range(len(runs)))
    start = cpu_snapshot()
    while active:
        for i in sorted(active):
            t0 = time.perf_counter()
            while True:
                samples[i].append(runs[i]())
                rounds[i].append(round_no)
                if time.perf_counter() - t0 >= burst_s:
                    break
            spent[i] += time.perf_counter() - t0
            if (len(samples[i]) >= min_runs and spent[i] >= want_s) or spent[i] >= max_s:
                active.discard(i)
                if progress is not None:
                    progress(len(runs) - len(active), len(runs))
        round_no += 1
    end = cpu_snapshot()
    load = neighbour_load(start, end) if start is not None and end is not None else None
    return samples, rounds, load


def _result(samples: list[float], rounds: list[int], shape: tuple[int, ...], plan: TimingPlan, load: Any,
            contended: str | None) -> LatencyResult:
    stats = summarize(samples)
    reasons = [r for r in (contended,) if r]
    if stats.cv > plan.max_cv:
        reasons.append(f"cv {stats.cv:.2f} > {plan.max_cv:.2f}")
    return LatencyResult(median_ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, mean_ms=stats.mean_ms,
                         cv=stats.cv, runs=stats.runs, attempts=1, warmup_runs=0, noisy=bool(reasons),
                         noise_reasons=tuple(reasons), neighbour_load=load.load if load else None,
                         neighbour_cores=load.cores if load else None,
                         provenance=provenance(plan.target, shape),
                         samples_ms=tuple(samples), sample_rounds=tuple(rounds))
