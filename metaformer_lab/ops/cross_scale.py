"""CrossFormer's cross-scale embedding: convs of several kernels and one stride, their outputs concatenated,
as a stem (its ``PatchEmbed``) and a downsampler (its ``PatchMerging``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import KernelInt, OpSpec, PosInt
from metaformer_lab.ops.norms import NormSpec, build_norm, check_norm
from metaformer_lab.ops.stems import ConvEmbed, fold_conv_embed, strided_conv_shape

_IMAGE = TensorType("maps", 3, 32, 32)
_MAPS = TensorType("maps", 8, 8, 6)

Kernels = list[KernelInt]


class CrossScaleFields(OpSpec):
    """What CrossFormer's patch embedding and patch merging share: the convs and the norm after them."""

    type: Literal["cross_scale"] = "cross_scale"
    kernels: Kernels = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1, max_length=8,
                             description="kernel of each conv, all on the same grid")
    stride: KernelInt | None = Field(None, description="default: the first kernel")
    widths: list[PosInt] | None = Field(None, description="output width of each conv, summing to the op's width; "
                                        "default: CrossFormer's halves (1/2, 1/4, ..., the last two equal)")
    bias: bool = True
    norm_after: NormSpec | None = None


class CrossScaleStemSpec(CrossScaleFields):
    """Cross-scale patch embedding: convs of several kernels, one stride, concatenated (CrossFormer)."""

    dim: PosInt | None = Field(None, description="output width; default: the first stage's width")


class CrossScaleDownSpec(CrossScaleFields):
    """Cross-scale patch merging: convs of several kernels, one stride, concatenated (CrossFormer)."""

    kernels: Kernels = Field(default_factory=lambda: [2, 4], min_length=1, max_length=8,
                             description="kernel of each conv, all on the same grid")
    norm_before: NormSpec | None = None


CrossScaleSpec = CrossScaleStemSpec | CrossScaleDownSpec


class CrossScaleConv(nn.Module):
    """The convs of one cross-scale embedding, each read the same maps; their outputs concatenated."""

    def __init__(self, projs: list[nn.Conv2d]) -> None:
        super().__init__()
        self.projs = nn.ModuleList(projs)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, sum of widths, H', W')
        return torch.cat([proj(x) for proj in self.projs], dim=1)


def _stride(spec: CrossScaleSpec) -> int:
    return spec.kernels[0] if spec.stride is None else spec.stride


def _paddings(spec: CrossScaleSpec) -> list[int]:
    """CrossFormer's ``(kernel - stride) // 2``: every kernel lands on the first one's grid."""
    stride = _stride(spec)
    for i, kernel in enumerate(spec.kernels):
        if kernel < stride:
            raise ShapeIssue(f"kernels[{i}]", f"{kernel} is smaller than the stride {stride}")
        if (kernel - stride) % 2:
            raise ShapeIssue(f"kernels[{i}]", f"{kernel} minus the stride {stride} is odd; the padding "
                             "(kernel - stride) / 2 would put it on another grid")
    return [(kernel - stride) // 2 for kernel in spec.kernels]


def _widths(spec: CrossScaleSpec, dim: int) -> list[int]:
    n = len(spec.kernels)
    if spec.widths is not None:
        if len(spec.widths) != n:
            raise ShapeIssue("widths", f"needs {n} entries (one per kernel), got {len(spec.widths)}")
        if sum(spec.widths) != dim:
            raise ShapeIssue("widths", f"sum to {sum(spec.widths)}, but the op's width is {dim}")
        return spec.widths
    if dim % 2 ** (n - 1):
        raise ShapeIssue("widths", f"the default split halves the width {n - 1} times, but {2 ** (n - 1)} "
                         f"does not divide {dim}; give the widths")
    return [dim // 2 ** (i + 1) for i in range(n - 1)] + [dim // 2 ** (n - 1)]


def _cross_scale_shape(spec: CrossScaleSpec, x: TensorType, dim: int) -> TensorType:
    widths, stride = _widths(spec, dim), _stride(spec)
    for i, (kernel, padding, width) in enumerate(zip(spec.kernels, _paddings(spec), widths, strict=True)):
        try:
            out = strided_conv_shape(x, width, kernel, stride, padding, {})
        except ShapeIssue as issue:
            raise ShapeIssue(f"kernels[{i}]" if issue.field == "kernel" else issue.field, issue.message) from None
    out = out.with_channels(dim)
    check_norm(getattr(spec, "norm_before", None), x, "norm_before")
    check_norm(spec.norm_after, out, "norm_after")
    return out


def _build_cross_scale(spec: CrossScaleSpec, r: Resolved) -> nn.Module:
    x, dim, stride = r.in_type, r.out_dim, _stride(spec)
    projs = [nn.Conv2d(x.channels, width, kernel, stride=stride, padding=padding, bias=spec.bias)
             for kernel, padding, width in zip(spec.kernels, _paddings(spec), _widths(spec, dim), strict=True)]
    pre = build_norm(getattr(spec, "norm_before", None), x)
    return ConvEmbed(pre, CrossScaleConv(projs), build_norm(spec.norm_after, r.out_type))


def fold_cross_scale(module: nn.Module) -> Folding | None:
    """Every conv reads the whole input (a norm's affine before them folds into each where exact); a BatchNorm
    after them does not fold (no single layer writes the output)."""
    if isinstance(module, CrossScaleConv):
        return Folding(reads=tuple(module.projs))
    return fold_conv_embed(module)


CROSS_SCALE_STEM = OpDef(CrossScaleStemSpec, _cross_scale_shape, _build_cross_scale, fold=fold_cross_scale,
                         cases=(Case({}, _IMAGE, 16),
                                Case({"kernels": [2, 4], "widths": [4, 12], "norm_after": {"type": "layernorm"}},
                                     _IMAGE, 16, id="widths-norm")))
CROSS_SCALE_DOWN = OpDef(CrossScaleDownSpec, _cross_scale_shape, _build_cross_scale, accepts=("maps",),
                         fold=fold_cross_scale,
                         cases=(Case({}, _MAPS, 16),
                                Case({"kernels": [2, 4, 6], "norm_before": {"type": "layernorm"}}, _MAPS, 16,
                                     id="three-norm"),
                                Case({"norm_after": {"type": "batchnorm"}}, _MAPS, 16, id="post-bn")))
