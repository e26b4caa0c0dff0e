"""GPU latency estimates without a GPU: a per-kernel roofline from the typed graph against a named
GPU's datasheet (docs/architecture.md, "Latency"). With the default efficiency factors every number here is an
**uncalibrated estimate**, and says so; factors fitted on a GPU (:func:`fit_efficiency` on measured
kernels, or :mod:`.gpu_calibrate` on published whole-network measurements such as timm's benchmark
tables) make it a calibrated estimate for that GPU, or, pooled over several GPUs, an estimate "from
datasheet, factors fitted on ..." for any other. An estimate names its factors' origin in ``label``
and says when it extrapolates beyond the batch sizes they were fitted on.

Kernels. Each graph node's module is built on the ``meta`` device and run on a meta tensor of the
node's input type under a dispatch mode that records every aten kernel it launches: its FLOPs
(``torch.utils.flop_counter``'s formulas; SDPA on 4-D tensors as one fused attention kernel, on others as
PyTorch's math path), the bytes it reads
and writes (its input and output tensors at the dtype's element size) and its class. Views and
metadata ops (view, permute, expand, transpose, unsqueeze, detach, alias, ``_unsafe_view``...)
launch nothing. Nodes without a module of their own are costed analytically: a residual ``add`` is
one element-wise kernel over its output (plus a concatenation when it writes the prefix tokens
only), a ``layout`` change one copy (the permute is a view, but the next op makes it contiguous),
``prefix`` tokens two concatenations, a composite mixer's join its sums or its concatenation;
``input``, ``fork`` and ``prefix_view`` cost nothing. Records are cached by (node kind, role, op
config, input and output type, batch, dtype), so repeated blocks cost nothing.

Time per kernel: ``max(flops / (peak * eff_compute[class]), bytes / (bandwidth * eff_memory[class]))
+ launch`` (or, with ``Efficiency.sharpness`` p, the smooth ``(compute^p + memory^p)^(1/p)`` in place of
the max, as the factors fitted on timm's tables use). matmul, conv and attention run on tensor cores in
float16/bfloat16; in float32, matmul and attention use the float32 rate and conv the TF32 rate (PyTorch's defaults:
``torch.backends.cuda.matmul.allow_tf32 = False``, ``torch.backends.cudnn.allow_tf32 = True``).
Grouped and depthwise convs (``dwconv``) run on CUDA cores at the float32 rate. Every other class is
memory-bound (no FLOPs are counted for it). Factors pooled over several GPUs scale the tensor-core peak by the
GPU's board power per TFLOPS to a fitted power (``Efficiency.power_exponent``): a card with little power for its
rated peak does not hold the clock that peak assumes. The model is additive: it does not overlap the host's
kernel launches with the GPU's work.

Autocast (``amp``, :func:`graph_records`): the network runs as under ``torch.autocast`` (float32 weights
and input; matmuls, convs and attention in the low precision after a cast of each float32 operand,
weights included; norms, softmax and sums in float32; other ops at their inputs' promoted dtype), and
each tensor is counted at its own element size. That is how timm's benchmark tables were measured.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from metaformer_lab.core.errors import Issue, LatencyError
from metaformer_lab.core.meta import on_meta
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.cost import sdpa_formulas, stage_shared_surplus
from metaformer_lab.graph.lower import lower
from metaformer_lab.graph.nodes import LEAF_KINDS, build_node
from metaformer_lab.latency.measure import DTYPES
from metaformer_lab.ops.composite import ParallelSpec, SplitSpec
from metaformer_lab.ops.concat import ConcatSpec, concat_proj
from metaformer_lab.ops.gated import GatedSpec, gated_proj
from metaformer_lab.spec.load import SpecSource, read_spec, with_input_size

UNCALIBRATED = "uncalibrated estimate"
"""The label of every estimate made with efficiency factors that were not fitted on any GPU."""
CALIBRATED = "calibrated estimate"
"""The default label of an estimate made with factors fitted on the target GPU."""

OpClass = Literal["matmul", "conv", "dwconv", "attention", "norm", "softmax", "reduction", "elementwise", "copy"]
OP_CLASSES: tuple[OpClass, ...] = ("matmul", "conv", "dwconv", "attention", "norm", "softmax", "reduction",
                                   "elementwise", "copy")
TENSOR_CORE_CLASSES: frozenset[str] = frozenset({"matmul", "conv", "attention"})

DEFAULT_LAUNCH_US = 6.0
"""Per-kernel overhead: PyTorch eager spends about 5-8 us of host time per kernel at batch 1 (Python
module call, dispatcher, ``cudaLaunchKernel``); the GPU's own launch latency (2-3 us) is inside it."""


