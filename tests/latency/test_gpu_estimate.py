"""GPU estimates without a GPU: kernel records, roofline behaviour, labels, the datasheet table, calibration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from metaformer_lab.core.errors import LatencyError, MetaformerLabError
from metaformer_lab.core.meta import on_meta
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency.gpu import (
    GPUS,
    UNCALIBRATED,
    Efficiency,
    GpuSpec,
    KernelCache,
    KernelRecord,
    estimate_gpu,
    fit_efficiency,
    gpu_spec,
    kernel_ms,
    module_records,
)
from metaformer_lab.spec.load import read_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_caformer.yaml"


@pytest.fixture(scope="module")
def tiny() -> ArchGraph:
    return lower(read_spec(TINY))


@pytest.fixture(scope="module")
def poolformer() -> ArchGraph:
    return lower(read_spec("poolformer_s12"))


def _meta(module_fn: type[nn.Module], *args: int) -> nn.Module:
    with torch.device("meta"):
        return module_fn(*args)


def _ms(module: nn.Module, shape: tuple[int, ...], gpu: str = "h100", dtype: str = "float16") -> float:
    spec = gpu_spec(gpu)
    return sum(kernel_ms(r, spec, dtype, Efficiency()) for r in module_records(module, shape, dtype=dtype))


# --- kernel records ----------------------------------------------------------------------------


def test_a_linear_layer_is_one_matmul_with_its_flops_and_bytes() -> None:
    records = module_records(_meta(nn.Linear, 64, 32), (4, 64), dtype="float16")
    assert [(r.op, r.op_class) for r in records] == [("aten.addmm", "matmul")]
    assert records[0].flops == 2 * 4 * 64 * 32
    assert records[0].bytes_moved == (4 * 64 + 64 * 32 + 32 + 4 * 32) * 2  # input, weight, bias, output


def test_views_launch_no_kernel() -> None:
    class Views(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 1).unsqueeze(0).transpose(1, 2).expand(3, -1, -1, -1).detach()

    assert module_records(Views(), (2, 4, 8)) == ()


def test_fused_attention_is_one_kernel_with_the_attention_formula() -> None:
    class Attention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(x, x, x)

    records = module_records(Attention(), (2, 4, 64, 32))
    assert [(r.op_class, r.flops) for r in records] == [("attention", 2 * 2 * (2 * 4 * 64 * 64 * 32))]


def test_attention_on_5d_tensors_runs_the_math_path() -> None:
    """No fused kernel takes 5-D query, key and value (timm's Twins-SVT local attention passes them): PyTorch runs
    the explicit path, two batched matmuls around a softmax, and the recorder sees those."""
    class Attention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(x, x, x)

    records = module_records(Attention(), (2, 3, 4, 49, 32))
    classes = [r.op_class for r in records]
    assert "attention" not in classes and classes.count("softmax") == 1
    matmuls = [r for r in records if r.op_class == "matmul"]
    assert [r.op for r in matmuls] == ["aten.bmm", "aten.bmm"]
    assert sum(r.flops for r in matmuls) == 2 * 2 * (2 * 3 * 4 * 49 * 49 * 32)


def test_estimate_flops_equal_the_cost_model(tiny: ArchGraph, poolformer: ArchGraph) -> None:
    """GC-ViT included: its stage runs one query generator for all its global blocks, and so does the estimate."""
    for graph in (tiny, poolformer, lower(read_spec("gcvit_xxtiny"))):
        assert estimate_gpu(graph, "h100").flops == graph_cost(graph).flops


KERNEL_CLASSES = ("matmul", "conv", "dwconv", "attention", "softmax", "norm", "reduction")


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["gcvit_xxtiny", "twins_svt_small", "swin_tiny_patch4_window7_224",
                                  "vit_tiny_patch16_224", "convnext_atto", "poolformer_s12"])
def test_a_zoo_models_kernels_are_the_ones_timms_module_launches(name: str) -> None:
    """What the estimate costs is what timm's module runs (the tables it is fitted on measured timm's modules):
    the same compute kernels class by class, and the same FLOPs. Explicit attention where timm's is explicit
    (GC-ViT; Twins-SVT, whose SDPA on 5-D tensors no fused kernel takes), fused where timm's is fused, GC-ViT's
    query generator once per stage. Element-wise kernels and copies may differ by a few (layout changes)."""
    import timm

    from metaformer_lab.latency.gpu import graph_records
    from metaformer_lab.zoo.models import catalog

    size = read_spec(name).input.hw[0]
    with on_meta():
        reference = timm.create_model(catalog()[name].timm_name, pretrained=False)
    theirs = module_records(reference, (2, 3, size, size))
    ours = [k for ks in graph_records(lower(read_spec(name)), batch_size=2).values() for k in ks or ()]
    for cls in KERNEL_CLASSES:
        assert sum(k.op_class == cls for k in ours) == sum(k.op_class == cls for k in theirs), cls
    assert sum(k.flops for k in ours) == pytest.approx(sum(k.flops for k in theirs), rel=1e-3)


def test_repeated_nodes_come_from_the_cache(poolformer: ArchGraph) -> None:
    cache = KernelCache()
    first = estimate_gpu(poolformer, "h100", cache=cache)
    assert 0 < cache.misses < len(poolformer.nodes) / 2  # 12 blocks, a few distinct configs
    misses = cache.misses
    again = estimate_gpu(poolformer, "t4", cache=cache)
    assert cache.misses == misses
    assert again.kernels == first.kernels


# --- roofline behaviour ------------------------------------------------------------------------


def test_a_compute_bound_op_doubles_with_its_flops() -> None:
    mlp = _meta(nn.Linear, 4096, 4096)
    once, twice = _ms(mlp, (64 * 256, 4096)), _ms(mlp, (128 * 256, 4096))
    assert 1.8 < twice / once < 2.05


def test_a_launch_bound_op_does_not() -> None:
    tiny_op = _meta(nn.Linear, 8, 8)
    once, twice = _ms(tiny_op, (1, 8)), _ms(tiny_op, (2, 8))
    assert twice / once < 1.05


def test_a_spec_doubles_with_its_batch_when_compute_bound_not_when_launch_bound(tiny: ArchGraph,
                                                                                 poolformer: ArchGraph) -> None:
    big = [estimate_gpu(poolformer, "a100", batch_size=b, dtype="float32").total_ms for b in (64, 128)]
    assert 1.8 < big[1] / big[0] < 2.05
    small = [estimate_gpu(tiny, "a100", batch_size=b).total_ms for b in (1, 2)]
    assert small[1] / small[0] < 1.1


@pytest.mark.parametrize("source", [TINY, "poolformer_s12"], ids=["tiny_caformer", "poolformer_s12"])
def test_h100_is_faster_than_t4(source: Path | str) -> None:
    spec = read_spec(source)
    assert estimate_gpu(spec, "h100", batch_size=8).total_ms < estimate_gpu(spec, "t4", batch_size=8).total_ms


def test_float16_is_faster_than_float32_when_compute_bound(poolformer: ArchGraph) -> None:
    half = estimate_gpu(poolformer, "l4", batch_size=64, dtype="float16")
    full = estimate_gpu(poolformer, "l4", batch_size=64, dtype="float32")
    assert half.total_ms < 0.7 * full.total_ms


def test_the_input_size_override_rebuilds_the_graph(tiny: ArchGraph) -> None:
    bigger = estimate_gpu(tiny, "h100", input_size=64)
    assert bigger.input_shape == (1, 3, 64, 64)
    assert bigger.flops > 3 * estimate_gpu(tiny, "h100").flops


# --- labels and datasheets ---------------------------------------------------------------------


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_estimate_is_labelled_uncalibrated(tiny: ArchGraph, gpu: str, dtype: str) -> None:
    estimate = estimate_gpu(tiny, gpu, dtype=dtype)
    assert estimate.label == UNCALIBRATED == "uncalibrated estimate"
    assert not estimate.calibrated
    data = json.loads(json.dumps(estimate.to_json(nodes=True)))
    assert data["label"] == UNCALIBRATED and data["calibrated"] is False
    assert data["total_ms"] == pytest.approx(sum(data["nodes_ms"].values()))
    assert data["total_ms"] == pytest.approx(sum(data["parts_ms"].values()))


def test_bfloat16_on_t4_falls_back_with_a_note(tiny: ArchGraph) -> None:
    estimate = estimate_gpu(tiny, "t4", dtype="bfloat16")
    assert any("no bfloat16" in note for note in estimate.notes)
    assert not estimate_gpu(tiny, "h100", dtype="bfloat16").notes


def test_factors_fitted_on_another_gpu_leave_the_estimate_uncalibrated(tiny: ArchGraph) -> None:
    fitted = Efficiency(calibrated=True, gpu="a100", dtype="float16", source="test")
    assert estimate_gpu(tiny, "a100", efficiency=fitted).label == "calibrated estimate"
    other = estimate_gpu(tiny, "h100", efficiency=fitted)
    assert other.label == UNCALIBRATED and not other.calibrated
    assert any("fitted on a100" in note for note in other.notes)


def test_datasheet_figures() -> None:
    h100, h200, a100, t4 = GPUS["h100"], GPUS["h200"], GPUS["a100"], GPUS["t4"]
    assert (h100.fp32_tflops, h100.fp16_tflops, h100.bandwidth_gbs) == (67.0, 989.4, 3350.0)
    assert (h200.fp16_tflops, h200.bandwidth_gbs) == (h100.fp16_tflops, 4800.0)
    assert (a100.fp32_tflops, a100.bf16_tflops, a100.bandwidth_gbs) == (19.5, 312.0, 2039.0)
    assert t4.bf16_tflops is None and t4.tf32_tflops is None
    for gpu in GPUS.values():
        assert gpu.source and gpu.launch_us > 0
        assert gpu.fp16_tflops > gpu.fp32_tflops and gpu.memory_gb > 0


@pytest.mark.parametrize("name, expected", [("H100", "h100"), ("RTX 4090", "rtx4090"), ("NVIDIA A100", "a100"),
                                            ("a100-sxm4", "a100")])
def test_gpu_names_are_forgiving(name: str, expected: str) -> None:
    assert gpu_spec(name).name == expected


def test_an_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(LatencyError) as err:
        gpu_spec("h1000")
    message = str(err.value)
    assert message.startswith("gpu: unknown 'h1000' (did you mean 'h100'?)")
    assert all(name in message for name in GPUS)
    assert isinstance(err.value, MetaformerLabError)


def test_bad_dtype_and_batch_size_are_refused(tiny: ArchGraph) -> None:
    with pytest.raises(LatencyError, match="dtype: 'float64' is not supported"):
        estimate_gpu(tiny, "h100", dtype="float64")
    with pytest.raises(LatencyError, match="batch_size: 0 must be"):
        estimate_gpu(tiny, "h100", batch_size=0)
    with pytest.raises(LatencyError, match="efficiency.memory.copy"):
        Efficiency(memory={"copy": 0.0})


# --- calibration -------------------------------------------------------------------------------


def _synthetic_records() -> list[KernelRecord]:
    records = []
    for rows in (1, 16, 256, 4096, 16384):
        for width in (64, 1024, 4096):
            records.append(KernelRecord("aten.mm", "matmul", 2 * rows * width * width,
                                        (2 * rows * width + width * width) * 2))
            records.append(KernelRecord("aten.convolution", "conv", 18 * rows * width * width,
                                        (2 * rows * width + 9 * width * width) * 2))
    records += [KernelRecord("aten.mul", "elementwise", 0, int(n)) for n in (1e3, 1e5, 1e7, 1e9)]
    return records


def test_fit_efficiency_recovers_known_factors() -> None:
    truth = Efficiency(compute={"matmul": 0.62, "conv": 0.41}, memory={"matmul": 0.75, "conv": 0.55,
                                                                      "elementwise": 0.83}, launch_us=4.5)
    gpu: GpuSpec = GPUS["h100"]
    records = _synthetic_records()
    rng = random.Random(0)
    measured = [kernel_ms(r, gpu, "float16", truth) * (1 + rng.gauss(0, 0.01)) for r in records]
    fitted = fit_efficiency(records, measured, "h100", dtype="float16")
    assert fitted.calibrated and fitted.gpu == "h100" and fitted.dtype == "float16"
    for cls, value in truth.compute.items():
        assert fitted.compute[cls] == pytest.approx(value, rel=0.05)
    for cls, value in truth.memory.items():
        assert fitted.memory[cls] == pytest.approx(value, rel=0.05)
    assert fitted.launch_us == pytest.approx(4.5, rel=0.1)
    assert fitted.memory["norm"] == Efficiency().memory["norm"]  # no norm kernel measured: the prior stays
    assert fitted.compute["elementwise"] == Efficiency().compute["elementwise"]


def test_fit_efficiency_refuses_mismatched_input() -> None:
    records = _synthetic_records()[:3]
    with pytest.raises(LatencyError) as err:
        fit_efficiency(records, [1.0, float("nan")], "h100")
    paths = [issue.path for issue in err.value.issues]
    assert paths == ["measured_ms", "measured_ms[1]"]
