"""Statistics of timed runs: median, p10, p90, mean and coefficient of variation."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted ``ordered``."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class SampleStats:
    """Summary of one attempt's samples; ``cv`` = sample standard deviation / mean (0 for one run)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    runs: int


def summarize(samples_ms: Sequence[float]) -> SampleStats:
    """Median, p10, p90, mean and coefficient of variation of ``samples_ms`` (at least one sample)."""
    ordered = sorted(samples_ms)
    mean = statistics.fmean(ordered)
    std = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
    return SampleStats(median_ms=percentile(ordered, 0.5), p10_ms=percentile(ordered, 0.1),
                       p90_ms=percentile(ordered, 0.9), mean_ms=mean, cv=std / mean if mean > 0 else 0.0,
                       runs=len(ordered))