# --- datasheets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU. Tensor-core rates are dense (no sparsity) with float32 accumulation.

    Attributes:
        name: short key (``h100``).
        full_name: the product (``NVIDIA H100 SXM5 80GB``).
        fp32_tflops: peak float32, CUDA cores (no tensor cores).
        fp16_tflops: dense tensor-core float16.
        bf16_tflops: dense tensor-core bfloat16; None when the GPU has none.
        tf32_tflops: dense tensor-core TF32; None when the GPU has none.
        bandwidth_gbs: memory bandwidth, GB/s.
        memory_gb: memory size, GB.
        launch_us: per-kernel overhead, see :data:`DEFAULT_LAUNCH_US`.
        source: where the figures come from.
        board_power_w: the board's power limit, W (None: not known); see :attr:`watts_per_tflops`.
    """

    name: str
    full_name: str
    fp32_tflops: float
    fp16_tflops: float
    bf16_tflops: float | None
    tf32_tflops: float | None
    bandwidth_gbs: float
    memory_gb: float
    launch_us: float = DEFAULT_LAUNCH_US
    source: str = ""
    board_power_w: float | None = None

    @property
    def watts_per_tflops(self) -> float | None:
        """Board power per dense float16 tensor TFLOPS: how much power the card has to run its tensor cores at
        the clock its datasheet rates assume (4.9 W on a 350 W RTX 3090, 0.7 W on a 300 W RTX PRO 6000 Max-Q or a
        700 W H100). Pooled factors scale the tensor-core peak by it (:attr:`Efficiency.power_exponent`)."""
        return None if self.board_power_w is None else self.board_power_w / self.fp16_tflops

    @property
    def default_dtype(self) -> str:
        """What a model is deployed at on this GPU: float16, or bfloat16 where its rate is the higher one."""
        return "bfloat16" if self.bf16_tflops is not None and self.bf16_tflops > self.fp16_tflops else "float16"

    def peak_tflops(self, op_class: str, dtype: str) -> tuple[float, str | None]:
        """The peak rate a kernel of ``op_class`` runs against at ``dtype``, and a note when it falls back."""
        if op_class not in TENSOR_CORE_CLASSES:
            return self.fp32_tflops, None
        if dtype == "float16":
            return self.fp16_tflops, None
        if dtype == "bfloat16":
            if self.bf16_tflops is None:
                return self.fp32_tflops, (f"{self.name} has no bfloat16 tensor cores; bfloat16 kernels are "
                                          f"estimated at its float32 rate ({self.fp32_tflops:g} TFLOPS)")
            return self.bf16_tflops, None
        if op_class == "conv" and self.tf32_tflops is not None:
            return self.tf32_tflops, None  # cuDNN convs use TF32 by default (torch.backends.cudnn.allow_tf32)
        return self.fp32_tflops, None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


GPUS: Mapping[str, GpuSpec] = MappingProxyType({g.name: g for g in (
    GpuSpec("t4", "NVIDIA T4", 8.1, 65.0, None, None, 320.0, 16.0,
            source="NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1 TF, mixed-precision FP16/FP32 65 TF, 320 GB/s "
                   "GDDR6, 70 W; Turing has no bfloat16 or TF32",
            board_power_w=70.0),
    GpuSpec("l4", "NVIDIA L4", 30.3, 121.0, 121.0, 60.0, 300.0, 24.0,
            source="NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TF, FP16/BF16 242 TF and TF32 120 TF with "
                   "sparsity (halved here), 300 GB/s, 72 W",
            board_power_w=72.0),
    GpuSpec("a10", "NVIDIA A10", 31.2, 125.0, 125.0, 62.5, 600.0, 24.0,
            source="NVIDIA A10 Tensor Core GPU datasheet: FP32 31.2 TF, FP16/BF16 125 TF, TF32 62.5 TF (dense), "
                   "600 GB/s, 150 W",
            board_power_w=150.0),
    GpuSpec("a100", "NVIDIA A100 SXM4 80GB", 19.5, 312.0, 312.0, 156.0, 2039.0, 80.0,
            source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): FP32 19.5 TF, FP16/BF16 312 TF, TF32 156 TF "
                   "(dense), 2039 GB/s HBM2e, 400 W",
            board_power_w=400.0),
    GpuSpec("h100", "NVIDIA H100 SXM5 80GB", 67.0, 989.4, 989.4, 494.7, 3350.0, 80.0,
            source="NVIDIA H100 Tensor Core GPU datasheet (SXM): FP32 67 TF, FP16/BF16 1979 TF and TF32 989 TF "
                   "with sparsity (halved here), 3.35 TB/s HBM3, 700 W",
            board_power_w=700.0),
    GpuSpec("h200", "NVIDIA H200 SXM 141GB", 67.0, 989.4, 989.4, 494.7, 4800.0, 141.0,
            source="NVIDIA H200 Tensor Core GPU datasheet (SXM): H100 SXM compute, 4.8 TB/s HBM3e, 141 GB, 700 W",
            board_power_w=700.0),
    GpuSpec("rtx4090", "NVIDIA GeForce RTX 4090", 82.6, 165.2, 165.2, 82.6, 1008.0, 24.0,
            source="NVIDIA Ada Lovelace GPU architecture whitepaper (appendix): FP32 82.6 TF, FP16/BF16 tensor with "
                   "FP32 accumulate 165.2 TF and TF32 82.6 TF (dense), 1008 GB/s GDDR6X, 450 W",
            board_power_w=450.0),
    GpuSpec("rtx3090", "NVIDIA GeForce RTX 3090", 35.6, 71.0, 71.0, 35.6, 936.0, 24.0,
            source="NVIDIA Ampere GA102 GPU architecture whitepaper (appendix): FP32 35.6 TF, FP16/BF16 tensor with "
                   "FP32 accumulate 71 TF and TF32 35.6 TF (dense), 936 GB/s GDDR6X, 350 W",
            board_power_w=350.0),
    GpuSpec("rtx5090", "NVIDIA GeForce RTX 5090", 104.8, 209.5, 209.5, 104.8, 1792.0, 32.0,
            source="NVIDIA RTX Blackwell GPU architecture whitepaper (appendix): FP32 104.8 TF, FP16/BF16 tensor with "
                   "FP32 accumulate 209.5 TF and TF32 104.8 TF (dense), 1792 GB/s GDDR7, 575 W",
            board_power_w=575.0),
    GpuSpec("rtx-pro-6000", "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", 110.0, 440.0, 440.0, 110.0,
            1792.0, 96.0,
            source="NVIDIA RTX PRO 6000 Blackwell Max-Q datasheet (300 W): FP32 about 110 TF; 3511 AI TOPS (FP4, "
                   "sparse) give about 440 TF dense FP16/BF16 tensor with FP32 accumulate (full rate on professional "
                   "cards) and 110 TF TF32; 1792 GB/s GDDR7 ECC, 96 GB",
            board_power_w=300.0),
)})
"""Known GPUs by short name."""

_ALIASES = {"a100sxm": "a100", "a100sxm4": "a100", "a10080gb": "a100", "h100sxm": "h100", "h100sxm5": "h100",
            "h200sxm": "h200", "4090": "rtx4090", "geforcertx4090": "rtx4090", "3090": "rtx3090",
            "geforcertx3090": "rtx3090", "5090": "rtx5090", "geforcertx5090": "rtx5090", "rtxpro6000": "rtx-pro-6000",
            "rtxpro6000maxq": "rtx-pro-6000", "pro6000": "rtx-pro-6000", "pro6000maxq": "rtx-pro-6000",
            "rtxpro6000blackwellmaxq": "rtx-pro-6000", "rtxpro6000blackwellmaxqworkstationedition": "rtx-pro-6000"}


def _gpu_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower()).removeprefix("nvidia")


_BY_KEY = {_gpu_key(name): name for name in GPUS}


def gpu_spec(gpu: str | GpuSpec) -> GpuSpec:
    """The datasheet of ``gpu``, by short name (case, spaces and dashes ignored: ``"RTX 4090"``, ``"H100"``).

    Raises:
        LatencyError: unknown name, with the closest match and every known name.
    """
    if isinstance(gpu, GpuSpec):
        return gpu
    key = _gpu_key(gpu)
    key = _ALIASES.get(key, _BY_KEY.get(key, key))
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, [*GPUS, *_ALIASES], n=1, cutoff=0.5)
    hint = f" (did you mean '{_ALIASES.get(close[0], close[0])}'?)" if close else ""
    raise LatencyError.single("gpu", f"unknown '{gpu}'{hint}; known: {', '.join(sorted(GPUS))}")


# --- efficiency --------------------------------------------------------------------------------

DEFAULT_COMPUTE_EFFICIENCY: Mapping[str, float] = MappingProxyType({
    "matmul": 0.70,  # cuBLAS reaches 70-80 % of dense tensor peak on large GEMMs
    "conv": 0.55,  # implicit-GEMM convs, often with few channels, do worse
    "attention": 0.45,  # FlashAttention-2 forward: 35-50 % of peak on A100/H100
    "dwconv": 0.25,  # grouped and depthwise convs: CUDA cores (float32 rate), few FLOPs per byte
    **{c: 1.0 for c in ("norm", "softmax", "reduction", "elementwise", "copy")},  # no FLOPs counted
})
DEFAULT_MEMORY_EFFICIENCY: Mapping[str, float] = MappingProxyType({
    "matmul": 0.80, "conv": 0.70, "dwconv": 0.60, "attention": 0.70,
    "norm": 0.60, "softmax": 0.60, "reduction": 0.60,  # two passes and warp reductions
    "elementwise": 0.80,  # streaming kernels reach 80-90 % of the bandwidth on large tensors
    "copy": 0.70,  # strided gathers, concatenations
})


@dataclass(frozen=True)
class Efficiency:
    """Share of the peak rates that kernels of each class reach, and the per-kernel overhead.

    Attributes:
        compute: per class, share of the peak FLOP rate (missing classes: the defaults).
        memory: per class, share of the memory bandwidth.
        launch_us: per-kernel overhead; None: the GPU's ``launch_us``.
        calibrated: fitted on a real GPU by :func:`fit_efficiency`.
        gpu: the GPU it was fitted on (None: any).
        dtype: the dtype it was fitted at.
        source: how the factors were obtained.
        fitted_on: the GPUs whose measurements the factors were fitted on; with ``gpu`` None, factors
            pooled over several GPUs and applied to any GPU's datasheet (never ``calibrated`` for it).
        label: what an estimate made with these factors is called (None: the default labels).
        batch_range: the smallest and largest batch size the fit saw (None: not known).
        amp: the factors were fitted on autocast (mixed-precision) measurements; estimates made with them
            model autocast too unless told otherwise (:func:`estimate_gpu`).
        sharpness: a kernel's time is ``(compute^p + memory^p)^(1/p)`` with ``p`` this (a smooth roofline:
            compute and memory traffic overlap only partly); None: ``max(compute, memory)``.
        power_exponent: ``a``: the tensor-core peak a kernel runs against is the datasheet's times
            ``GpuSpec.watts_per_tflops ** a`` (:meth:`peak_tflops`). Factors pooled over several GPUs fit it:
            a card with little power per TFLOPS does not hold the clock its datasheet peak assumes. None (or 0):
            the datasheet peak, as for factors fitted on one GPU.
    """

    compute: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_COMPUTE_EFFICIENCY))
    memory: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MEMORY_EFFICIENCY))
    launch_us: float | None = None
    calibrated: bool = False
    gpu: str | None = None
    dtype: str | None = None
    source: str = "uncalibrated defaults (gpu.py)"
    fitted_on: tuple[str, ...] = ()
    label: str | None = None
    batch_range: tuple[int, int] | None = None
    amp: bool = False
    sharpness: float | None = None
    power_exponent: float | None = None

    def __post_init__(self) -> None:
        issues = [Issue(f"efficiency.{kind}.{c}", f"{v} must be a finite number > 0")
                  for kind, table in (("compute", self.compute), ("memory", self.memory))
                  for c, v in table.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
        if self.launch_us is not None and not (math.isfinite(self.launch_us) and self.launch_us >= 0):
            issues.append(Issue("efficiency.launch_us", f"{self.launch_us} must be a finite number >= 0"))
        if self.sharpness is not None and not (math.isfinite(self.sharpness) and self.sharpness >= 1):
            issues.append(Issue("efficiency.sharpness", f"{self.sharpness} must be a finite number >= 1"))
        if self.power_exponent is not None and not (math.isfinite(self.power_exponent)
                                                    and 0 <= self.power_exponent <= 1):
            issues.append(Issue("efficiency.power_exponent", f"{self.power_exponent} must be a number in [0, 1]"))
        if issues:
            raise LatencyError(issues)

    def compute_of(self, op_class: str) -> float:
        return self.compute.get(op_class, DEFAULT_COMPUTE_EFFICIENCY.get(op_class, 1.0))

    def memory_of(self, op_class: str) -> float:
        return self.memory.get(op_class, DEFAULT_MEMORY_EFFICIENCY.get(op_class, 0.7))

    def peak_tflops(self, gpu: GpuSpec, op_class: str, dtype: str) -> float:
        """The peak rate a kernel of ``op_class`` runs against on ``gpu`` at ``dtype``: the datasheet's
        (:meth:`GpuSpec.peak_tflops`), for tensor-core classes scaled by the GPU's power per TFLOPS
        (:attr:`power_exponent`; a GPU whose board power is not known keeps its datasheet peak)."""
        peak, _ = gpu.peak_tflops(op_class, dtype)
        if self.power_exponent and op_class in TENSOR_CORE_CLASSES and gpu.watts_per_tflops is not None:
            peak *= gpu.watts_per_tflops ** self.power_exponent
        return peak

    def to_json(self) -> dict[str, Any]:
        return {"compute": dict(self.compute), "memory": dict(self.memory), "launch_us": self.launch_us,
                "calibrated": self.calibrated, "gpu": self.gpu, "dtype": self.dtype, "source": self.source,
                "fitted_on": list(self.fitted_on), "label": self.label,
                "batch_range": list(self.batch_range) if self.batch_range else None, "amp": self.amp,
                "sharpness": self.sharpness, "power_exponent": self.power_exponent}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Efficiency:
        """The inverse of :meth:`to_json`; raises LatencyError (via the checks) on bad factors."""
        batch_range = raw.get("batch_range")
        return cls(compute={str(k): float(v) for k, v in raw["compute"].items()},
                   memory={str(k): float(v) for k, v in raw["memory"].items()},
                   launch_us=None if raw.get("launch_us") is None else float(raw["launch_us"]),
                   calibrated=bool(raw.get("calibrated", False)), gpu=raw.get("gpu"), dtype=raw.get("dtype"),
                   source=str(raw.get("source", "")), fitted_on=tuple(raw.get("fitted_on") or ()),
                   label=raw.get("label"), amp=bool(raw.get("amp", False)),
                   sharpness=None if raw.get("sharpness") is None else float(raw["sharpness"]),
                   power_exponent=None if raw.get("power_exponent") is None else float(raw["power_exponent"]),
                   batch_range=(int(batch_range[0]), int(batch_range[1])) if batch_range else None)

    @property
    def pooled(self) -> bool:
        """Factors fitted across several GPUs, applied to any GPU's datasheet."""
        return self.gpu is None and bool(self.fitted_on)


