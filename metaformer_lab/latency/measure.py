"""Latency measurement (docs/architecture.md, "Latency"; a contract): median with p10/p90, spread and run count,
after warm-up, in ``torch.inference_mode()``, with the provenance of every number.

A measurement is one or more *attempts*. An attempt warms the model up until its run time stops
dropping, then times each forward separately (``time.perf_counter_ns`` on the CPU, CUDA events with
synchronisation on a GPU) until it has at least ``min_runs`` runs and ``min_time_s`` of samples, or
reaches ``max_runs`` / ``max_time_s``. An attempt is *acceptable* when its coefficient of variation
is at most ``max_cv`` and no neighbour took the cores it needed (see :func:`contention`). Otherwise
the whole attempt is repeated, up to ``retries`` more times; of the attempts, the acceptable one with
the lowest median is kept, or the least noisy one when none is acceptable, and then the result says
``noisy=True`` with its reasons. A noisy result is never reported silently.

Neighbour load: ``/proc/stat`` gives the busy and idle time of every CPU this process may run on
(its affinity set), at the start and end of the timed window; this process's own CPU time over the
window (``os.times()``, all its threads) is subtracted, and what is left is what the *other*
processes used: ``neighbour_cores`` (cores' worth) and ``neighbour_load`` (share of those CPUs,
0..1). Time stolen by a hypervisor counts as a neighbour's. Without ``/proc/stat`` (macOS) both are
None and the check is skipped.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.network import Network
from metaformer_lab.core.errors import Issue, MetaformerLabError
from metaformer_lab.graph.lower import ArchGraph, lower
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import SpecSource, read_spec, with_input_size


class LatencyError(MetaformerLabError):
    """Invalid latency input: a duration, a device, a dtype, a GPU name, measurement settings."""


DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})
"""The dtypes a latency can be measured or estimated at, by name."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes accepted by :func:`measure`."""

CONTENTION_TOLERANCE_CORES = 0.3
"""Neighbour CPU (in cores) allowed beyond the cores a measurement leaves free: background daemons and
the 10 ms granularity of ``/proc/stat`` over a short window."""

_WARMUP_WINDOW = 5  # runs per window when deciding that warm-up is over
_WARMUP_MAX_RUNS = 200
_DURATION = re.compile(r"^\s*(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>us|µs|μs|ms|s)?\s*$")
_UNIT_MS = {"us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ms": 1.0, "s": 1e3}


# --- durations ---------------------------------------------------------------------------------


def parse_duration_ms(text: str, *, path: str = "duration") -> float:
    """Milliseconds in a duration such as ``"2ms"``, ``"500us"`` (or ``µs``), ``"0.1s"``.

    Args:
        text: a positive finite number followed by its unit (``us``, ``µs``, ``ms`` or ``s``).
        path: where the text came from (``"--budget"``), for the error.

    Raises:
        LatencyError: no unit, not a number, not positive, or not finite.
    """
    hint = "use a number and a unit, e.g. '2ms', '500us' or '0.1s'"
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        finite = "finite " if isinstance(text, str) and re.search("nan|inf", text, re.IGNORECASE) else ""
        raise LatencyError.single(path, f"'{text}' is not a {finite}duration; {hint}")
    value = float(match["number"])
    if not math.isfinite(value):
        raise LatencyError.single(path, f"'{text}' is not a finite duration; {hint}")
    if match["unit"] is None:
        raise LatencyError.single(path, f"'{text}' has no unit; {hint}")
    if value <= 0:
        raise LatencyError.single(path, f"'{text}' must be positive; {hint}")
    return value * _UNIT_MS[match["unit"]]


# --- provenance --------------------------------------------------------------------------------


CPU_NAME_ENV = "METAFORMER_LAB_CPU_NAME"
"""Overrides the CPU model name the host reports (profile matching and provenance follow it)."""


