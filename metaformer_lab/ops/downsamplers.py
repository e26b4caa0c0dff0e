"""Downsamplers that open a stage: strided conv, Swin's patch merging, pooling."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, Groups, KernelInt, make_act, require_layout, require_no_prefix
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.global_query_attention import MbConvResidual
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix
from metaformer_lab.ops.stems import ConvEmbed, default_padding, fold_conv_embed, strided_conv_shape

_MAPS = TensorType("maps", 8, 8, 6)
_TOKENS = TensorType("tokens", 8, 8, 6)
_PREFIXED = TensorType("tokens", 8, 8, 6, prefix=1)


class ConvDownSpec(GridOpSpec):
    """Strided conv with optional norms around it and an activation after (PoolFormer, ConvNeXt, PVTv2, FastViT)."""

    type: Literal["conv"] = "conv"
    kernel: KernelInt = 3
    stride: KernelInt = 2
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")
    bias: bool = True
    norm_before: NormSpec | None = None
    norm_after: NormSpec | None = None
    groups: Groups = Field(1, description="conv groups (1: a full conv); must divide the input and output widths")
    act: Act = Field("identity", description="after the conv and norm_after (FastViT's GELU)")
    deformable: bool = Field(False, description="a deformable conv (DCNv1; LITv2's DTM): each kernel tap samples the "
                                                "input, bilinearly, at an offset predicted by an offset conv of the "
                                                "same kernel and stride (2 k² channels, zero at init); groups 1")
    fused_mbconv: bool = Field(False, description="a residual fused-MBConv block on the input width between "
                                                  "norm_before and the conv (GC-ViT's Downsample2d: timm "
                                                  "gcvit.MbConvBlock, then the conv as its reduction)")

    key_optional = frozenset({"groups", "act", "deformable", "fused_mbconv"})


class DeformConv2d(nn.Module):
    """DCNv1 (Dai et al. 2017; mmcv's ``DeformConv2dPack``, one offset group): ``conv_offset`` gives a (dy, dx)
    per kernel tap and output position; the input is sampled there (bilinear, zero outside the map) and the
    samples are weighted as a conv's. Zero offsets (the init) make it the plain conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, bias: bool) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel * kernel, kernel, stride=stride, padding=padding)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, O, H', W')
        b, c, h, w = x.shape
        k, taps = self.kernel, self.kernel * self.kernel
        offset = self.conv_offset(x)  # (B, 2 k², H', W'): (dy, dx) of tap i * k + j at channels 2t, 2t + 1
        ho, wo = offset.shape[-2:]
        offset = offset.view(b, taps, 2, ho, wo).permute(0, 3, 4, 1, 2)  # (B, H', W', k², 2)
        ys = torch.arange(ho, device=x.device, dtype=x.dtype) * self.stride - self.padding
        xs = torch.arange(wo, device=x.device, dtype=x.dtype) * self.stride - self.padding
        ty, tx = torch.meshgrid(torch.arange(k, device=x.device, dtype=x.dtype),
                                torch.arange(k, device=x.device, dtype=x.dtype), indexing="ij")
        py = ys.view(ho, 1, 1) + ty.reshape(1, 1, taps) + offset[..., 0]  # (B, H', W', k²) input rows
        px = xs.view(1, wo, 1) + tx.reshape(1, 1, taps) + offset[..., 1]
        grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)  # pixel centres, x first
        samples = F.grid_sample(x, grid.reshape(b, ho, wo * taps, 2), mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B, C, H', W' k²)
        samples = samples.view(b, c, ho, wo, taps).permute(0, 2, 3, 1, 4).reshape(b, ho, wo, c * taps)
        out = samples @ self.weight.reshape(self.weight.shape[0], c * taps).T  # (B, H', W', O)
        if self.bias is not None:
            out = out + self.bias
        return out.permute(0, 3, 1, 2)


def _padding(spec: ConvDownSpec) -> int:
    return default_padding(spec.kernel, spec.stride) if spec.padding is None else spec.padding


