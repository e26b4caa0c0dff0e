"""The inception token mixer (iFormer: Si et al., "Inception Transformer", NeurIPS 2022, arXiv 2205.12956): the
channels split into a high-frequency part, mixed locally by a max-pool branch and a depthwise-conv branch, and a
low-frequency part, mixed globally by attention on an average-pooled grid; the outputs concatenated, fused by a
residual depthwise conv and projected back to the width."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import OddKernel, PosInt, Prob, require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class InceptionMixerSpec(GridOpSpec):
    """iFormer's inception mixer (the authors' ``Mixer``): high-frequency max-pool and depthwise-conv branches
    beside low-frequency pooled attention, concatenated, fused and projected.

    The width splits into heads of ``head_dim``; the last ``attention_heads`` heads' channels are the low-frequency
    part: a ``pool_size`` x ``pool_size`` average pool (stride ``pool_size``), global attention (no output
    projection), nearest upsampling back to the grid. The first channels are the high-frequency part, halved: the
    first half goes through a 1x1 conv doubling it (no bias) then a depthwise ``kernel`` conv (no bias), the second
    through a ``kernel`` max-pool (stride 1) then a 1x1 conv doubling it; both then GELU. The concatenation
    (2 x high + low channels) gets ``x + dwconv3x3(x)`` (no bias), then a 1x1 conv back to the width.
    """

    type: Literal["inception_mixer"] = "inception_mixer"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC + " (the authors' num_heads: they only size "
                                                                      "the heads)")
    head_dim: PosInt | None = head_dim_field(32)
    attention_heads: PosInt = Field(1, description="heads of the low-frequency attention; its width is "
                                                   "attention_heads * head_dim, the rest (even, nonzero) is the "
                                                   "high-frequency part")
    pool_size: PosInt = Field(1, description="average pool before the attention and upsampling after it (kernel = "
                                             "stride = scale); must divide H and W; 1: none")
    kernel: OddKernel = Field(3, description="max-pool and depthwise-conv kernel of the high-frequency branches")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


class HighMixer(nn.Module):
    """The high-frequency branches on (B, high, H, W): ``conv1`` (1x1, no bias) and ``proj1`` (depthwise) on the
    first half, ``maxpool`` and ``proj2`` (1x1) on the second; each doubles its half. The authors' names (their
    ``Maxpool`` has no parameters); the GELU after each branch is the mixer's, applied to both at once."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.half = half = dim // 2
        self.conv1 = nn.Conv2d(half, 2 * half, 1, bias=False)
        self.proj1 = nn.Conv2d(2 * half, 2 * half, kernel, padding=kernel // 2, groups=2 * half, bias=False)
        self.maxpool = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)
        self.proj2 = nn.Conv2d(half, 2 * half, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, high, H, W) -> (B, 2 * high, H, W), before the GELU
        cx, px = x.split(self.half, dim=1)
        return torch.cat([self.proj1(self.conv1(cx)), self.proj2(self.maxpool(px))], dim=1)


