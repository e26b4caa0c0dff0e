"""Latency: what a number is for (:mod:`.target`) and where it comes from (:mod:`.source`); trustworthy
measurement (:mod:`.measure`, with :mod:`.stats` and :mod:`.load`), profiles and the predictor (:mod:`.profile`,
:mod:`.predict`, built by :mod:`.calibrate`, checked by :mod:`.evaluate`, fitted to the host by
:mod:`.host`), and GPU estimates without a GPU (:mod:`.gpu`), calibrated on published benchmark tables
(:mod:`.gpu_calibrate`)."""

from __future__ import annotations

from metaformer_lab.core.errors import LatencyError
from metaformer_lab.latency.calibrate import calibrate_space
from metaformer_lab.latency.evaluate import Accuracy, evaluate
from metaformer_lab.latency.gpu import (
    GPUS,
    UNCALIBRATED,
    Efficiency,
    GpuEstimate,
    GpuSpec,
    estimate_gpu,
    fit_efficiency,
    gpu_spec,
)
from metaformer_lab.latency.gpu_calibrate import (
    GpuProfile,
    calibrate_from_table,
    gpu_efficiency,
    load_gpu_profile,
    shipped_gpu_profiles,
)
from metaformer_lab.latency.host import HostCheck, check_host
from metaformer_lab.latency.measure import LatencyResult, Provenance, measure, provenance
from metaformer_lab.latency.predict import Prediction, predict
from metaformer_lab.latency.profile import Profile, find_profile, load_profile, resolve_profile, shipped_profiles
from metaformer_lab.latency.source import Latency, LatencySource
from metaformer_lab.latency.target import LatencyTarget, cpu_name, parse_duration_ms

__all__ = [
    "GPUS", "UNCALIBRATED", "Accuracy", "Efficiency", "GpuEstimate", "GpuProfile", "GpuSpec", "HostCheck",
    "Latency", "LatencyError", "LatencyResult", "LatencySource", "LatencyTarget", "Prediction", "Profile", "Provenance",
    "calibrate_from_table",
    "calibrate_space", "check_host", "cpu_name", "estimate_gpu", "evaluate", "find_profile", "fit_efficiency",
    "gpu_efficiency", "gpu_spec", "load_gpu_profile", "load_profile", "measure", "parse_duration_ms", "predict",
    "provenance", "resolve_profile", "shipped_gpu_profiles", "shipped_profiles",
]
