"""Scale-aware modulation (Lin et al., "Scale-Aware Modulation Meet Transformer", ICCV 2023, arXiv 2307.08579): a
token mixer whose heads each see a depthwise conv of a different kernel (multi-head mixed convolution), mixed across
heads by a grouped 1x1 conv (scale-aware aggregation); the result modulates a value projection."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    MAX_KERNEL,
    Act,
    OddKernel,
    Prob,
    make_act,
    pointwise,
    require_layout,
    require_no_prefix,
)
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import BatchNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class ScaleAwareModulationSpec(GridOpSpec):
    """Scale-aware modulation (SMT's ``Attention`` with ``ca_attention=1``): ``proj(agg(mhmc(s(x))) * v(x))``.

    ``s`` and ``v`` are channel projections. Multi-head mixed convolution (mhmc): the C channels of ``s(x)`` split
    into ``num_heads`` contiguous heads, head i convolved depthwise with kernel ``kernel + kernel_step * i``.
    Scale-aware aggregation (agg): the heads' outputs interleaved (channel ``g * num_heads + i`` is channel g of
    head i), a 1x1 conv in C / num_heads groups (each group mixes one channel of every head) widening by
    ``expand_ratio``, the norm and the activation, then a 1x1 conv back to C: the modulator.
    """

    type: Literal["scale_aware_modulation"] = "scale_aware_modulation"
    num_heads: int = Field(4, ge=1, le=16, description="heads of the mixed convolution (SMT's ca_num_heads)")
    kernel: OddKernel = Field(3, description="depthwise kernel of head 0")
    kernel_step: int = Field(2, ge=0, le=MAX_KERNEL, multiple_of=2,
                             description="kernel growth per head (kernels stay odd)")
    expand_ratio: int = Field(2, ge=1, le=16, description="width of the aggregation's hidden layer, times C")
    qkv_bias: bool = Field(True, description="bias of the s and v projections (SMT's qkv_bias)")
    norm: NormSpec | None = Field(default_factory=BatchNormSpec,
                                  description="norm on the aggregation's hidden layer; null: none")
    act: Act = Field("gelu", description="after the aggregation's norm")
    proj_drop: Prob = 0.0


def _kernels(spec: ScaleAwareModulationSpec) -> list[int]:
    return [spec.kernel + spec.kernel_step * i for i in range(spec.num_heads)]


class ScaleAwareModulation(nn.Module):
    """Scale-aware modulation on maps (1x1 convs) or on channels-last tokens (Linear layers).

    Module names are the authors' (``v``, ``s``, ``proj0``, ``bn``, ``proj1``, ``proj``) but for the per-head
    depthwise convs: ``local_conv.i`` is their ``local_conv_{i + 1}``.
    """

    def __init__(self, dim: int, kernels: list[int], expand_ratio: int, qkv_bias: bool, norm: nn.Module, act: Act,
                 proj_drop: float, channels_last: bool) -> None:
        super().__init__()
        self.num_heads, self.channels_last = len(kernels), channels_last
        layout = "tokens" if channels_last else "maps"
        head_dim = dim // self.num_heads
        self.v = pointwise(layout, dim, dim, bias=qkv_bias)
        self.s = pointwise(layout, dim, dim, bias=qkv_bias)
        self.local_conv = nn.ModuleList([nn.Conv2d(head_dim, head_dim, k, padding=k // 2, groups=head_dim)
                                         for k in kernels])
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=head_dim)
        self.bn = norm
        self.act = make_act(act)
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)
        self.proj = pointwise(layout, dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self) -> None:
        """The authors' init of the kxk and aggregation convs: normal(0, sqrt(2 / fan_out)), zero bias (the
        projections keep std .02)."""
        for conv in (*self.local_conv, self.proj0, self.proj1):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)

    def modulator(self, s: Tensor) -> Tensor:
        """Mixed convolution and aggregation on maps: (B, C, H, W) -> (B, C, H, W).

        proj0 (a 1x1 conv in C / num_heads groups of num_heads channels) runs as one batched matmul over the
        groups: PyTorch's CPU grouped conv falls back to one slow conv per group (2-6x slower at SMT's sizes)."""
        B, C, H, W = s.shape
        heads = s.chunk(self.num_heads, dim=1)  # contiguous heads of C / num_heads channels
        s = torch.stack([conv(h) for conv, h in zip(self.local_conv, heads, strict=True)], dim=2)  # (B, C/h, h, H, W)
        weight = self.proj0.weight.view(C // self.num_heads, -1, self.num_heads)  # (groups, h * expand, h)
        hidden = torch.matmul(weight, s.flatten(3)).view(B, -1, H, W) + self.proj0.bias.view(1, -1, 1, 1)
        return self.proj1(self.act(self.bn(hidden)))

    def forward(self, x: Tensor) -> Tensor:
        s = self.s(x)
        if self.channels_last:  # (B, H, W, C)
            modulator = self.modulator(s.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            modulator = self.modulator(s)
        return self.proj_drop(self.proj(modulator * self.v(x)))


def scale_aware_modulation_shape(spec: ScaleAwareModulationSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="scale_aware_modulation")
    require_no_prefix(x, op="scale_aware_modulation")
    if x.channels % spec.num_heads:
        raise ShapeIssue("num_heads", f"{spec.num_heads} heads do not divide the input's {x.channels} channels")
    if _kernels(spec)[-1] > MAX_KERNEL:
        raise ShapeIssue("kernel_step", f"the last head's kernel {_kernels(spec)[-1]} exceeds {MAX_KERNEL}")
    check_norm(spec.norm, TensorType("maps", x.channels * spec.expand_ratio, x.height, x.width), "norm")
    return x


def _build_scale_aware_modulation(spec: ScaleAwareModulationSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    hidden = TensorType("maps", x.channels * spec.expand_ratio, x.height, x.width)
    return ScaleAwareModulation(x.channels, _kernels(spec), expand_ratio=spec.expand_ratio, qkv_bias=spec.qkv_bias,
                                norm=build_norm(spec.norm, hidden), act=spec.act, proj_drop=spec.proj_drop,
                                channels_last=x.layout == "tokens")


def fold_scale_aware_modulation(module: nn.Module) -> Folding | None:
    """s and v read the input, proj writes the output; the hidden norm folds into proj0."""
    if isinstance(module, ScaleAwareModulation):
        return Folding(reads=(module.s, module.v), writes=module.proj,
                       deploy=lambda: fold_parts(module, ("proj0", "bn")))
    return None


SCALE_AWARE_MODULATION = around_prefix(OpDef(
    ScaleAwareModulationSpec,
    infer=scale_aware_modulation_shape,
    build=_build_scale_aware_modulation,
    preserves_type=True,
    fold=fold_scale_aware_modulation,
    cases=(
        Case({}, TensorType("tokens", 16, 5, 4)),
        Case({"num_heads": 2, "kernel": 5, "kernel_step": 4, "expand_ratio": 1, "qkv_bias": False, "act": "relu"},
             TensorType("maps", 8, 4, 6), id="maps"),
        Case({"norm": None, "kernel_step": 0}, TensorType("tokens", 8, 3, 3), id="no-norm"),
        Case({"prefix": "pass"}, TensorType("tokens", 8, 4, 4, prefix=1), id="prefix"),
    ),
))
