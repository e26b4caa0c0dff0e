"""Latency measurement: result structure and provenance, inputs accepted, durations, the noisy-neighbour guard.

Tests check structure and flags, never timing values: the machine is shared.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency import LatencyError, LatencyResult, measure, parse_duration_ms
from metaformer_lab.latency.load import cpu_snapshot
from metaformer_lab.latency.measure import provenance
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.spec.load import read_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_caformer.yaml"
FAST: dict[str, Any] = {"min_runs": 5, "min_time_s": 0.15, "max_time_s": 2.0, "max_warmup_s": 0.5, "max_cv": 5.0,
                        "retries": 0}
HAS_PROC_STAT = cpu_snapshot() is not None


def _check_structure(result: LatencyResult, min_runs: int = FAST["min_runs"]) -> None:
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.runs >= min_runs and len(result.samples_ms) == result.runs
    assert min(result.samples_ms) <= result.mean_ms <= max(result.samples_ms)
    assert result.cv >= 0 and result.attempts >= 1 and result.warmup_runs >= 1
    assert result.noisy == bool(result.noise_reasons)
    if HAS_PROC_STAT:
        assert result.neighbour_load is not None and 0.0 <= result.neighbour_load <= 1.0
        assert result.neighbour_cores is not None and 0.0 <= result.neighbour_cores <= (os.cpu_count() or 1)
    data = json.loads(json.dumps(result.to_json()))
    assert data["median_ms"] == result.median_ms and "samples_ms" not in data
    assert set(data["provenance"]) >= {"device", "device_name", "torch_version", "dtype", "batch_size", "input_shape",
                                       "input_size", "memory_format", "compile", "threads", "timestamp"}


def test_a_spec_path_gives_a_full_result_with_provenance() -> None:
    result = measure(TINY, batch_size=2, **FAST)
    _check_structure(result)
    p = result.provenance
    assert (p.device, p.dtype, p.batch_size, p.threads, p.compile) == ("cpu", "float32", 2, 1, None)
    assert p.input_shape == (2, 3, 32, 32) and p.input_size == (32, 32) and p.memory_format == "contiguous"
    assert p.torch_version == torch.__version__ and p.device_name
    assert len(result.to_json(samples=True)["samples_ms"]) == result.runs


def test_a_zoo_name_at_another_input_size() -> None:
    result = measure("poolformer_s12", input_size=32, **FAST)
    _check_structure(result)
    assert result.provenance.input_shape == (1, 3, 32, 32)


def test_a_graph_and_a_compiled_network() -> None:
    graph = lower(read_spec(TINY))
    _check_structure(measure(graph, **FAST))
    assert measure(graph, input_size=48, **FAST).provenance.input_size == (48, 48)
    network = compile_graph(graph)
    _check_structure(measure(network, **FAST))
    with pytest.raises(LatencyError, match="input_size: 64x64 differs from the 32x32 input"):
        measure(network, input_size=64, **FAST)


def test_a_plain_module_needs_an_input_size() -> None:
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(LatencyError, match="input_size: a plain nn.Module needs input_size"):
        measure(module, **FAST)
    result = measure(module, input_size=(12, 16), channels=1, **FAST)
    _check_structure(result)
    assert result.provenance.input_shape == (1, 1, 12, 16)


@pytest.mark.parametrize("dtype, channels_last", [("bfloat16", False), ("float16", True), ("float32", True)])
def test_dtype_and_memory_format_leave_the_callers_module_alone(dtype: str, channels_last: bool) -> None:
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    result = measure(module, input_size=16, dtype=dtype, channels_last=channels_last, **FAST)
    _check_structure(result)
    assert result.provenance.dtype == dtype
    assert result.provenance.memory_format == ("channels_last" if channels_last else "contiguous")
    assert module.training and module[0].weight.dtype == torch.float32
    assert module[0].weight.is_contiguous()


class _FiveD(nn.Module):
    """A conv beside a 5-D parameter (agent attention keeps position biases of that rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bias5 = nn.Parameter(torch.zeros(1, 2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias5.sum()


def test_channels_last_takes_a_module_with_5d_parameters() -> None:
    """``Module.to(memory_format=torch.channels_last)`` raises on a 5-D tensor; the measurement converts the 4-D
    ones only (a traceback on `latency --channels-last` of an agent-attention network before)."""
    module = _FiveD()
    result = measure(module, input_size=16, channels_last=True, **FAST)
    _check_structure(result)
    assert result.provenance.memory_format == "channels_last" and module.conv.weight.is_contiguous()


def test_threads_are_recorded_and_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = measure(TINY, threads=1, **FAST)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result.provenance.threads == 1


def test_a_spread_too_wide_is_retried_then_flagged() -> None:
    result = measure(TINY, **{**FAST, "max_cv": 1e-9, "retries": 1})
    assert result.attempts == 2
    assert result.noisy and any(r.startswith("cv ") and r.endswith("> 0.00") for r in result.noise_reasons)


def test_too_few_runs_within_the_time_limit_are_flagged() -> None:
    result = measure(TINY, **{**FAST, "min_runs": 100_000, "min_time_s": 0.05, "max_time_s": 0.05, "max_runs": 200_000})
    assert result.noisy and any(r.startswith("only ") for r in result.noise_reasons)


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(LatencyError) as err:
        measure(TINY, device="tpu", dtype="float64", threads=0, compile="fast", min_time_s=float("nan"))
    paths = [issue.path for issue in err.value.issues]
    assert paths == ["device", "dtype", "compile", "threads", "min_time_s"]
    assert isinstance(err.value, MetaformerLabError)


def test_provenance_helper() -> None:
    p = provenance(LatencyTarget(threads=3), input_shape=(1, 3, 8, 8))
    assert (p.device, p.threads, p.input_size, p.memory_format) == ("cpu", 3, (8, 8), "contiguous")
    assert json.dumps(p.to_json())


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ms", [("2ms", 2.0), ("500us", 0.5), ("500µs", 0.5), ("250μs", 0.25), ("0.1s", 100.0),
                                      (" 1.5 ms ", 1.5), ("1e3us", 1.0), (".5ms", 0.5)])
def test_durations(text: str, ms: float) -> None:
    assert parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text, message", [
    ("2", "'2' has no unit"), ("-1ms", "'-1ms' must be positive"), ("0ms", "'0ms' must be positive"),
    ("abc", "'abc' is not a duration"), ("ms", "'ms' is not a duration"), ("", "'' is not a duration"),
    ("2 ms ms", "'2 ms ms' is not a duration"), ("2h", "'2h' is not a duration"),
    ("nanms", "'nanms' is not a finite duration"), ("infms", "'infms' is not a finite duration"),
    ("1e999ms", "'1e999ms' is not a finite duration"),
])
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(LatencyError) as err:
        parse_duration_ms(text, path="--budget")
    assert str(err.value).startswith(f"--budget: {message}")
    assert "e.g. '2ms'" in str(err.value)