class LowMixer(nn.Module):
    """The low-frequency branch on (B, low, H, W): average pool, ``qkv`` (the authors' name), attention over the
    pooled grid, nearest upsampling; no output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, pool_size: int,
                 fused: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.pool_size, self.fused = num_heads, dim // num_heads, pool_size, fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: Tensor) -> Tensor:  # (B, low, H, W) -> (B, low, H, W)
        p = self.pool_size
        if p > 1:
            x = F.avg_pool2d(x, p)
        B, C, h, w = x.shape
        qkv = self.qkv(x.flatten(2).transpose(1, 2))  # (B, h*w, 3C)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(q, k, v, bias=None, drop=self.attn_drop, fused=self.fused)  # (B, heads, h*w, d)
        y = y.transpose(2, 3).reshape(B, C, h, w)  # channel = head * d + i, as the authors'
        return F.interpolate(y, scale_factor=p, mode="nearest") if p > 1 else y


class InceptionMixer(nn.Module):
    """The inception mixer on maps (B, C, H, W) or channels-last tokens (B, H, W, C); inside it works on maps.
    Parameter names are the authors' (``high_mixer.conv1/proj1/proj2``, ``low_mixer.qkv``, ``conv_fuse``,
    ``proj``), so their state_dict loads as it is."""

    def __init__(self, dim: int, head_dim: int, attention_heads: int, pool_size: int, kernel: int,
                 qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.low_dim = low = attention_heads * head_dim
        self.high_dim = high = dim - low
        self.high_mixer = HighMixer(high, kernel)
        self.low_mixer = LowMixer(low, attention_heads, qkv_bias, attn_drop, pool_size, fused)
        fused_dim = 2 * high + low
        self.conv_fuse = nn.Conv2d(fused_dim, fused_dim, 3, padding=1, groups=fused_dim, bias=False)
        self.proj = nn.Conv2d(fused_dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fuse_residual = True  # the deploy form moves the residual into conv_fuse's centre tap

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        hx, lx = x.split([self.high_dim, self.low_dim], dim=1)
        y = torch.cat([F.gelu(self.high_mixer(hx)), self.low_mixer(lx)], dim=1)  # (B, 2 * high + low, H, W)
        y = y + self.conv_fuse(y) if self.fuse_residual else self.conv_fuse(y)
        y = self.proj_drop(self.proj(y))  # (B, C, H, W)
        return y.permute(0, 2, 3, 1) if self.channels_last else y


def inception_mixer_shape(spec: InceptionMixerSpec, x: TensorType, out_dim: int | None
                          ) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", "tokens", op="inception_mixer")
    require_no_prefix(x, op="inception_mixer")
    heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    if heads * head_dim != x.channels:
        raise ShapeIssue("num_heads", f"{heads} heads of {head_dim} give {heads * head_dim} channels, but the input "
                                      f"has {x.channels}")
    if spec.attention_heads >= heads:
        raise ShapeIssue("attention_heads", f"{spec.attention_heads} of the {heads} heads leave no high-frequency "
                                            "channels; take fewer")
    high = x.channels - spec.attention_heads * head_dim
    if high % 2:
        raise ShapeIssue("attention_heads", f"the high-frequency part ({high} channels) must be even: its two "
                                            "branches take half each")
    p = spec.pool_size
    if x.height % p or x.width % p:
        raise ShapeIssue("pool_size", f"{p} does not divide the {x.height}x{x.width} grid")
    return x, {"head_dim": head_dim}


def _build_inception_mixer(spec: InceptionMixerSpec, r: Resolved) -> InceptionMixer:
    x = r.in_type
    return InceptionMixer(x.channels, head_dim=r["head_dim"], attention_heads=spec.attention_heads,
                          pool_size=spec.pool_size, kernel=spec.kernel, qkv_bias=spec.qkv_bias,
                          attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                          channels_last=x.layout == "tokens")


def fold_inception_mixer(module: nn.Module) -> Folding | None:
    """proj writes the output; no layer reads the whole input (the branches take slices, two through pools). The
    deploy form adds the fuse's residual to conv_fuse's centre tap: ``y + dw(y)`` is one depthwise conv."""
    if not isinstance(module, InceptionMixer):
        return None

    def deploy() -> nn.Module:
        if module.fuse_residual:
            with torch.no_grad():
                conv = module.conv_fuse
                conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] += 1.0
            module.fuse_residual = False
        return module

    return Folding(reads=(), writes=module.proj, deploy=deploy)


INCEPTION_MIXER = around_prefix(OpDef(
    InceptionMixerSpec,
    infer=inception_mixer_shape,
    build=_build_inception_mixer,
    preserves_type=True,
    fold=fold_inception_mixer,
    cases=(
        Case({"head_dim": 4, "attention_heads": 2, "pool_size": 2}, TensorType("tokens", 16, 4, 6)),
        Case({"num_heads": 4, "attention_heads": 3, "qkv_bias": False, "fused": False}, TensorType("maps", 16, 3, 5),
             id="maps-no-pool"),
        Case({"head_dim": 4, "attention_heads": 1, "kernel": 5, "pool_size": 3}, TensorType("maps", 8, 3, 6),
             id="kernel-5"),
        Case({"head_dim": 4, "attention_heads": 2, "pool_size": 2, "prefix": "pass"},
             TensorType("tokens", 16, 4, 4, prefix=1), id="prefixed"),
    ),
))
