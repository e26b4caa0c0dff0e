"""Where a latency number comes from: one :class:`LatencySource` per target, used alike by the command line,
the search (driver and Ray workers) and the finalists' re-measurement (docs/architecture.md, "Latency").

Given a :class:`~metaformer_lab.latency.target.LatencyTarget`, the source decides once how to answer:

- a GPU that is not here (``h100``, ``t4``, ...): **estimated** from its datasheet with the efficiency
  factors fitted on published measurements (that GPU's own, else pooled over the calibrated GPUs; see
  :mod:`.gpu_calibrate`), labelled by where they come from (``uncalibrated estimate`` where nothing was
  fitted for the dtype). Nothing can be measured then;
- a CPU (or CUDA) profile that matches the target (named, or ``auto``: a shipped one; one made on another
  CPU model only when the host check rescales it, :mod:`.host`): **predicted** from the graph, no module
  built;
- otherwise the device here: **measured**, taking turns with any trial that computes on this host
  (:mod:`.lease`): a measurement that could not get the host to itself is flagged, never used silently.

Every answer is a :class:`Latency`: the value, its kind, a label saying where it came from (``predicted
from profile P, x1.12 for this host``, ``estimated for H100 (fitted)``, ``measured``) and the full record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from metaformer_lab.core.errors import Issue, LatencyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.latency.gpu import Efficiency, GpuEstimate, KernelCache, estimate_gpu, estimate_label, gpu_spec
from metaformer_lab.latency.gpu_calibrate import gpu_efficiency, resolve_gpu_profile
from metaformer_lab.latency.host import HostCheck, fit_to_host
from metaformer_lab.latency.lease import host_lease
from metaformer_lab.latency.measure import LatencyResult, measure
from metaformer_lab.latency.predict import Prediction, predict
from metaformer_lab.latency.profile import Profile, match_profile, resolve_profile
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.space import SearchSpace
from metaformer_lab.spec.load import dump_spec

Kind = Literal["predicted", "measured", "estimated"]

LEASE_WAIT_S = 120.0
"""How long a measurement waits for sibling trials to stop computing before it goes ahead, flagged."""
SHARED_HOST = "other trials computed on this host while it was timed"


@dataclass(frozen=True)
class Latency:
    """One latency number: ``ms``, its ``kind`` (``predicted``, ``measured``, ``estimated``), a ``label`` for
    people, whether it is ``noisy`` (a measurement not to be trusted), and the full ``record`` it came from
    (a :class:`Prediction`, :class:`GpuEstimate` or :class:`LatencyResult`)."""

    ms: float
    kind: Kind
    label: str
    noisy: bool = False
    record: Prediction | GpuEstimate | LatencyResult | None = field(default=None, compare=False, repr=False)

    def attrs(self) -> dict[str, Any]:
        """What a search trial records about its latency."""
        return {"latency_ms": self.ms, "latency_source": self.kind, "latency_label": self.label,
                "latency_noisy": self.noisy}


class LatencySource:
    """Answers :meth:`latency` for one target (see the module docstring).

    Args:
        target: what the latency is for; a CPU target's ``device_name`` is this host's when not given.
        profile: a profile (file, shipped name, or :class:`Profile`) to predict from; ``auto``: the shipped
            one whose target matches, if any (else: measure); None: measure. For a GPU estimate, a GPU
            profile file or name instead of the shipped factors.
        host_check: rescale a CPU profile to this host from a few measured networks (:meth:`fit_host`);
            ``auto`` takes a profile made on another CPU model only with it.
    """

    def __init__(self, target: LatencyTarget, *, profile: str | Profile | None = "auto",
                 host_check: bool = True) -> None:
        self.target = target.here()
        self.host_check = host_check
        self.profile: Profile | None = None
        self.unmatched: tuple[Issue, ...] = ()  # why no shipped profile fits, when `auto` found none
        self.host: HostCheck | None = None
        self.gpu = gpu_spec(target.device) if self.target.kind == "gpu" else None
        self.efficiency = Efficiency()
        self.cache = KernelCache()
        self._memo: dict[str, Latency] = {}
        if self.gpu is not None and self.target.deploy:
            raise LatencyError.single("--deploy", f"GPU estimates are of the training form; measure the deploy "
                                                  f"form on the GPU itself, not as '{target.device}'")
        if self.gpu is not None:  # its own fitted factors, else pooled over the calibrated GPUs
            self.efficiency = resolve_gpu_profile(profile).efficiency if isinstance(profile, str) and \
                profile != "auto" else gpu_efficiency(self.gpu, self.target.dtype)
        elif profile == "auto":
            try:
                self.profile, _ = match_profile(self.target, adapt=host_check)
            except LatencyError as err:  # none fits: measure instead (and say why)
                self.unmatched = tuple(err.issues)
        elif profile is not None:
            self.profile = profile if isinstance(profile, Profile) else resolve_profile(profile)
            self._check_named(self.profile)

    def _check_named(self, profile: Profile) -> None:
        """A profile given by name must be for this target (its CPU model is the host check's business, its
        input size the predictor's)."""
        want = replace(self.target, device_name=None, input_size=None)
        differ = profile.target.mismatches(want)
        if differ:
            raise LatencyError([Issue("--profile", f"profile '{profile.name}' is for another setting: {d}")
                                for d in differ])

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def kind(self) -> Kind:
        if self.gpu is not None:
            return "estimated"
        return "predicted" if self.profile is not None else "measured"

    @property
    def can_measure(self) -> bool:
        """Whether the target's device is one this host can time (not a GPU estimate)."""
        return self.gpu is None

    def describe(self) -> str:
        """One line on where this source's numbers come from."""
        if self.gpu is not None:
            label = estimate_label(self.efficiency, self.gpu, self.target.dtype)[1]
            return f"{label} for {self.gpu.full_name} ({self.target.dtype}, batch {self.target.batch_size})"
        if self.profile is not None:
            return f"predicted from profile '{self.profile.name}'{self._host_text()}"
        t = self.target
        where = f"{t.threads} thread(s)" if t.kind == "cpu" else t.device
        return f"measured on {t.device} at {where} (no matching profile)"

    def _host_text(self) -> str:
        if self.host is None:
            return ""
        made = f" (made on {self.host.made_on})" if self.host.foreign else ""
        return f"{made}, rescaled x{self.host.scale:.2f} to this host"

    # -- set-up --------------------------------------------------------------------------------------
    def fit_host(self, space: SearchSpace | None = None) -> str | None:
        """Rescale a CPU profile to this host from networks of ``space`` (default: the space it was calibrated
        on) when ``host_check`` asks for it; the line saying what was done, None when nothing was to do."""
        if self.profile is None or not self.host_check or self.profile.target.kind != "cpu":
            return None
        self.profile, self.host, line = fit_to_host(self.profile, space)
        return line

    # -- answers ---------------------------------------------------------------------------------------
    def latency(self, graph: ArchGraph) -> Latency:
        """The graph's latency the way this source answers; a spec asked again gets the same answer."""
        key = dump_spec(graph.spec)
        if key not in self._memo:
            self._memo[key] = self._latency(graph)
        return self._memo[key]

    def _latency(self, graph: ArchGraph) -> Latency:
        if self.gpu is not None:
            return self.estimated(graph)
        if self.profile is not None:
            return self.predicted(graph)
        result = self.measure(graph)
        if SHARED_HOST in result.noise_reasons:  # kept, but flagged: the finalists are measured again alone
            return Latency(result.median_ms, "measured", "measured while other trials ran (not trusted)", True, result)
        return Latency(result.median_ms, "measured", "measured", result.noisy, result)

    def estimated(self, graph: ArchGraph) -> Latency:
        """The GPU estimate (a GPU target only)."""
        if self.gpu is None:
            raise LatencyError.single("device", f"'{self.target.device}' is not a GPU to estimate for")
        t = self.target
        est = estimate_gpu(graph, self.gpu, batch_size=t.batch_size, dtype=t.dtype, efficiency=self.efficiency,
                           cache=self.cache)
        return Latency(est.total_ms, "estimated", f"{est.label} ({self.gpu.name})", record=est)

    def predicted(self, graph: ArchGraph) -> Latency:
        """The prediction from the profile (rescaled to this host when the host check ran)."""
        if self.profile is None:
            raise LatencyError(self.unmatched or (Issue("--profile", "no profile to predict from"),))
        p = predict(graph, self.profile)
        return Latency(p.ms, "predicted", f"predicted from {self.profile.name}{self._host_text()}", record=p)

    def measure(self, graph: ArchGraph, *, min_time_s: float = 0.5) -> LatencyResult:
        """Time ``graph`` with the host to itself: it waits (up to :data:`LEASE_WAIT_S`) until no sibling trial
        computes (:mod:`.lease`); one that did not get the host is noisy, for :data:`SHARED_HOST`."""
        if self.gpu is not None:
            raise LatencyError.single("device", f"{self.gpu.full_name} is not here to measure on")
        with host_lease("measure", timeout_s=LEASE_WAIT_S) as lease:
            result = measure(graph, self.target.at(graph), min_time_s=min_time_s)
        if lease.held:
            return result
        return dataclasses.replace(result, noisy=True, noise_reasons=(*result.noise_reasons, SHARED_HOST))
