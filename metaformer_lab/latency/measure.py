"""The timing engine (docs/architecture.md, "Latency"; a contract): median with p10/p90, spread and run
count, after warm-up, in ``torch.inference_mode()``, with the provenance of every number.

A measurement is one or more *attempts*. An attempt warms the model up until its run time stops
dropping, then times each forward separately (``time.perf_counter_ns`` on the CPU, CUDA events with
synchronisation on a GPU) until it has at least ``min_runs`` runs and ``min_time_s`` of samples, or
reaches ``max_runs`` / ``max_time_s``. An attempt is *acceptable* when its coefficient of variation
is at most ``max_cv`` and no neighbour took the cores it needed (:func:`.load.contention`). Otherwise
the whole attempt is repeated, up to ``retries`` more times; of the attempts, the acceptable one with
the lowest median is kept, or the least noisy one when none is acceptable, and then the result says
``noisy=True`` with its reasons. A noisy result is never reported silently.

What is timed is set by a :class:`~metaformer_lab.latency.target.LatencyTarget`; the statistics are
:mod:`.stats`, the neighbour load :mod:`.load`; :mod:`.interleave` times many networks in turns with the
same parts (:func:`timing_plan`, :func:`module_and_shape`, :func:`prepare`, :func:`cpu_timer`, :func:`warm_up`).
"""

from __future__ import annotations

import copy
import inspect
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.folding import deploy_form, to_channels_last
from metaformer_lab.compile.network import Network
from metaformer_lab.core.errors import Issue, LatencyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency.load import (
    CONTENTION_TOLERANCE_CORES,
    NeighbourLoad,
    contention,
    cpu_snapshot,
    neighbour_load,
)
from metaformer_lab.latency.stats import SampleStats, summarize
from metaformer_lab.latency.target import LatencyTarget, device_name
from metaformer_lab.spec.load import SpecSource, read_spec, with_input_size

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})
"""The dtypes a latency can be measured at, by name (:data:`~metaformer_lab.latency.target.DTYPE_NAMES`)."""

_WARMUP_WINDOW = 5  # runs per window when deciding that warm-up is over
_WARMUP_MAX_RUNS = 200


# --- provenance --------------------------------------------------------------------------------


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
        deploy: the deploy form was timed.
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
    deploy: bool = False

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


def provenance(target: LatencyTarget, input_shape: Sequence[int] = ()) -> Provenance:
    """The provenance record of a measurement of ``target`` made now, on an input of ``input_shape``
    (threads: the target's, else ``torch.get_num_threads()`` now)."""
    return Provenance(
        device="cuda" if target.device.startswith("cuda") else "cpu",
        device_name=target.device_name or device_name(target.device), torch_version=torch.__version__,
        dtype=target.dtype, batch_size=target.batch_size, input_shape=tuple(input_shape),
        memory_format=target.memory_format, compile=target.compile,
        threads=torch.get_num_threads() if target.threads is None else target.threads,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), platform=platform.platform(),
        deploy=target.deploy)