def _conv_down_shape(spec: ConvDownSpec, x: TensorType, dim: int) -> TensorType:
    if spec.deformable and spec.groups != 1:
        raise ShapeIssue("deformable", f"takes a full conv (groups 1), not groups {spec.groups}")
    return strided_conv_shape(x, dim, spec.kernel, spec.stride, _padding(spec),
                              {"norm_before": spec.norm_before, "norm_after": spec.norm_after}, spec.groups)


def _build_conv_down(spec: ConvDownSpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    out = r.out_type
    conv: nn.Module
    if spec.deformable:
        conv = DeformConv2d(x.channels, dim, spec.kernel, spec.stride, _padding(spec), spec.bias)
    else:
        conv = nn.Conv2d(x.channels, dim, spec.kernel, stride=spec.stride, padding=_padding(spec), bias=spec.bias,
                         groups=spec.groups)
    if spec.fused_mbconv:  # timm's names: conv_block, reduction
        conv = nn.Sequential(OrderedDict(conv_block=MbConvResidual(x.channels), reduction=conv))
    return ConvEmbed(build_norm(spec.norm_before, x), conv, build_norm(spec.norm_after, out), make_act(spec.act))


class PatchMergingSpec(GridOpSpec):
    """Swin's patch merging: 2x2 neighbours concatenated (4C), normed, projected by a Linear."""

    type: Literal["patch_merging"] = "patch_merging"
    norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5))
    bias: bool = False
    norm_after: NormSpec | None = Field(None, description="norm after the Linear (Swin V2, with norm: null)")

    key_optional = frozenset({"norm_after"})


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int, norm: nn.Module, bias: bool, norm_after: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.reduction = nn.Linear(4 * dim, out_dim, bias=bias)
        self.norm_after = norm_after

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        # timm's channel order: (row offset, col offset) = (0,0), (1,0), (0,1), (1,1)
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.norm_after(self.reduction(self.norm(x)))