# --- neighbours --------------------------------------------------------------------------------


@pytest.mark.serial  # its busy loops take every core
@pytest.mark.skipif(not HAS_PROC_STAT, reason="no /proc/stat")
def test_busy_neighbours_flag_the_result() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # 2C busy loops leave a 1-thread measurement about C/(2C+1) of a core: the others take C - 1/2 > C - 1 + 0.3
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cpus)]
    try:
        time.sleep(0.5)  # until they spin
        result = measure(TINY, threads=1, **{**FAST, "min_time_s": 0.5})
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()
    assert result.noisy
    assert any(r.startswith("neighbours used ") and r.endswith("while 1 thread needed 1") for r in result.noise_reasons)
    assert result.neighbour_cores is not None and result.neighbour_cores > cpus - 1 + 0.3


@pytest.mark.skipif(not HAS_PROC_STAT, reason="no /proc/stat")
def test_a_quiet_measurement_reports_its_neighbours_loosely() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    result = measure(TINY, threads=1, **FAST)
    assert result.neighbour_load is not None and result.neighbour_cores is not None
    assert 0.0 <= result.neighbour_load <= 1.0
    assert result.neighbour_cores == pytest.approx(result.neighbour_load * cpus)


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_events(dtype: str) -> None:
    result = measure(TINY, device="cuda", dtype=dtype, batch_size=4, **FAST)
    _check_structure(result)
    assert result.provenance.device == "cuda"
    assert result.provenance.device_name == torch.cuda.get_device_name(0)


def test_each_network_compiled_for_timing_is_compiled_not_left_eager_at_static_shapes() -> None:
    """Our networks share one ``forward``: past Dynamo's recompile limit a later network would run eager while
    timed as compiled, and from the second network on, the sizes that changed would be compiled as symbols (a
    slower compile, other kernels than a deployment at one input size gets). Each compilation for timing counts on
    its own (a limit of 1 here, three networks of other widths and input sizes) and sees every size as a number."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from metaformer_lab.latency.measure import compiled

    inputs: list[list[Any]] = []  # per compiled graph, what Dynamo traced each input as

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        inputs.append([node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")])
        return gm.forward

    spec = read_spec(TINY)
    before = counters["stats"]["unique_graphs"]
    # (Dynamo's own patch: pytest's monkeypatch deletes a config entry it restores, and Dynamo then hides it)
    with torch._dynamo.config.patch(recompile_limit=1):
        for width in (1, 2, 3):  # 32 * width, 64 * width, 128 * width channels at 32 * width pixels
            narrow = spec.model_copy(update={"input": spec.input.model_copy(update={"size": 32 * width}),
                                             "stages": [s.model_copy(update={"dim": s.dim * width})
                                                        for s in spec.stages]})
            net = compile_graph(lower(narrow)).eval()
            x = torch.randn(1, narrow.input.channels, *narrow.input.hw)
            with torch.no_grad():
                torch.testing.assert_close(compiled(net, None, backend=recording)(x), net(x))
    assert counters["stats"]["unique_graphs"] - before == 3
    assert len(inputs) == 3
    sizes = [size for graph in inputs for value in graph
             for size in (value.shape if isinstance(value, torch.Tensor) else (value,))]
    assert sizes and all(type(size) is int for size in sizes), [s for s in sizes if type(s) is not int]


def test_compiled_model_records_its_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """``measure`` times what ``compiled`` gives for the mode and says so. Dynamo without Inductor here (a cold
    Inductor compile is about 30 s); tests/compile/test_compile.py runs ``compiled`` with Inductor."""
    measuring = importlib.import_module("metaformer_lab.latency.measure")  # the package's `measure` is the function
    real = measuring.compiled
    modes: list[str | None] = []
    calls = [0]

    def without_inductor(module: nn.Module, mode: str | None, backend: Any = "inductor") -> Any:
        modes.append(mode)
        function = real(module, None, backend="eager")

        def counted(x: torch.Tensor) -> Any:
            calls[0] += 1
            return function(x)

        return counted

    monkeypatch.setattr(measuring, "compiled", without_inductor)
    result = measure(TINY, compile="default", **FAST)
    _check_structure(result)
    assert modes == ["default"] and result.provenance.compile == "default"
    assert calls[0] >= result.runs >= FAST["min_runs"]  # what was timed is what `compiled` gave
    with pytest.raises(LatencyError, match="compile: 'fast' is not a torch.compile mode"):
        measure(TINY, compile="fast")
