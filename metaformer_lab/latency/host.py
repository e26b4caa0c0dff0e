"""Fitting a shipped CPU profile to the host it runs on: a few check networks measured, one scale fitted.

Machines of one kind are not one machine. A profile calibrated on one 2-core instance predicted the
networks of another 1.3-2x too slow (same CPU name, same torch, both quiet): instances differ in clock,
cache and what the hypervisor gives them. A profile's ranking carries over (Spearman 0.98 there), its
scale does not. So before a profile is trusted on a host, :func:`check_host` measures a handful of
networks (interleaved, the profile's p10 statistic), predicts them, and fits one factor,
``measured / predicted`` (the median over the networks); :meth:`HostCheck.apply` returns the profile
with that factor, which :func:`~metaformer_lab.latency.predict.predict` applies and reports. The spread
of the ratios says how far one factor can go: a wide spread means the host differs in kind, and
``latency calibrate`` on it is the cure (the check says so).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from metaformer_lab.core.errors import LatencyError, MetaformerLabError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.latency.interleave import measure_interleaved
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import Profile
from metaformer_lab.latency.target import cpu_name
from metaformer_lab.space import SearchSpace, load_space, sample

HOST_SEED = 9_000
"""The seed of the check networks sampled from a space (no calibration or evaluation uses it)."""
CHECK_NETWORKS = 8
WIDE_SPREAD = 0.25
"""Ratios whose interquartile range exceeds this share of their median: one factor cannot fit the host."""


@dataclass(frozen=True)
class HostCheck:
    """How a profile's predictions compare with this host's measurements.

    Attributes:
        profile: the profile's name.
        scale: median of ``measured / predicted`` over the check networks; predictions are multiplied by it.
        ratios: each network's ``measured / predicted``, sorted.
        seconds: wall time of the check.
        host: this host's CPU model.
        made_on: the CPU model the profile was made on.
    """

    profile: str
    scale: float
    ratios: list[float] = field(default_factory=list)
    seconds: float = 0.0
    host: str = ""
    made_on: str = ""

    @property
    def foreign(self) -> bool:
        """The profile was made on another CPU model than this host's."""
        return bool(self.made_on) and self.made_on != self.host

    @property
    def spread(self) -> float:
        """Interquartile range of the ratios, relative to their median."""
        if len(self.ratios) < 4:
            return 0.0
        q = statistics.quantiles(self.ratios, n=4)
        return (q[2] - q[0]) / self.scale

    @property
    def wide(self) -> bool:
        return self.spread > WIDE_SPREAD

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with this host's factor (a copy; the file is not touched)."""
        return replace(profile, host_scale=self.scale, host_check=self.to_json())

    def describe(self) -> str:
        made = f" (made on {self.made_on}; this host: {self.host})" if self.foreign else ""
        text = (f"host check: profile '{self.profile}'{made} rescaled x{self.scale:.2f} to this host from "
                f"{len(self.ratios)} networks (ratio spread {self.spread:.0%})")
        if self.wide:
            text += "; this host differs from the profile's in kind, run `latency calibrate` on it"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "scale": self.scale, "ratios": self.ratios, "spread": self.spread,
                "networks": len(self.ratios), "seconds": self.seconds, "host": self.host,
                "made_on": self.made_on}


def check_host(profile: Profile, graphs: Sequence[ArchGraph], *, time_per_model_s: float = 0.4) -> HostCheck:
    """Measure ``graphs`` at the profile's setting and fit the host's factor (see the module docstring).

    Raises:
        LatencyError: not a CPU profile, or no graph given.
    """
    if profile.target.kind != "cpu":
        raise LatencyError.single("--profile", f"a host check measures on the CPU; '{profile.name}' is a "
                                               f"{profile.target.device} profile")
    if not graphs:
        raise LatencyError.single("--profile", "a host check needs at least one network")
    start = time.perf_counter()
    raw = replace(profile, host_scale=1.0)
    results = measure_interleaved(graphs, profile.target, time_per_item_s=time_per_model_s)
    predicted = [predict(g, raw).ms for g in graphs]
    ratios = sorted(r.p10_ms / p for p, r in zip(predicted, results, strict=True) if p > 0)
    if not ratios:
        raise LatencyError.single("--profile", f"profile '{profile.name}' predicts no time for the check networks")
    return HostCheck(profile.name, statistics.median(ratios), ratios, time.perf_counter() - start, cpu_name(),
                     profile.target.device_name or "")


def fit_to_host(profile: Profile, space: SearchSpace | None = None, *,
                n: int = CHECK_NETWORKS) -> tuple[Profile, HostCheck | None, str]:
    """``profile`` rescaled to this host from ``n`` networks of ``space`` (default: the space the profile was
    calibrated on), with the check and a line saying what was done. A profile that is not for the CPU, or
    whose space cannot be loaded, comes back as it was."""
    if profile.target.kind != "cpu":
        return profile, None, f"no host check: '{profile.name}' is a {profile.target.device} profile"
    if space is None:
        name = profile.fit.get("calibration", {}).get("space")
        try:
            space = load_space(str(name)) if name else None
        except MetaformerLabError:
            space = None
        if space is None:
            return profile, None, f"no host check: the space profile '{profile.name}' was calibrated on is not here"
    graphs = [p.graph for p in sample(space, n, seed=HOST_SEED).points]
    check = check_host(profile, graphs)
    return check.apply(profile), check, check.describe()