# --- kernel records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelRecord:
    """One kernel launch: its aten op (``aten.mm``), class, FLOPs (multiply-add = 2) and bytes moved."""

    op: str
    op_class: OpClass
    flops: int
    bytes_moved: int


_CLASS_OPS: dict[OpClass, tuple[str, ...]] = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "_int_mm", "_scaled_mm"),
    "conv": ("convolution", "_convolution", "cudnn_convolution", "convolution_overrideable", "_slow_conv2d_forward",
             "mkldnn_convolution", "_conv_depthwise2d", "slow_conv_dilated2d", "cudnn_convolution_transpose",
             "slow_conv_transpose2d"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                  "_efficient_attention_forward"),
    "norm": ("native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
             "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "_fused_rms_norm",
             "_batch_norm_with_update", "_batch_norm_no_update"),
    "softmax": ("_softmax", "_log_softmax", "_safe_softmax"),
    "reduction": ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
                  "argmax", "argmin", "logsumexp", "linalg_vector_norm", "norm", "cumsum", "avg_pool1d",
                  "avg_pool2d", "avg_pool3d", "max_pool2d_with_indices", "_low_memory_max_pool_with_offsets",
                  "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d"),
    "copy": ("cat", "stack", "clone", "copy_", "_to_copy", "index", "_unsafe_index", "index_select", "gather",
             "scatter", "index_put", "index_put_", "constant_pad_nd", "roll", "flip", "repeat", "narrow_copy",
             "tril", "triu", "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im", "upsample_nearest2d",
             "upsample_bilinear2d", "_upsample_bicubic2d_aa", "fill_", "zero_", "zeros", "ones", "full",
             "arange", "zeros_like", "ones_like", "full_like"),
}
_CLASS_OF: dict[str, OpClass] = {op: c for c, ops in _CLASS_OPS.items() for op in ops}
_NO_KERNEL = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                        "lift_fresh", "alias", "detach", "_reshape_alias", "resize_", "set_"})
_WHOLE = frozenset({"scaled_dot_product_attention"})  # one fused kernel on a GPU: never decomposed