def _patch_merging_shape(spec: PatchMergingSpec, x: TensorType, dim: int) -> TensorType:
    require_layout(x, "tokens", op="patch_merging")
    require_no_prefix(x, op="patch_merging")
    if x.height % 2 or x.width % 2:
        raise ShapeIssue("type", f"patch_merging needs an even grid, got {x.height}x{x.width}")
    check_norm(spec.norm, x.with_channels(4 * x.channels), "norm")
    out = x.with_channels(dim).with_grid(x.height // 2, x.width // 2)
    check_norm(spec.norm_after, out, "norm_after")
    return out


def _build_patch_merging(spec: PatchMergingSpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    return PatchMerging(x.channels, dim, build_norm(spec.norm, x.with_channels(4 * x.channels)), spec.bias,
                        build_norm(spec.norm_after, r.out_type))


class PoolDownSpec(GridOpSpec):
    """Pooling, then a 1x1 conv when the width changes (and an optional norm). With the defaults, timm
    ``maxxvit.Downsample2d`` (``avg2``), the shortcut of CoAtNet's downsampling blocks."""

    type: Literal["pool"] = "pool"
    mode: Literal["avg", "max"] = "avg"
    kernel: KernelInt = 2
    stride: KernelInt = 2
    bias: bool = Field(True, description="bias of the 1x1 conv (timm's rw CoAtNet shortcuts have none)")
    norm_after: NormSpec | None = None


class PoolDown(nn.Module):
    def __init__(self, pool: nn.Module, proj: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.pool, self.proj, self.norm = pool, proj, norm

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', H', W')
        return self.norm(self.proj(self.pool(x)))


def _pool_down_shape(spec: PoolDownSpec, x: TensorType, dim: int) -> TensorType:
    require_layout(x, "maps", op="pool")
    pad = default_padding(spec.kernel, spec.stride)
    if pad > spec.kernel // 2:
        raise ShapeIssue("kernel", f"{spec.kernel} is too small for stride {spec.stride}")
    out = strided_conv_shape(x, dim, spec.kernel, spec.stride, pad, {})
    check_norm(spec.norm_after, out, "norm_after")
    return out


def _build_pool_down(spec: PoolDownSpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    out = r.out_type
    pad = default_padding(spec.kernel, spec.stride)
    pool_cls = nn.AvgPool2d if spec.mode == "avg" else nn.MaxPool2d
    pool = pool_cls(spec.kernel, spec.stride, padding=pad)
    proj = nn.Identity() if dim == x.channels else nn.Conv2d(x.channels, dim, 1, bias=spec.bias)
    return PoolDown(pool, proj, build_norm(spec.norm_after, out))


def fold_downsampler(module: nn.Module) -> Folding | None:
    """Patch merging's norm folds into its reduction, pooling's 1x1 conv takes the BatchNorm after it (conv
    downsamplers fold as conv stems do)."""
    if isinstance(module, PatchMerging):
        writes = module.reduction if isinstance(module.norm_after, nn.Identity) else module.norm_after
        return Folding(writes=writes, deploy=lambda: fold_parts(module, ("norm", "reduction", "norm_after")))
    if isinstance(module, PoolDown):
        writes = module.proj if isinstance(module.norm, nn.Identity) and isinstance(module.proj, nn.Conv2d) else None
        return Folding(writes=writes, deploy=lambda: fold_parts(module, ("proj", "norm")))
    return None


CONV_DOWN = around_prefix(OpDef(
    ConvDownSpec, _conv_down_shape, _build_conv_down, accepts=("maps",), fold=fold_conv_embed,
    cases=(Case({}, _MAPS, 16), Case({"kernel": 2, "norm_before": {"type": "layernorm"}}, _MAPS, 16, id="convnext"),
           Case({"norm_after": {"type": "layernorm", "eps": 1e-5}}, _MAPS, 16, id="post"),
           Case({"groups": 8}, _MAPS, 16, id="grouped"),
           Case({"norm_after": {"type": "batchnorm"}, "act": "gelu"}, _MAPS, 16, id="act"),
           Case({"padding": 1, "groups": 8, "prefix": "linear"}, _PREFIXED, 16, id="pit-class-token"),
           Case({"norm_after": {"type": "layernorm"}, "prefix": "pass"}, _PREFIXED, 8, id="prefix-pass"),
           Case({"kernel": 2, "padding": 0, "norm_after": {"type": "batchnorm"}, "act": "gelu", "deformable": True},
                _MAPS, 16, id="litv2-dtm"),
           Case({"kernel": 3, "padding": 1, "norm_before": {"type": "layernorm"}, "deformable": True}, _MAPS, 16,
                id="deformable-padded"),
           Case({"bias": False, "norm_before": {"type": "layernorm", "eps": 1e-5}, "fused_mbconv": True,
                 "norm_after": {"type": "layernorm", "eps": 1e-5}}, _MAPS, 16, id="gcvit"))))
PATCH_MERGING = around_prefix(OpDef(PatchMergingSpec, _patch_merging_shape, _build_patch_merging,
                                    accepts=("tokens",), fold=fold_downsampler,
                                    cases=(Case({}, _TOKENS, 16),
                                           Case({"norm": None, "norm_after": {"type": "layernorm", "eps": 1e-5}},
                                                _TOKENS, 16, id="swin-v2"),
                                           Case({"prefix": "linear"}, _PREFIXED, 16, id="prefix-linear"))))
POOL_DOWN = around_prefix(OpDef(PoolDownSpec, _pool_down_shape, _build_pool_down, accepts=("maps",),
                                fold=fold_downsampler,
                                cases=(Case({}, _MAPS, 16), Case({"mode": "max", "kernel": 3}, _MAPS, 8, id="max-k3"),
                                       Case({"bias": False}, _MAPS, 16, id="no-bias"),
                                       Case({"prefix": "zero"}, _PREFIXED, 16, id="prefix-zero"))))