def cpu_name() -> str:
    """The CPU's model name: ``$METAFORMER_LAB_CPU_NAME`` if set, else ``/proc/cpuinfo``, else
    ``platform.processor()``, else the machine type."""
    override = os.environ.get(CPU_NAME_ENV, "").strip()
    if override:
        return override
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: str) -> str:
    """The model name of ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


@dataclass(frozen=True)
class Provenance:
    """What a latency number was measured on and with (docs/architecture.md, "Latency").

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        device_name: CPU model name or GPU name.
        torch_version: ``torch.__version__``.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: B.
        input_shape: the full input shape, batch included.
        memory_format: ``contiguous`` or ``channels_last``.
        compile: the ``torch.compile`` mode, None for eager.
        threads: ``torch.get_num_threads()`` during the measurement.
        timestamp: ISO 8601, UTC.
        platform: ``platform.platform()``.
    """

    device: str
    device_name: str
    torch_version: str
    dtype: str
    batch_size: int
    input_shape: tuple[int, ...]
    memory_format: str
    compile: str | None
    threads: int
    timestamp: str
    platform: str

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) of an image input, None for other inputs."""
        return (self.input_shape[2], self.input_shape[3]) if len(self.input_shape) == 4 else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        size = self.input_size
        out["input_size"] = list(size) if size else None
        return out


def provenance(*, device: str = "cpu", dtype: str = "float32", batch_size: int = 1,
               input_shape: Sequence[int] = (), channels_last: bool = False, compile: str | None = None,
               threads: int | None = None) -> Provenance:
    """The provenance record of a measurement made now with these settings.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (recorded as ``cpu`` / ``cuda``; the name says which).
        dtype: dtype name.
        batch_size: B.
        input_shape: the input shape, batch included.
        channels_last: inputs and model in ``torch.channels_last``.
        compile: ``torch.compile`` mode, None for eager.
        threads: CPU threads; None: ``torch.get_num_threads()`` now.
    """
    return Provenance(
        device="cuda" if device.startswith("cuda") else "cpu", device_name=device_name(device),
        torch_version=torch.__version__, dtype=dtype, batch_size=batch_size, input_shape=tuple(input_shape),
        memory_format="channels_last" if channels_last else "contiguous", compile=compile,
        threads=torch.get_num_threads() if threads is None else threads,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), platform=platform.platform())


# --- statistics --------------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
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
    return SampleStats(median_ms=_percentile(ordered, 0.5), p10_ms=_percentile(ordered, 0.1),
                       p90_ms=_percentile(ordered, 0.9), mean_ms=mean, cv=std / mean if mean > 0 else 0.0,
                       runs=len(ordered))


# --- neighbour load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time counters at one instant: busy and total ticks of the CPUs this process may use,
    and this process's own CPU seconds (all threads)."""

    busy_ticks: int
    total_ticks: int
    cpus: int
    own_s: float


@dataclass(frozen=True)
class NeighbourLoad:
    """CPU used by *other* processes over a window: ``cores`` (cores' worth), ``load`` (share of ``cpus``)."""

    load: float
    cores: float
    cpus: int


def _allowed_cpus() -> set[int] | None:
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if getter is not None else None


def cpu_snapshot(stat_path: str = "/proc/stat") -> CpuSnapshot | None:
    """Busy/total ticks of the CPUs in this process's affinity set (all CPUs when unknown), or None
    where ``stat_path`` cannot be read. Busy = user + nice + system + irq + softirq + steal (guest
    time is inside user already); idle = idle + iowait."""
    try:
        lines = Path(stat_path).read_text().splitlines()
    except OSError:
        return None
    allowed = _allowed_cpus()
    per_cpu = [ln.split() for ln in lines if re.match(r"^cpu\d+ ", ln)]
    rows = [r for r in per_cpu if allowed is None or int(r[0][3:]) in allowed] or per_cpu
    if not rows:
        return None
    busy = total = 0
    for row in rows:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (row[1:9] + ["0"] * 8)[:8])
        row_busy = user + nice + system + irq + softirq + steal
        busy += row_busy
        total += row_busy + idle + iowait
    times = os.times()
    return CpuSnapshot(busy_ticks=busy, total_ticks=total, cpus=len(rows), own_s=times.user + times.system)