def _fused_attention(args: Any) -> bool:
    """Whether an SDPA call can run as one fused kernel: every fused kernel (flash, memory-efficient, cuDNN, the
    CPU's) takes 4-D query, key and value; other shapes run PyTorch's math path (matmuls and a softmax), which
    is what the recorder then sees (timm's Twins-SVT local attention calls SDPA on 5-D tensors)."""
    return all(isinstance(t, Tensor) and t.dim() == 4 for t in args[:3])


def op_class(op_name: str) -> OpClass:
    """The class of an aten op by its packet name (``mm``); element-wise when not listed."""
    return _CLASS_OF.get(op_name, "elementwise")


def _tensor_bytes(t: Tensor, element_size: int | None) -> int:
    """Bytes of the distinct elements ``t`` covers (a broadcast input is read once), floating-point tensors
    at ``element_size`` (None: their own)."""
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    elements = min(t.numel(), extent) if t.numel() else 0
    return elements * (element_size if element_size is not None and t.is_floating_point() else t.element_size())


def _bytes(values: Any, element_size: int | None) -> int:
    return sum(_tensor_bytes(t, element_size) for t in tree_flatten(values)[0] if isinstance(t, Tensor))


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp): run in the lower precision, run in float32
# (``fp32`` and ``fp32_set_opt_dtype``); every other op runs at its inputs' promoted dtype.
_AMP_LOWER = frozenset({
    "conv1d", "conv2d", "conv3d", "_convolution", "convolution", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linear", "addbmm",
    "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention"})
_AMP_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm", "nuclear_norm",
    "cosine_similarity", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
    "upsample_bicubic2d", "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "sum"})


def _groups(name: str, args: Any, kwargs: Any) -> int:
    """The ``groups`` argument of an aten convolution (1 when absent)."""
    if name in ("convolution", "_convolution", "convolution_overrideable", "cudnn_convolution"):
        position = {"convolution": 8, "_convolution": 8, "convolution_overrideable": 8, "cudnn_convolution": 6}[name]
        value = kwargs.get("groups", args[position] if len(args) > position else 1)
        return int(value)
    return 1


class _KernelRecorder(TorchDispatchMode):
    """Records one :class:`KernelRecord` per aten op that launches a kernel; decomposes composite ops
    first (as FlopCounterMode does), except the fused attention kept whole (:data:`_WHOLE`)."""

    def __init__(self, element_size: int, amp: torch.dtype | None = None) -> None:
        super().__init__()
        self.element_size: int | None = None if amp is not None else element_size
        self.amp = amp
        self.records: list[KernelRecord] = []
        self.formulas = FlopCounterMode(display=False, custom_mapping=sdpa_formulas()).flop_registry

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        if packet is None:  # a higher-order operator: run it, record nothing
            return func(*args, **kwargs)
        name = packet.__name__
        if self.amp is not None and (name in _AMP_LOWER or name in _AMP_FP32):
            args, kwargs = self._autocast((args, kwargs), self.amp if name in _AMP_LOWER else torch.float32)
        if name not in _WHOLE or not _fused_attention(args):
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if not func.is_view and name not in _NO_KERNEL and any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            moved = _bytes((args, kwargs), self.element_size) + _bytes(out, self.element_size)
            kind = op_class(name)
            if kind == "conv" and _groups(name, args, kwargs) > 1:
                kind = "dwconv"  # grouped and depthwise convs do not run on tensor cores
            self.records.append(KernelRecord(f"aten.{name}", kind, self._flops(packet, args, kwargs, out), moved))
        return out

    def _autocast(self, values: Any, dtype: torch.dtype) -> Any:
        """``values`` with every floating-point tensor of another dtype cast to ``dtype``, as autocast does:
        one copy kernel per cast (weights included: autocast's cache ends with each forward)."""
        leaves, spec = tree_flatten(values)
        out = []
        for t in leaves:
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
                cast = t.to(dtype)
                self.records.append(KernelRecord("aten._to_copy", "copy", 0, _tensor_bytes(t, None)
                                                 + _tensor_bytes(cast, None)))
                t = cast
            out.append(t)
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten(out, spec)

    def _flops(self, packet: Any, args: Any, kwargs: Any, out: Any) -> int:
        if packet.__name__ == "scaled_dot_product_attention":
            return int(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
        formula: Callable[..., int] | None = self.formulas.get(packet)
        return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def module_records(module: nn.Module, input_shape: Sequence[int], *, dtype: str = "float16",
                   amp: bool = False) -> tuple[KernelRecord, ...]:
    """The kernels ``module(x)`` launches in eval mode, ``x`` of ``input_shape`` on the module's device
    (build it under ``with torch.device("meta")`` to record without memory); bytes at ``dtype``.

    The module runs in float32; floating-point tensors are counted at ``dtype``'s element size. With ``amp``: as
    under CUDA autocast at ``dtype`` (:func:`graph_records`), a float32 input, each tensor at its own size.
    """
    return _module_run(module, input_shape, dtype=dtype, amp=amp, in_size=4)[0]


def _module_run(module: nn.Module, input_shape: Sequence[int], *, dtype: str, amp: bool,
                in_size: int, context: nn.Module | None = None) -> tuple[tuple[KernelRecord, ...], int]:
    """(kernels, element size of the output). With ``amp`` the module runs as under CUDA autocast at
    ``dtype``: float32 weights, an input of ``in_size`` bytes per element, every tensor counted at its own
    element size; without, everything is counted at ``dtype``'s. ``context``: a module that makes the
    module's second argument from its input, run before the recording (a stage context its stage already made)."""
    device = next((p.device for p in module.parameters()), torch.device("meta"))
    low = DTYPES[_checked_dtype(dtype)]
    x = torch.empty(tuple(input_shape), device=device, dtype=torch.float32 if not amp or in_size == 4 else low)
    recorder = _KernelRecorder(low.itemsize, amp=low if amp else None)
    module.eval()
    with torch.inference_mode():
        extra = () if context is None else (context(x),)
    with torch.inference_mode(), recorder:  # composite ops (SDPA) reach the recorder whole
        out = module(x, *extra)
    first = next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()), None)
    return tuple(recorder.records), (first.element_size() if amp and first is not None else low.itemsize)


