"""Where a search's latency numbers come from, and what they are called.

- a CPU (or CUDA) profile that matches the target setting: **predicted** from the graph, no module built;
- no matching profile, the device here: **measured** (every candidate is built and timed);
- a GPU that is not here (``h100``, ``t4``, ...): an **estimate** from its datasheet with the efficiency
  factors fitted on published measurements (that GPU's own, else pooled over the calibrated GPUs; see
  :mod:`metaformer_lab.latency.gpu_calibrate`), labelled by where they come from (``uncalibrated estimate``
  where nothing was fitted for the dtype). Finalists cannot be re-measured then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.graph.lower import ArchGraph
from metaformer_lab.latency.gpu import Efficiency, KernelCache, estimate_gpu, estimate_label, gpu_spec
from metaformer_lab.latency.gpu_calibrate import gpu_efficiency, gpu_profile_for
from metaformer_lab.latency.host import CHECK_NETWORKS, HOST_SEED, HostCheck, check_host
from metaformer_lab.latency.lease import host_lease
from metaformer_lab.latency.measure import LatencyError, LatencyResult, cpu_name, measure
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import Profile, match_profile, resolve_profile
from metaformer_lab.search.config import SearchConfig
from metaformer_lab.space import SearchSpace, load_space, sample
from metaformer_lab.spec.load import dump_spec

Source = Literal["predicted", "measured", "estimated"]

LEASE_WAIT_S = 120.0
"""How long a measurement waits for sibling trials to stop computing before it goes ahead, flagged."""
SHARED_HOST = "other trials computed on this host while it was timed"


@dataclass(frozen=True)
class Margin:
    """The safety margin on the budget (a fraction of the latency) and why it is what it is."""

    fraction: float
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "why": self.why}


@dataclass(frozen=True)
class Latency:
    """One latency number with its kind (``predicted``, ``measured``, ``estimated``) and a label for people."""

    ms: float
    source: Source
    label: str
    noisy: bool = False

    def attrs(self) -> dict[str, Any]:
        return {"latency_ms": self.ms, "latency_source": self.source, "latency_label": self.label,
                "latency_noisy": self.noisy}


def _wanted(config: SearchConfig, size: tuple[int, int]) -> dict[str, Any]:
    return {"device": "cpu" if config.device == "cpu" else "cuda",
            "device_name": cpu_name() if config.device == "cpu" else None, "dtype": config.dtype,
            "batch_size": config.batch_size, "threads": config.threads if config.device == "cpu" else None,
            "input_size": size}


def fit_to_host(profile: Profile, space: SearchSpace | None = None, *,
                n: int = CHECK_NETWORKS) -> tuple[Profile, HostCheck | None, str]:
    """``profile`` rescaled to this host (:mod:`metaformer_lab.latency.host`) from ``n`` networks of ``space``
    (default: the space the profile was calibrated on), with the check and a line saying what was done.
    A profile that is not for the CPU, or whose space cannot be loaded, comes back as it was."""
    if profile.device != "cpu":
        return profile, None, f"no host check: '{profile.name}' is a {profile.device} profile"
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


class LatencyOracle:
    """Gives each candidate its latency the way the config asks (see the module docstring)."""

    def __init__(self, config: SearchConfig, input_size: tuple[int, int]) -> None:
        self.config = config
        self.gpu = gpu_spec(config.gpu_name) if config.gpu_name else None
        # a GPU's own fitted factors, else factors pooled over the calibrated GPUs (latency.gpu_calibrate)
        self.efficiency = gpu_efficiency(self.gpu, str(config.dtype)) if self.gpu is not None else Efficiency()
        self.profile: Profile | None = None
        self.cache = KernelCache()
        self.unmatched: tuple[str, ...] = ()  # why no shipped profile fits, when `auto` found none
        self.host: HostCheck | None = None
        self.memo: dict[str, Latency] = {}
        if self.gpu is None and config.profile is not None:
            if config.profile == "auto":
                try:  # one made on another CPU model only through the host check (fit_host)
                    self.profile, _ = match_profile(_wanted(config, input_size), adapt=config.host_check)
                except LatencyError as err:  # none fits: measure every candidate instead (and say why)
                    self.unmatched = tuple(i.message for i in err.issues)
            else:
                self.profile = resolve_profile(config.profile)

    def fit_host(self, space: SearchSpace) -> str | None:
        """Rescale the profile to this host from networks of the search's space (config ``host_check``)."""
        if self.profile is None or not self.config.host_check or self.profile.device != "cpu":
            return None
        self.profile, self.host, line = fit_to_host(self.profile, space)
        return line

    @property
    def source(self) -> Source:
        if self.gpu is not None:
            return "estimated"
        return "predicted" if self.profile is not None else "measured"

    def margin(self) -> Margin:
        """The budget margin the config asks for (``budget_margin``): none for measured latencies; ``auto``: the
        source's measured error on networks (or GPUs) its factors were not fitted on."""
        setting = self.config.budget_margin
        if setting is None:
            return Margin(0.0, "none (--budget-margin not given)")
        if self.source == "measured":
            return Margin(0.0, "none: every candidate's latency is measured")
        if setting != "auto":
            return Margin(self.config.margin_fraction or 0.0, f"--budget-margin {setting}")
        if self.gpu is not None:
            profile = gpu_profile_for(self.gpu, str(self.config.dtype))
            error = None if profile is None else profile.held_out_error()
            if error is None:
                return Margin(0.0, "none: an uncalibrated estimate has no measured error to derive it from; "
                                   "give --budget-margin PCT")
            return Margin(error[0], f"auto: the {error[1]}")
        assert self.profile is not None
        mape = self.profile.accuracy.get("mape")
        if mape is None:
            return Margin(0.0, f"none: profile '{self.profile.name}' records no measured error "
                               "(latency evaluate --record)")
        return Margin(float(mape), f"auto: the error of profile '{self.profile.name}' on networks it was not "
                                   "calibrated on (latency evaluate)")

    def describe(self) -> str:
        if self.gpu is not None:
            label = estimate_label(self.efficiency, self.gpu, str(self.config.dtype))[1]
            return f"{label} for {self.gpu.full_name} ({self.config.dtype}, batch {self.config.batch_size})"
        if self.profile is not None:
            host = ""
            if self.host is not None:
                made = f" (made on {self.host.made_on})" if self.host.foreign else ""
                host = f"{made}, rescaled x{self.host.scale:.2f} to this host"
            return f"predicted from profile '{self.profile.name}'{host}"
        where = f"{self.config.threads} thread(s)" if self.config.device == "cpu" else self.config.device
        return f"measured on {self.config.device} at {where} (no matching profile)"

    def __call__(self, graph: ArchGraph) -> Latency:
        """The candidate's latency; a spec asked again (a reference screened, then run) gets the same answer."""
        key = dump_spec(graph.spec)
        if key not in self.memo:
            self.memo[key] = self._latency(graph)
        return self.memo[key]

    def _latency(self, graph: ArchGraph) -> Latency:
        if self.gpu is not None:
            est = estimate_gpu(graph, self.gpu, batch_size=self.config.batch_size, dtype=self.config.dtype,
                               efficiency=self.efficiency, cache=self.cache)
            return Latency(est.total_ms, "estimated", f"{est.label} ({self.gpu.name})")
        if self.profile is not None:
            return Latency(predict(graph, self.profile).ms, "predicted", f"predicted from {self.profile.name}")
        result = self.measure(graph)
        if SHARED_HOST in result.noise_reasons:  # kept, but flagged: the finalists are measured again alone
            return Latency(result.median_ms, "measured", "measured while other trials ran (not trusted)", True)
        return Latency(result.median_ms, "measured", "measured", result.noisy)

    def measure(self, graph: ArchGraph, *, min_time_s: float = 0.5) -> LatencyResult:
        """Time ``graph`` with the host to itself: it waits (up to ``LEASE_WAIT_S``) until no sibling trial
        computes (:mod:`metaformer_lab.latency.lease`); one that did not get the host is noisy, for
        :data:`SHARED_HOST`."""
        with host_lease("measure", timeout_s=LEASE_WAIT_S) as lease:
            result = measure(graph, device=self.config.device, batch_size=self.config.batch_size,
                             dtype=self.config.dtype, threads=self.config.threads, min_time_s=min_time_s)
        if lease.held:
            return result
        return dataclasses.replace(result, noisy=True, noise_reasons=(*result.noise_reasons, SHARED_HOST))

    @property
    def can_measure(self) -> bool:
        return self.gpu is None