def neighbour_load(start: CpuSnapshot, end: CpuSnapshot) -> NeighbourLoad:
    """What other processes used between two snapshots: busy ticks minus this process's own."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = end.total_ticks - start.total_ticks
    others = (end.busy_ticks - start.busy_ticks) - (end.own_s - start.own_s) * hz
    load = min(max(others / total, 0.0), 1.0) if total > 0 else 0.0
    return NeighbourLoad(load=load, cores=load * end.cpus, cpus=end.cpus)


def contention(load: NeighbourLoad, cores_needed: int,
               tolerance: float = CONTENTION_TOLERANCE_CORES) -> str | None:
    """Why ``load`` disturbed a measurement that needs ``cores_needed`` cores, or None.

    The rule: a measurement with T threads needs min(T, cpus) cores; the others may use the rest,
    ``cpus - needed``, without slowing it. Contention is ``load.cores > cpus - needed + tolerance``.
    """
    needed = min(cores_needed, load.cpus)
    if load.cores <= load.cpus - needed + tolerance:
        return None
    threads = "1 thread" if cores_needed == 1 else f"{cores_needed} threads"
    return f"neighbours used {load.cores:.1f} of {load.cpus} cores while {threads} needed {needed}"


# --- the result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """A measured latency with its spread and provenance (docs/architecture.md, "Latency"; a contract).

    Attributes:
        median_ms: the latency (median of the kept attempt's samples).
        p10_ms: 10th percentile.
        p90_ms: 90th percentile.
        mean_ms: mean.
        cv: coefficient of variation, standard deviation / mean.
        runs: timed runs of the kept attempt.
        attempts: attempts made (1 + retries used).
        warmup_runs: warm-up runs of the kept attempt.
        noisy: the kept attempt is not trustworthy; ``noise_reasons`` says why.
        noise_reasons: e.g. ``"cv 0.23 > 0.10"``, ``"neighbours used 1.6 of 2 cores while 1 thread needed 1"``.
        neighbour_load: share of the CPUs that other processes used while timing (None: unknown).
        neighbour_cores: the same in cores.
        provenance: device, dtype, sizes, threads, versions, time.
        samples_ms: every timed run of the kept attempt, in order.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    runs: int
    attempts: int
    warmup_runs: int
    noisy: bool
    noise_reasons: tuple[str, ...]
    neighbour_load: float | None
    neighbour_cores: float | None
    provenance: Provenance
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    def to_json(self, *, samples: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict; ``samples`` adds ``samples_ms``."""
        out = {k: v for k, v in asdict(self).items() if k not in ("provenance", "samples_ms")}
        out["noise_reasons"] = list(self.noise_reasons)
        out["provenance"] = self.provenance.to_json()
        if samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Validated measurement settings."""

    device: str
    dtype: str
    threads: int
    channels_last: bool
    compile: str | None
    min_runs: int
    max_runs: int
    min_time_s: float
    max_time_s: float
    max_warmup_s: float
    max_cv: float
    retries: int
    tolerance: float


def _device_issues(device: str) -> list[Issue]:
    if device == "cpu":
        return []
    if re.fullmatch(r"cuda(:\d+)?", device) is None:
        return [Issue("device", f"'{device}' is not a device; use cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        return [Issue("device", f"'{device}' asked for, but torch sees no CUDA device")]
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return [Issue("device", f"'{device}' asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")]
    return []


def _compile_mode(compile: bool | str) -> tuple[str | None, list[Issue]]:
    if compile is False:
        return None, []
    if compile is True:
        return "default", []
    if compile in COMPILE_MODES:
        return str(compile), []
    return None, [Issue("compile", f"'{compile}' is not a torch.compile mode; use {', '.join(COMPILE_MODES)}")]


def _number_issues(ints: dict[str, int], floats: dict[str, float]) -> list[Issue]:
    """Integers >= their lowest allowed value, floats finite and >= 0, ranges the right way round."""
    issues = []
    for name, value in ints.items():
        lowest = 0 if name == "retries" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            issues.append(Issue(name, f"{value} must be an integer >= {lowest}"))
    for name, number in floats.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number < 0:
            issues.append(Issue(name, f"{number} must be a finite number >= 0"))
    if not issues and floats["max_time_s"] < floats["min_time_s"]:
        issues.append(Issue("max_time_s", f"{floats['max_time_s']} is below min_time_s {floats['min_time_s']}"))
    if not issues and ints["max_runs"] < ints["min_runs"]:
        issues.append(Issue("max_runs", f"{ints['max_runs']} is below min_runs {ints['min_runs']}"))
    return issues


def _plan(*, device: str, dtype: str, channels_last: bool, compile: bool | str, ints: dict[str, int],
          floats: dict[str, float]) -> _Plan:
    """Check every setting at once; raise LatencyError listing all that are wrong."""
    issues = _device_issues(device)
    if dtype not in DTYPES:
        issues.append(Issue("dtype", f"'{dtype}' is not supported; use {', '.join(DTYPES)}"))
    mode, compile_issues = _compile_mode(compile)
    issues += compile_issues + _number_issues(ints, floats)
    if issues:
        raise LatencyError(issues)
    return _Plan(device=device, dtype=dtype, threads=ints["threads"], channels_last=channels_last, compile=mode,
                 min_runs=ints["min_runs"], max_runs=ints["max_runs"], retries=ints["retries"],
                 min_time_s=floats["min_time_s"], max_time_s=floats["max_time_s"],
                 max_warmup_s=floats["max_warmup_s"], max_cv=floats["max_cv"],
                 tolerance=floats["contention_tolerance"])


# --- what is measured --------------------------------------------------------------------------


def _spec_module(spec: ArchSpec, input_size: int | tuple[int, int] | None) -> Network:
    return compile_graph(lower(with_input_size(spec, input_size)))


def _hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (input_size[0], input_size[1])


def _module_and_shape(model_or_spec: nn.Module | ArchGraph | SpecSource, batch_size: int,
                      input_size: int | tuple[int, int] | None, channels: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The module to time and its input shape (batch included)."""
    if isinstance(model_or_spec, Network):
        t = model_or_spec.input_type
        if input_size is not None and _hw(input_size) != t.grid:
            raise LatencyError.single("input_size", f"{input_size} differs from the {t.height}x{t.width} input the "
                                                    "network was compiled for; pass its spec to measure another size")
        return model_or_spec, t.shape(batch_size)
    if isinstance(model_or_spec, nn.Module):
        if input_size is None:
            raise LatencyError.single("input_size", "a plain nn.Module needs input_size (and channels, default 3)")
        return model_or_spec, (batch_size, channels, *_hw(input_size))
    if isinstance(model_or_spec, ArchGraph):
        net = compile_graph(model_or_spec) if input_size is None else _spec_module(model_or_spec.spec, input_size)
    else:
        net = _spec_module(read_spec(model_or_spec), input_size)
    return net, net.input_type.shape(batch_size)


def _converts(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> bool:
    """Whether moving ``module`` to ``device``/``dtype`` (and channels_last) would change it."""
    tensors = [*module.parameters(), *module.buffers()]

    def elsewhere(t: Tensor) -> bool:
        return t.device.type != device.type or (device.index is not None and t.device.index != device.index)

    return channels_last or any(elsewhere(t) or (t.is_floating_point() and t.dtype != dtype) for t in tensors)


def _prepare(module: nn.Module, shape: tuple[int, ...], plan: _Plan,
             owned: bool) -> tuple[Callable[[Tensor], Any], Tensor]:
    """The callable to time (eval mode, on the device, in the dtype and memory format) and its input.
    A caller's module (not ``owned``) is copied rather than converted in place."""
    if plan.channels_last and len(shape) != 4:
        raise LatencyError.single("channels_last", f"needs a 4-D (B, C, H, W) input, not shape {list(shape)}")
    dtype = DTYPES[plan.dtype]
    if not owned and _converts(module, torch.device(plan.device), dtype, plan.channels_last):
        module = copy.deepcopy(module)
    module = module.eval().to(device=plan.device, dtype=dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=plan.device, dtype=dtype)
    if plan.channels_last:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if plan.compile is not None:
        return torch.compile(module, mode=plan.compile), x
    return module, x


# --- timing ------------------------------------------------------------------------------------


def _cpu_timer(fn: Callable[[Tensor], Any], x: Tensor) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter_ns()
        fn(x)
        return (time.perf_counter_ns() - start) / 1e6

    return run


def _cuda_timer(fn: Callable[[Tensor], Any], x: Tensor) -> Callable[[], float]:
    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return run


def _warm_up(run: Callable[[], float], max_s: float) -> int:
    """Run until the median of the last window stops dropping below the one before (by 2 %), at
    most ``_WARMUP_MAX_RUNS`` runs or ``max_s`` seconds after the first run (which may compile and
    always completes); the number of runs."""
    w, times = _WARMUP_WINDOW, [run()]
    deadline = time.perf_counter() + max_s
    while True:
        if len(times) > 2 * w and statistics.median(times[-w:]) >= 0.98 * statistics.median(times[-2 * w:-w]):
            return len(times)
        if len(times) >= _WARMUP_MAX_RUNS or time.perf_counter() >= deadline:
            return len(times)
        times.append(run())


def _sample(run: Callable[[], float], plan: _Plan) -> list[float]:
    """Timed runs: at least min_runs and min_time_s, at most max_runs and max_time_s (one run at least)."""
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        samples.append(run())
        elapsed = time.perf_counter() - start
        if len(samples) >= plan.max_runs or elapsed >= plan.max_time_s:
            return samples
        if len(samples) >= plan.min_runs and elapsed >= plan.min_time_s:
            return samples


@dataclass(frozen=True)
class _Attempt:
    samples_ms: tuple[float, ...]
    stats: SampleStats
    warmup_runs: int
    load: NeighbourLoad | None
    noisy_cv: bool
    contended: str | None

    @property
    def acceptable(self) -> bool:
        return not self.noisy_cv and self.contended is None


def _attempt(run: Callable[[], float], sync: Callable[[], None], plan: _Plan) -> _Attempt:
    warmup = _warm_up(run, plan.max_warmup_s)
    sync()
    start = cpu_snapshot()
    samples = _sample(run, plan)
    end = cpu_snapshot()
    stats = summarize(samples)
    load = neighbour_load(start, end) if start is not None and end is not None else None
    needed = plan.threads if plan.device == "cpu" else 1  # on a GPU, the one thread launching kernels
    contended = contention(load, needed, plan.tolerance) if load is not None else None
    return _Attempt(tuple(samples), stats, warmup, load, stats.cv > plan.max_cv, contended)


def _choose(attempts: Sequence[_Attempt]) -> _Attempt:
    """The acceptable attempt with the lowest median, else the least noisy one."""
    ok = [a for a in attempts if a.acceptable]
    if ok:
        return min(ok, key=lambda a: a.stats.median_ms)
    return min(attempts, key=lambda a: (a.contended is not None, a.stats.cv))


def _reasons(kept: _Attempt, plan: _Plan) -> tuple[str, ...]:
    reasons = []
    if kept.noisy_cv:
        reasons.append(f"cv {kept.stats.cv:.2f} > {plan.max_cv:.2f}")
    if kept.contended is not None:
        reasons.append(kept.contended)
    if kept.stats.runs < plan.min_runs:
        reasons.append(f"only {kept.stats.runs} run(s) within max_time_s {plan.max_time_s:g} "
                       f"(min_runs {plan.min_runs})")
    return tuple(reasons)


def _attempts(run: Callable[[], float], sync: Callable[[], None], plan: _Plan) -> list[_Attempt]:
    attempts = [_attempt(run, sync, plan)]
    while not attempts[-1].acceptable and len(attempts) <= plan.retries:
        attempts.append(_attempt(run, sync, plan))
    return attempts


def _timed(fn: Callable[[Tensor], Any], x: Tensor, plan: _Plan) -> list[_Attempt]:
    """Every attempt, with torch's thread count set to ``plan.threads`` and restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.inference_mode():
            if plan.device == "cpu":
                return _attempts(_cpu_timer(fn, x), lambda: None, plan)
            with torch.cuda.device(torch.device(plan.device)):
                return _attempts(_cuda_timer(fn, x), torch.cuda.synchronize, plan)
    finally:
        torch.set_num_threads(previous)


def measure(model_or_spec: nn.Module | ArchGraph | SpecSource, *, device: str = "cpu", batch_size: int = 1,
            input_size: int | tuple[int, int] | None = None, channels: int = 3, dtype: str = "float32",
            threads: int = 1, channels_last: bool = False, compile: bool | str = False, min_runs: int = 10,
            max_runs: int = 10_000, min_time_s: float = 1.0, max_time_s: float = 10.0, max_warmup_s: float = 3.0,
            max_cv: float = 0.10, retries: int = 2,
            contention_tolerance: float = CONTENTION_TOLERANCE_CORES) -> LatencyResult:
    """Measure the forward latency of a model or spec (see the module docstring for the procedure).

    Args:
        model_or_spec: an ``nn.Module`` (a compiled :class:`Network` knows its input; others need
            ``input_size``), an ``ArchGraph``, an ``ArchSpec``, or a spec source (path, zoo name, mapping).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: B.
        input_size: square size or (H, W); for a spec or graph it rebuilds the network at that size.
        channels: input channels of a plain module.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (half types run, slowly, on CPUs too).
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards).
        channels_last: model and input in ``torch.channels_last``.
        compile: False (eager), True (``default``) or a ``torch.compile`` mode.
        min_runs: timed runs at least (per attempt).
        max_runs: timed runs at most.
        min_time_s: seconds of samples at least.
        max_time_s: seconds of samples at most (wins over ``min_runs``; the result is then noisy).
        max_warmup_s: seconds of warm-up at most, after the first run (which compiles, with ``compile``).
        max_cv: largest acceptable coefficient of variation.
        retries: extra attempts when an attempt is noisy.
        contention_tolerance: cores of neighbour load tolerated beyond the free ones (:func:`contention`).

    Raises:
        LatencyError: invalid settings (all of them listed), or no input size for a plain module.
        SpecError: an invalid spec.
    """
    plan = _plan(device=device, dtype=dtype, channels_last=channels_last, compile=compile,
                 ints={"batch_size": batch_size, "threads": threads, "min_runs": min_runs, "max_runs": max_runs,
                       "retries": retries},
                 floats={"min_time_s": min_time_s, "max_time_s": max_time_s, "max_warmup_s": max_warmup_s,
                         "max_cv": max_cv, "contention_tolerance": contention_tolerance})
    module, shape = _module_and_shape(model_or_spec, batch_size, input_size, channels)
    training = module.training
    try:
        fn, x = _prepare(module, shape, plan, owned=not isinstance(model_or_spec, nn.Module))
        attempts = _timed(fn, x, plan)
    finally:
        module.train(training)  # a caller's module comes back in the mode it came in
    kept = _choose(attempts)
    reasons = _reasons(kept, plan)
    stats = kept.stats
    return LatencyResult(
        median_ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, mean_ms=stats.mean_ms, cv=stats.cv,
        runs=stats.runs, attempts=len(attempts), warmup_runs=kept.warmup_runs, noisy=bool(reasons),
        noise_reasons=reasons, neighbour_load=kept.load.load if kept.load else None,
        neighbour_cores=kept.load.cores if kept.load else None,
        provenance=provenance(device=device, dtype=dtype, batch_size=batch_size, input_shape=shape,
                              channels_last=channels_last, compile=plan.compile, threads=threads),
        samples_ms=kept.samples_ms)