def _checked_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise LatencyError.single("dtype", f"'{dtype}' is not supported; use {', '.join(DTYPES)}")
    return dtype


# --- node records ------------------------------------------------------------------------------


@dataclass
class KernelCache:
    """Kernel records by node key (see the module docstring); share one across estimates of many specs."""

    records: dict[tuple[Any, ...], tuple[KernelRecord, ...]] = field(default_factory=dict)
    out_sizes: dict[tuple[Any, ...], int] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0


def _elementwise(op: str, elements: int, tensors: int, element_size: int) -> KernelRecord:
    """An analytic kernel touching ``tensors`` tensors of ``elements`` elements each."""
    return KernelRecord(op, op_class(op.removeprefix("aten.")), 0, elements * tensors * element_size)


def _add_records(node: dict[str, Any], batch: int, sizes: Sequence[int]) -> tuple[tuple[KernelRecord, ...], int]:
    """A residual add reads both summands and writes the sum (at the wider of their element sizes); when it
    writes the prefix tokens only, a concatenation then rebuilds the whole sequence."""
    summand, out = node["in_type"].numel(batch), node["out"].numel(batch)
    pair = [*sizes, *sizes][:2]
    es = max(pair)
    add = KernelRecord("aten.add", "elementwise", 0, summand * (sum(pair) + es))
    return ((add,) if out == summand else (add, _elementwise("aten.cat", out, 2, es))), es


def _prefix_records(node: dict[str, Any], batch: int, es: int, param_es: int) -> tuple[tuple[KernelRecord, ...], int]:
    """PrefixTokens: the learned tokens (``param_es`` bytes each) concatenated, then put in front of the sequence
    (at the wider element size)."""
    x, out = node["in_type"], node["out"]
    tokens = (out.prefix - x.prefix) * out.channels
    wide = max(es, param_es)
    return (_elementwise("aten.cat", tokens, 2, param_es),
            KernelRecord("aten.cat", "copy", 0, x.numel(batch) * es + tokens * batch * param_es
                         + out.numel(batch) * wide)), wide


def _join_records(graph: ArchGraph, name: str, batch: int, dtype: str, es: int,
                  amp: bool) -> tuple[KernelRecord, ...]:
    """A composite mixer's join: ``parallel`` sums its branches, ``split`` concatenates them, ``concat``
    concatenates them and runs its projection, ``gated`` with ``proj`` multiplies them and runs its projection, any
    other composite is taken as one pass over its branch outputs."""
    node = graph.nodes[name]
    spec, out = node["spec"], node["out"].numel(batch)
    branches = graph.in_degree(name)
    if isinstance(spec, ConcatSpec):
        with on_meta():
            proj, joined = concat_proj(spec, graph.nodes[node["fork"]]["in_type"])
        cat = _elementwise("aten.cat", joined.numel(batch), 2, es)
        return (cat, *_module_run(proj, joined.shape(batch), dtype=dtype, amp=amp, in_size=es)[0])
    if isinstance(spec, GatedSpec) and spec.proj:
        with on_meta():
            proj = gated_proj(spec, node["out"])
        return (_elementwise("aten.mul", out, 3, es),
                *_module_run(proj, node["out"].shape(batch), dtype=dtype, amp=amp, in_size=es)[0])
    if isinstance(spec, ParallelSpec):
        return tuple(_elementwise("aten.add", out, 3, es) for _ in range(branches - 1))
    if isinstance(spec, SplitSpec):
        return (_elementwise("aten.cat", out, 2, es),)
    return (_elementwise("aten.add", out, branches + 1, es),)


def _computed_records(graph: ArchGraph, name: str, batch: int, dtype: str, amp: bool = False,
                      sizes: Sequence[int] = (), shared: bool = False) -> tuple[tuple[KernelRecord, ...] | None, int]:
    """(the node's kernels, or None for a node kind this estimator does not know; its output's element size).
    ``sizes``: the element sizes of its inputs (under ``amp``: 4 or the low precision's; else ``dtype``'s).
    ``shared``: an earlier block of the stage made the context the node reads (GC-ViT's query generator, which
    the compiled stage runs once: :func:`metaformer_lab.compile.compiler.hoist_stage_context`), so its kernels are
    left out."""
    node, low = graph.nodes[name], DTYPES[dtype].itemsize
    es = max(sizes) if amp and sizes else (4 if amp else low)
    kind = node["kind"]
    if kind in ("input", "fork", "prefix_view", "collect"):  # collect: a concatenation of a few tokens
        return (), es
    if kind == "add":
        return _add_records(node, batch, list(sizes) if amp and sizes else [es, es])
    if kind == "prefix":
        return _prefix_records(node, batch, es, 4 if amp else low)
    if kind == "layout":
        return (_elementwise("aten.clone", node["out"].numel(batch), 2, es),), es
    if kind in LEAF_KINDS and graph.is_composite(name):
        return _join_records(graph, name, batch, dtype, es, amp), es
    if kind in LEAF_KINDS or kind == "scale":
        with on_meta():
            module = build_node(graph, name)
        context_name = getattr(module, "stage_context", None) if shared else None
        context = getattr(module, context_name) if context_name else None
        return _module_run(module, node["in_type"].shape(batch), dtype=dtype, amp=amp, in_size=es, context=context)
    return None, es


def _node_key(graph: ArchGraph, name: str, batch: int, dtype: str, amp: bool = False,
              sizes: Sequence[int] = (), shared: bool = False) -> tuple[Any, ...]:
    node = graph.nodes[name]
    spec = node["spec"]
    config = None if spec is None else (type(spec).__qualname__, spec.model_dump_json())
    composite = graph.is_composite(name)
    return (node["kind"], node["role"], config, composite, graph.in_degree(name), node["in_type"], node["out"],
            batch, dtype, *((amp, tuple(sizes)) if amp else ()), *(("shared",) if shared else ()))


