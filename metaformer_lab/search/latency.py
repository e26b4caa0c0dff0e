"""A search's latency: the config's :class:`~metaformer_lab.latency.target.LatencyTarget` answered by one
:class:`~metaformer_lab.latency.source.LatencySource` (predicted, measured or estimated; see there), and the
safety margin on the budget that the source's measured error calls for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metaformer_lab.latency.gpu_calibrate import gpu_profile_for
from metaformer_lab.latency.source import LatencySource
from metaformer_lab.search.config import SearchConfig


@dataclass(frozen=True)
class Margin:
    """The safety margin on the budget (a fraction of the latency) and why it is what it is."""

    fraction: float
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "why": self.why}


def latency_source(config: SearchConfig, input_size: tuple[int, int]) -> LatencySource:
    """The source that gives every candidate of a search its latency (the driver's and the workers' alike)."""
    return LatencySource(config.latency_target(input_size), profile=config.profile, host_check=config.host_check)


def margin(config: SearchConfig, source: LatencySource) -> Margin:
    """The budget margin the config asks for (``budget_margin``): none for measured latencies; ``auto``: the
    source's measured error on networks (or GPUs) its factors were not fitted on."""
    setting = config.budget_margin
    if setting is None:
        return Margin(0.0, "none (--budget-margin not given)")
    if source.kind == "measured":
        return Margin(0.0, "none: every candidate's latency is measured")
    if setting != "auto":
        return Margin(config.margin_fraction or 0.0, f"--budget-margin {setting}")
    if source.gpu is not None:
        profile = gpu_profile_for(source.gpu, source.target.dtype)
        error = None if profile is None else profile.held_out_error()
        if error is None:
            return Margin(0.0, "none: an uncalibrated estimate has no measured error to derive it from; "
                               "give --budget-margin PCT")
        return Margin(error[0], f"auto: the {error[1]}")
    assert source.profile is not None
    mape = source.profile.accuracy.get("mape")
    if mape is None:
        return Margin(0.0, f"none: profile '{source.profile.name}' records no measured error "
                           "(latency evaluate --record)")
    return Margin(float(mape), f"auto: the error of profile '{source.profile.name}' on networks it was not "
                               "calibrated on (latency evaluate)")