# --- the result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult(SampleStats):
    """A measured latency with its spread and provenance (docs/architecture.md, "Latency"; a contract): the
    kept attempt's :class:`~metaformer_lab.latency.stats.SampleStats`, and how it was obtained.

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
        sample_rounds: for an interleaved measurement (``latency.interleave``), the round each sample was taken
            in: samples of different networks with the same round were taken next to each other (empty otherwise).
    """

    attempts: int
    warmup_runs: int
    noisy: bool
    noise_reasons: tuple[str, ...]
    neighbour_load: float | None
    neighbour_cores: float | None
    provenance: Provenance
    samples_ms: tuple[float, ...] = field(default=(), repr=False)
    sample_rounds: tuple[int, ...] = field(default=(), repr=False)

    def to_json(self, *, samples: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict; ``samples`` adds ``samples_ms``."""
        out = {k: v for k, v in asdict(self).items() if k not in ("provenance", "samples_ms", "sample_rounds")}
        out["noise_reasons"] = list(self.noise_reasons)
        out["provenance"] = self.provenance.to_json()
        if samples:
            out["samples_ms"] = list(self.samples_ms)
            if self.sample_rounds:
                out["sample_rounds"] = list(self.sample_rounds)
        return out


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingPlan:
    """A checked target and how long and how carefully to time it."""

    target: LatencyTarget
    min_runs: int
    max_runs: int
    min_time_s: float
    max_time_s: float
    max_warmup_s: float
    max_cv: float
    retries: int
    tolerance: float

    @property
    def threads(self) -> int:
        return self.target.threads or 1

    @property
    def device(self) -> str:
        return self.target.device


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


def timing_plan(target: LatencyTarget, *, min_runs: int = 10, max_runs: int = 10_000, min_time_s: float = 1.0,
                max_time_s: float = 10.0, max_warmup_s: float = 3.0, max_cv: float = 0.10, retries: int = 2,
                contention_tolerance: float = CONTENTION_TOLERANCE_CORES) -> TimingPlan:
    """Check the target (on this host) and the timing settings at once; raise LatencyError listing all that
    are wrong."""
    issues = _device_issues(target.device) + target.issues()
    issues += _number_issues({"min_runs": min_runs, "max_runs": max_runs, "retries": retries},
                             {"min_time_s": min_time_s, "max_time_s": max_time_s, "max_warmup_s": max_warmup_s,
                              "max_cv": max_cv, "contention_tolerance": contention_tolerance})
    if issues:
        raise LatencyError(issues)
    return TimingPlan(target=target, min_runs=min_runs, max_runs=max_runs, min_time_s=min_time_s,
                      max_time_s=max_time_s, max_warmup_s=max_warmup_s, max_cv=max_cv, retries=retries,
                      tolerance=contention_tolerance)


def _compile_mode(compile: bool | str) -> str | None:
    """``measure``'s ``compile`` keyword as a target's mode (True: ``default``; a bad mode is reported by the
    target's check)."""
    if compile is False or compile is None:
        return None
    return "default" if compile is True else str(compile)


# --- what is measured --------------------------------------------------------------------------


def module_and_shape(model_or_graph: nn.Module | ArchGraph | SpecSource, target: LatencyTarget,
                     channels: int = 3) -> tuple[nn.Module, tuple[int, ...], bool]:
    """The module to time, its input shape (batch included), and whether it is ours to convert in place (not
    the caller's): a spec or graph is compiled, at the target's input size when it sets one; with the target's
    ``deploy``, the module is its deploy form (a copy)."""
    module, shape = _module_and_shape(model_or_graph, target, channels)
    if target.deploy:
        return deploy_form(module), shape, True
    return module, shape, not isinstance(model_or_graph, nn.Module)


def _module_and_shape(model_or_graph: nn.Module | ArchGraph | SpecSource, target: LatencyTarget,
                      channels: int) -> tuple[nn.Module, tuple[int, ...]]:
    size, batch = target.input_size, target.batch_size
    if isinstance(model_or_graph, Network):
        t = model_or_graph.input_type
        if size is not None and size != t.grid:
            raise LatencyError.single("input_size", f"{size[0]}x{size[1]} differs from the {t.height}x{t.width} input "
                                                    "the network was compiled for; pass its spec to measure another "
                                                    "size")
        return model_or_graph, t.shape(batch)
    if isinstance(model_or_graph, nn.Module):
        if size is None:
            raise LatencyError.single("input_size", "a plain nn.Module needs input_size (and channels, default 3)")
        return model_or_graph, (batch, channels, *size)
    graph = model_or_graph if isinstance(model_or_graph, ArchGraph) else lower(read_spec(model_or_graph))
    if size is not None and size != (graph.input_type.height, graph.input_type.width):
        graph = lower(with_input_size(graph.spec, size))
    net = compile_graph(graph)
    return net, net.input_type.shape(batch)


def _converts(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> bool:
    """Whether moving ``module`` to ``device``/``dtype`` (and channels_last) would change it."""
    tensors = [*module.parameters(), *module.buffers()]

    def elsewhere(t: Tensor) -> bool:
        return t.device.type != device.type or (device.index is not None and t.device.index != device.index)

    return channels_last or any(elsewhere(t) or (t.is_floating_point() and t.dtype != dtype) for t in tensors)


def prepare(module: nn.Module, shape: tuple[int, ...], plan: TimingPlan,
             owned: bool) -> tuple[Callable[[Tensor], Any], Tensor]:
    """The callable to time (eval mode, on the device, in the dtype and memory format) and its input.
    A caller's module (not ``owned``) is copied rather than converted in place."""
    target = plan.target
    if target.channels_last and len(shape) != 4:
        raise LatencyError.single("channels_last", f"needs a 4-D (B, C, H, W) input, not shape {list(shape)}")
    dtype = DTYPES[target.dtype]
    if not owned and _converts(module, torch.device(target.device), dtype, target.channels_last):
        module = copy.deepcopy(module)
    module = module.eval().to(device=target.device, dtype=dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=target.device, dtype=dtype)
    if target.channels_last:
        module = to_channels_last(module)
        x = x.contiguous(memory_format=torch.channels_last)
    if target.compile is not None:
        return compiled(module, target.compile), x
    return module, x


def compiled(module: nn.Module, mode: str | None,
             backend: str | Callable[..., Any] = "inductor") -> Callable[[Tensor], Any]:
    """``torch.compile`` for timing one network among many in a process: static shapes, and recompilations
    counted for this call alone.

    Every network we build runs the same ``Network.forward`` code, and Dynamo keeps its compiled entries per code
    object: by default the ninth network compiled in a process hits ``recompile_limit`` (8) and runs eager while
    its time is reported as compiled, and from the second network on, a size that changed marks dimensions
    dynamic (symbolic shapes: a slower compile and other kernels than a deployment at one input size gets).
    ``isolate_recompiles`` gives each call its own entries and limit; on a PyTorch without it, Dynamo's caches
    are cleared first instead (a module compiled earlier recompiles on its next call).
    """
    if "isolate_recompiles" in _COMPILE_ARGS:
        return torch.compile(module, mode=mode, backend=backend, dynamic=False, isolate_recompiles=True)
    torch._dynamo.reset()
    return torch.compile(module, mode=mode, backend=backend, dynamic=False)


_COMPILE_ARGS = frozenset(inspect.signature(torch.compile).parameters)


# --- timing ------------------------------------------------------------------------------------


def cpu_timer(fn: Callable[[Tensor], Any], x: Tensor) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter_ns()
        fn(x)
        return (time.perf_counter_ns() - start) / 1e6

    return run


def cuda_timer(fn: Callable[[Tensor], Any], x: Tensor) -> Callable[[], float]:
    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return run


def warm_up(run: Callable[[], float], max_s: float) -> int:
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


def _sample(run: Callable[[], float], plan: TimingPlan) -> list[float]:
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


def _attempt(run: Callable[[], float], sync: Callable[[], None], plan: TimingPlan) -> _Attempt:
    warmup = warm_up(run, plan.max_warmup_s)
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


def _reasons(kept: _Attempt, plan: TimingPlan) -> tuple[str, ...]:
    reasons = []
    if kept.noisy_cv:
        reasons.append(f"cv {kept.stats.cv:.2f} > {plan.max_cv:.2f}")
    if kept.contended is not None:
        reasons.append(kept.contended)
    if kept.stats.runs < plan.min_runs:
        reasons.append(f"only {kept.stats.runs} run(s) within max_time_s {plan.max_time_s:g} "
                       f"(min_runs {plan.min_runs})")
    return tuple(reasons)


def _attempts(run: Callable[[], float], sync: Callable[[], None], plan: TimingPlan) -> list[_Attempt]:
    attempts = [_attempt(run, sync, plan)]
    while not attempts[-1].acceptable and len(attempts) <= plan.retries:
        attempts.append(_attempt(run, sync, plan))
    return attempts


def _timed(fn: Callable[[Tensor], Any], x: Tensor, plan: TimingPlan) -> list[_Attempt]:
    """Every attempt, with torch's thread count set to ``plan.threads`` and restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.inference_mode():
            if plan.device == "cpu":
                return _attempts(cpu_timer(fn, x), lambda: None, plan)
            with torch.cuda.device(torch.device(plan.device)):
                return _attempts(cuda_timer(fn, x), torch.cuda.synchronize, plan)
    finally:
        torch.set_num_threads(previous)


def measure(model_or_graph: nn.Module | ArchGraph | SpecSource, target: LatencyTarget | None = None, *,
            device: str = "cpu", batch_size: int = 1, input_size: int | tuple[int, int] | None = None,
            channels: int = 3, dtype: str = "float32", threads: int = 1, channels_last: bool = False,
            compile: bool | str = False, min_runs: int = 10, max_runs: int = 10_000, min_time_s: float = 1.0,
            max_time_s: float = 10.0, max_warmup_s: float = 3.0, max_cv: float = 0.10, retries: int = 2,
            contention_tolerance: float = CONTENTION_TOLERANCE_CORES) -> LatencyResult:
    """Measure the forward latency of a model, graph or spec (see the module docstring for the procedure).

    Args:
        model_or_graph: an ``nn.Module`` (a compiled :class:`Network` knows its input; others need
            ``input_size``), an ``ArchGraph``, an ``ArchSpec``, or a spec source (path, zoo name, mapping).
        target: what to time (device, dtype, batch, threads, input size, memory format, compile mode,
            deploy form). Without it, the keywords ``device`` ... ``compile`` make one (the same fields).
        channels: input channels of a plain module.
        min_runs: timed runs at least (per attempt).
        max_runs: timed runs at most.
        min_time_s: seconds of samples at least.
        max_time_s: seconds of samples at most (wins over ``min_runs``; the result is then noisy).
        max_warmup_s: seconds of warm-up at most, after the first run (which compiles, with ``compile``).
        max_cv: largest acceptable coefficient of variation.
        retries: extra attempts when an attempt is noisy.
        contention_tolerance: cores of neighbour load tolerated beyond the free ones (:func:`.load.contention`).

    A target's ``input_size`` rebuilds a spec or graph at that size; ``threads`` is set with
    ``torch.set_num_threads`` during the measurement and restored afterwards; half dtypes run, slowly, on
    CPUs too.

    Raises:
        LatencyError: invalid settings (all of them listed), or no input size for a plain module.
        SpecError: an invalid spec.
    """
    if target is None:
        target = LatencyTarget(device=device, dtype=dtype, batch_size=batch_size, threads=threads,
                               input_size=input_size, channels_last=channels_last, compile=_compile_mode(compile))
    plan = timing_plan(target, min_runs=min_runs, max_runs=max_runs, min_time_s=min_time_s, max_time_s=max_time_s,
                       max_warmup_s=max_warmup_s, max_cv=max_cv, retries=retries,
                       contention_tolerance=contention_tolerance)
    module, shape, owned = module_and_shape(model_or_graph, target, channels)
    training = module.training
    try:
        fn, x = prepare(module, shape, plan, owned=owned)
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
        provenance=provenance(target, shape), samples_ms=kept.samples_ms)