def _cached_records(graph: ArchGraph, name: str, batch: int, dtype: str, cache: KernelCache | None, amp: bool,
                    sizes: Sequence[int], shared: bool = False) -> tuple[tuple[KernelRecord, ...] | None, int]:
    key = _node_key(graph, name, batch, dtype, amp, sizes, shared)
    if cache is not None and key in cache.records:
        cache.hits += 1
        return cache.records[key], cache.out_sizes.get(key, DTYPES[dtype].itemsize)
    records, out_size = _computed_records(graph, name, batch, dtype, amp, sizes, shared)
    if cache is not None and records is not None:
        cache.misses += 1
        cache.records[key] = records
        cache.out_sizes[key] = out_size
    return records, out_size


def node_records(graph: ArchGraph, name: str, *, batch_size: int = 1, dtype: str = "float16",
                 cache: KernelCache | None = None) -> tuple[KernelRecord, ...] | None:
    """The kernels node ``name`` launches at ``batch_size`` (None: a node kind not known here), every
    tensor at ``dtype`` (see :func:`graph_records` for autocast)."""
    return _cached_records(graph, name, batch_size, dtype, cache, False, ())[0]


def graph_records(graph: ArchGraph, *, batch_size: int = 1, dtype: str = "float16", amp: bool = False,
                  cache: KernelCache | None = None) -> dict[str, tuple[KernelRecord, ...] | None]:
    """Every node's kernels (None: a node kind not known here). With ``amp`` the network runs as under CUDA
    autocast at ``dtype`` (timm's benchmark tables, ``torch.autocast``): float32 weights and input, matmuls,
    convs and attention at ``dtype`` after a cast of each float32 operand, norms, softmax and sums in float32,
    every other op at its inputs' promoted dtype (a float32 layer scale or position embedding makes the
    residual stream float32). The element size flowing along each edge is tracked in topological order. What a
    stage runs once for its blocks (GC-ViT's query generator) is costed in its first block only."""
    import networkx as nx

    shared = stage_shared_surplus(graph, "flops")
    out_size: dict[str, int] = {}
    records: dict[str, tuple[KernelRecord, ...] | None] = {}
    for name in nx.topological_sort(graph):
        sizes = tuple(out_size[p] for p in graph.predecessors(name)) if amp else ()
        records[name], out_size[name] = _cached_records(graph, name, batch_size, dtype, cache, amp, sizes,
                                                        name in shared)
    return {name: records[name] for name in graph.nodes}


# --- the estimate ------------------------------------------------------------------------------


def kernel_ms(record: KernelRecord, gpu: GpuSpec, dtype: str, efficiency: Efficiency) -> float:
    """Roofline time of one kernel plus the launch overhead, in milliseconds."""
    peak = efficiency.peak_tflops(gpu, record.op_class, dtype)
    compute_s = record.flops / (peak * 1e12 * efficiency.compute_of(record.op_class)) if record.flops else 0.0
    memory_s = record.bytes_moved / (gpu.bandwidth_gbs * 1e9 * efficiency.memory_of(record.op_class))
    launch_us = gpu.launch_us if efficiency.launch_us is None else efficiency.launch_us
    return (roofline_s(compute_s, memory_s, efficiency.sharpness) + launch_us * 1e-6) * 1e3


def roofline_s(compute_s: float, memory_s: float, sharpness: float | None) -> float:
    """A kernel's time from its compute and memory times: their max, or with ``sharpness`` p the smooth
    ``(compute^p + memory^p)^(1/p)`` (partial overlap; p = 1 adds them, p -> infinity is the max)."""
    top = max(compute_s, memory_s)
    if sharpness is None or top <= 0:
        return top
    return top * ((compute_s / top) ** sharpness + (memory_s / top) ** sharpness) ** (1 / sharpness)


@dataclass(frozen=True)
class GpuEstimate:
    """An estimated GPU latency, labelled: ``calibrated`` is False unless the efficiency factors were fitted on
    this GPU, and ``label`` says where the factors came from.

    Attributes:
        total_ms: the estimated forward latency.
        nodes_ms: per graph node.
        parts_ms: per part (``stem``, ``stages.i``, ``head``).
        classes_ms: per kernel class.
        launch_ms: the share of ``total_ms`` that is per-kernel overhead.
        kernels: kernel launches.
        flops: FLOPs (multiply-add = 2).
        bytes_moved: bytes read and written by all kernels.
        gpu: the GPU's short name; ``gpu_name`` its product name.
        dtype: the dtype estimated at.
        amp: estimated as run under autocast at ``dtype`` (float32 weights; see :func:`graph_records`).
        extrapolates: why the estimate lies outside what its factors were fitted on (a batch size outside
            the fitted batch range), also appended to ``label``; None when inside or when nothing was fitted.
        batch_size: B.
        input_shape: the input's shape, batch included.
        calibrated: the efficiency was fitted on this GPU.
        label: ``"uncalibrated estimate"``, ``"calibrated estimate"`` (or the fitted profile's own label, which
            names its calibration), or ``"estimated from datasheet, factors fitted on ..."`` for pooled factors.
        notes: fallbacks and nodes left out.
        efficiency: the factors used.
        records: each node's kernels.
    """

    total_ms: float
    nodes_ms: dict[str, float]
    parts_ms: dict[str, float]
    classes_ms: dict[str, float]
    launch_ms: float
    kernels: int
    flops: int
    bytes_moved: int
    gpu: str
    gpu_name: str
    dtype: str
    batch_size: int
    input_shape: tuple[int, ...]
    calibrated: bool
    label: str
    notes: tuple[str, ...]
    efficiency: Efficiency
    records: dict[str, tuple[KernelRecord, ...]] = field(default_factory=dict, repr=False)
    amp: bool = False
    extrapolates: str | None = None

    def to_json(self, *, nodes: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict, label first; ``nodes`` adds the per-node breakdown."""
        keys = ("label", "calibrated", "extrapolates", "total_ms", "gpu", "gpu_name", "dtype", "amp", "batch_size",
                "launch_ms", "kernels",
                "flops", "bytes_moved", "parts_ms", "classes_ms")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out.update(input_shape=list(self.input_shape), notes=list(self.notes), efficiency=self.efficiency.to_json())
        if nodes:
            out["nodes_ms"] = dict(self.nodes_ms)
        return out


def _graph_of(graph_or_spec: ArchGraph | SpecSource, input_size: int | None) -> ArchGraph:
    if isinstance(graph_or_spec, ArchGraph) and input_size is None:
        return graph_or_spec
    spec = graph_or_spec.spec if isinstance(graph_or_spec, ArchGraph) else read_spec(graph_or_spec)
    return lower(with_input_size(spec, input_size))


def estimate_label(efficiency: Efficiency, gpu: GpuSpec, dtype: str) -> tuple[bool, str, list[str]]:
    """(calibrated, label, notes): factors fitted on another GPU or dtype do not make an estimate calibrated;
    factors pooled over several GPUs make it an estimate from the datasheet that names them."""
    if efficiency.pooled:
        if efficiency.dtype not in (None, dtype):
            return False, UNCALIBRATED, [f"factors fitted at {efficiency.dtype}, applied at {dtype}"]
        return False, efficiency.label or pooled_label(efficiency.fitted_on), []
    if not efficiency.calibrated:
        return False, UNCALIBRATED, []
    if efficiency.gpu not in (None, gpu.name) or efficiency.dtype not in (None, dtype):
        return False, UNCALIBRATED, [f"efficiency fitted on {efficiency.gpu} {efficiency.dtype}, applied to "
                                     f"{gpu.name} {dtype}"]
    return True, efficiency.label or CALIBRATED, []


def pooled_label(gpus: Sequence[str]) -> str:
    """The label of an estimate from a datasheet with factors fitted on ``gpus``."""
    return f"estimated from datasheet, factors fitted on {', '.join(gpus)}"


def _node_times(records: Mapping[str, tuple[KernelRecord, ...]], gpu: GpuSpec, dtype: str,
                efficiency: Efficiency) -> tuple[dict[str, float], dict[str, float]]:
    """(ms per node, ms per kernel class)."""
    nodes_ms: dict[str, float] = {}
    classes_ms = dict.fromkeys(OP_CLASSES, 0.0)
    for name, kernels in records.items():
        times = [kernel_ms(k, gpu, dtype, efficiency) for k in kernels]
        nodes_ms[name] = sum(times)
        for kernel, ms in zip(kernels, times, strict=True):
            classes_ms[kernel.op_class] += ms
    return nodes_ms, {c: ms for c, ms in classes_ms.items() if ms}


def _summary(graph: ArchGraph, records: dict[str, tuple[KernelRecord, ...]], gpu: GpuSpec, dtype: str,
             batch_size: int, efficiency: Efficiency, notes: list[str], amp: bool = False) -> GpuEstimate:
    nodes_ms, classes_ms = _node_times(records, gpu, dtype, efficiency)
    parts_ms: dict[str, float] = {}
    for name, ms in nodes_ms.items():
        if name != "input":
            group = graph.nodes[name]["group"]
            parts_ms[group] = parts_ms.get(group, 0.0) + ms
    kernels = [k for ks in records.values() for k in ks]
    fallbacks = sorted({note for k in kernels if (note := gpu.peak_tflops(k.op_class, dtype)[1]) is not None})
    if efficiency.power_exponent and gpu.watts_per_tflops is None:
        fallbacks.append(f"{gpu.name}'s board power is not known: its tensor-core peak is not scaled by power "
                         "per TFLOPS as the factors assume")
    calibrated, label, label_notes = estimate_label(efficiency, gpu, dtype)
    extrapolates = None
    if label != UNCALIBRATED and efficiency.batch_range is not None:
        lo, hi = efficiency.batch_range
        if not lo <= batch_size <= hi:
            extrapolates = (f"batch {batch_size} is outside the fitted batch range {lo}-{hi}" +
                            (" (a small batch is launch-bound: host overhead the tables barely see)"
                             if batch_size < lo else ""))
            label = f"{label}; extrapolated to batch {batch_size}"
    launch_us = gpu.launch_us if efficiency.launch_us is None else efficiency.launch_us
    return GpuEstimate(
        total_ms=sum(nodes_ms.values()), nodes_ms=nodes_ms, parts_ms=parts_ms, classes_ms=classes_ms,
        launch_ms=len(kernels) * launch_us * 1e-3, kernels=len(kernels), flops=sum(k.flops for k in kernels),
        bytes_moved=sum(k.bytes_moved for k in kernels), gpu=gpu.name, gpu_name=gpu.full_name, dtype=dtype,
        batch_size=batch_size, input_shape=graph.input_type.shape(batch_size), calibrated=calibrated, label=label,
        notes=tuple([*fallbacks, *notes, *label_notes]), efficiency=efficiency, records=records, amp=amp,
        extrapolates=extrapolates)


def estimate_gpu(graph_or_spec: ArchGraph | SpecSource, gpu: str | GpuSpec, *, batch_size: int = 1,
                 dtype: str = "float16", efficiency: Efficiency | None = None, input_size: int | None = None,
                 cache: KernelCache | None = None, amp: bool | None = None) -> GpuEstimate:
    """Estimate the eager forward latency of a graph or spec on ``gpu`` without one (module docstring).

    Args:
        graph_or_spec: an ``ArchGraph``, an ``ArchSpec`` or a spec source (path, zoo name, mapping).
        gpu: a short name from :data:`GPUS` or a :class:`GpuSpec`.
        batch_size: B.
        dtype: ``float16``, ``bfloat16`` or ``float32``.
        efficiency: per-class factors; None: the uncalibrated defaults.
        input_size: square input size overriding the spec's.
        cache: kernel records shared between calls.
        amp: estimate the network as run under autocast at ``dtype`` (:func:`graph_records`); None: as the
            efficiency factors were fitted (``efficiency.amp``), never for float32.

    Raises:
        LatencyError: unknown GPU or dtype, batch size below 1.
        SpecError: an invalid spec.
    """
    spec_gpu = gpu_spec(gpu)
    _checked_dtype(dtype)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatencyError.single("batch_size", f"{batch_size} must be an integer >= 1")
    graph = _graph_of(graph_or_spec, input_size)
    cache = KernelCache() if cache is None else cache
    efficiency = efficiency or Efficiency()
    autocast = (efficiency.amp if amp is None else amp) and dtype != "float32"
    records: dict[str, tuple[KernelRecord, ...]] = {}
    unknown: set[str] = set()
    for name, node in graph_records(graph, batch_size=batch_size, dtype=dtype, amp=autocast, cache=cache).items():
        if node is None:
            unknown.add(graph.nodes[name]["kind"])
        records[name] = node or ()
    notes = [f"nodes of kind '{k}' are not costed" for k in sorted(unknown)]
    return _summary(graph, records, spec_gpu, dtype, batch_size, efficiency, notes, autocast)


# --- calibration -------------------------------------------------------------------------------

_GRID_LOW, _GRID_HIGH = math.log(0.005), math.log(2.0)  # efficiency factors searched between 0.5 % and 200 %
_GRID_POINTS = 25  # per axis and refinement level
_LAUNCH_POINTS = 9


def _fit_class(compute_s: Tensor, memory_s: Tensor, launch_s: float, measured_s: Tensor) -> tuple[float, float,
                                                                                                 float]:
    """(eff_compute, eff_memory, mean squared log error) fitting ``measured ~ max(compute/ec, memory/em) +
    launch``: a log-spaced grid search refined three times around the best point. The error is taken on
    the whole kernel time, so kernels that are all launch overhead say little about the factors."""
    lo_c = lo_m = _GRID_LOW
    hi_c = hi_m = _GRID_HIGH
    log_measured = measured_s.log()
    best = (1.0, 1.0, math.inf)
    for _ in range(4):
        grid_c = torch.linspace(lo_c, hi_c, _GRID_POINTS, dtype=torch.float64).exp()
        grid_m = torch.linspace(lo_m, hi_m, _GRID_POINTS, dtype=torch.float64).exp()
        pred = torch.maximum(compute_s[None, None, :] / grid_c[:, None, None],
                             memory_s[None, None, :] / grid_m[None, :, None]) + launch_s
        loss = ((pred.log() - log_measured) ** 2).mean(-1)
        i, j = divmod(int(loss.argmin()), loss.shape[1])
        best = (float(grid_c[i]), float(grid_m[j]), float(loss[i, j]))
        step_c, step_m = (hi_c - lo_c) / (_GRID_POINTS - 1), (hi_m - lo_m) / (_GRID_POINTS - 1)
        lo_c, hi_c = math.log(best[0]) - step_c, math.log(best[0]) + step_c
        lo_m, hi_m = math.log(best[1]) - step_m, math.log(best[1]) + step_m
    return best


def _identified(ec: float, em: float, compute_s: Tensor, memory_s: Tensor, prior_c: float,
                prior_m: float) -> tuple[float, float]:
    """A factor no record is bound by is not identified by the data: keep the prior, raised to the
    lowest value that leaves every record bound as fitted."""
    compute_bound = compute_s / ec > memory_s / em
    if not bool(compute_bound.any()):
        ec = max(prior_c, float((compute_s * em / memory_s).max()))
    if bool(compute_bound.all()):
        em = max(prior_m, float((memory_s * ec / compute_s).max()))
    return ec, em


@dataclass(frozen=True)
class _Fit:
    compute: dict[str, float]
    memory: dict[str, float]
    loss: float


def _fit_at(launch_s: float, by_class: dict[str, tuple[Tensor, Tensor, Tensor]], prior: Efficiency) -> _Fit:
    """Per-class factors with the launch overhead fixed at ``launch_s``; loss summed over records."""
    compute, memory, total = dict(prior.compute), dict(prior.memory), 0.0
    for c, (compute_s, memory_s, measured_s) in by_class.items():
        ec, em, loss = _fit_class(compute_s, memory_s, launch_s, measured_s)
        compute[c], memory[c] = _identified(ec, em, compute_s, memory_s, prior.compute_of(c), prior.memory_of(c))
        total += loss * len(measured_s)
    return _Fit(compute, memory, total)


def _fit_launch(by_class: dict[str, tuple[Tensor, Tensor, Tensor]], prior: Efficiency, ceiling_s: float) -> float:
    """The launch overhead (seconds) minimising the total loss, in [0, ceiling_s]: grid, then two refinements."""
    lo, hi = 0.0, ceiling_s
    best = 0.0
    for _ in range(3):
        candidates = torch.linspace(lo, hi, _LAUNCH_POINTS, dtype=torch.float64).tolist()
        best = min(candidates, key=lambda s: _fit_at(s, by_class, prior).loss)
        step = (hi - lo) / (_LAUNCH_POINTS - 1)
        lo, hi = max(0.0, best - step), min(ceiling_s, best + step)
    return best


def _fit_inputs(records: Sequence[KernelRecord], measured_ms: Sequence[float], gpu: GpuSpec,
                dtype: str) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per class: (seconds at full compute rate, seconds at full bandwidth, measured seconds)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for record, ms in zip(records, measured_ms, strict=True):
        peak, _ = gpu.peak_tflops(record.op_class, dtype)
        rows.setdefault(record.op_class, []).append(
            (record.flops / (peak * 1e12), record.bytes_moved / (gpu.bandwidth_gbs * 1e9), ms * 1e-3))
    return {c: tuple(torch.tensor(v, dtype=torch.float64).unbind(1)) for c, v in rows.items()}  # type: ignore[misc]


def fit_efficiency(records: Sequence[KernelRecord], measured_ms: Sequence[float], gpu: str | GpuSpec, *,
                   dtype: str = "float16", launch_us: float | None = None,
                   prior: Efficiency | None = None) -> Efficiency:
    """Fit the per-class efficiency factors (and the launch overhead) to kernels measured on a real GPU.

    Minimises the squared log error between :func:`kernel_ms` and ``measured_ms`` per class by grid
    search. A factor that no record is bound by keeps the prior's value (see :func:`_identified`).

    Args:
        records: kernels (e.g. :func:`module_records` of single ops at many sizes).
        measured_ms: their measured latencies, same order.
        gpu: the GPU they were measured on.
        dtype: the dtype they ran at.
        launch_us: fixed per-kernel overhead; None: fitted between 0 and the fastest kernel.
        prior: factors kept where the data says nothing; None: the defaults.

    Raises:
        LatencyError: mismatched lengths, no records, or a measurement not finite and positive.
    """
    spec_gpu, prior = gpu_spec(gpu), prior or Efficiency()
    _checked_dtype(dtype)
    issues = [Issue(f"measured_ms[{i}]", f"{ms} must be a finite number > 0") for i, ms in enumerate(measured_ms)
              if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0)]
    if not records or len(records) != len(measured_ms):
        issues.insert(0, Issue("measured_ms", f"{len(measured_ms)} measurements for {len(records)} records; "
                                              "give one per record, at least one"))
    if issues:
        raise LatencyError(issues)
    by_class = _fit_inputs(records, measured_ms, spec_gpu, dtype)
    launch_s = _fit_launch(by_class, prior, 0.999e-3 * min(measured_ms)) if launch_us is None else launch_us * 1e-6
    fit = _fit_at(launch_s, by_class, prior)
    return replace(prior, compute=fit.compute, memory=fit.memory, launch_us=launch_s * 1e6, calibrated=True,
                   gpu=spec_gpu.name, dtype=dtype, source=f"fitted on {len(records)} kernels measured on "
                                                           f"{spec_gpu.name} ({dtype})")


__all__ = ["CALIBRATED", "GPUS", "UNCALIBRATED", "Efficiency", "GpuEstimate", "GpuSpec", "KernelCache", "KernelRecord",
           "estimate_gpu", "fit_efficiency", "gpu_spec", "graph_records", "kernel_ms", "module_records", "node_records",
           "pooled_label", "roofline_s"]
