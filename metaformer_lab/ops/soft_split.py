"""T2T-ViT's soft split: overlapping kxk patches unfolded into tokens of width C*k*k (``nn.Unfold``), as a stem
and a downsampler; a Linear follows when the width asked differs (T2T's final ``project``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.registry import Case, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import KernelInt, OpSpec, PosInt, require_layout
from metaformer_lab.ops.stems import default_padding, strided_conv_shape

_IMAGE = TensorType("maps", 3, 32, 32)
_MAPS = TensorType("maps", 4, 8, 6)


class SoftSplitStemSpec(OpSpec):
    """T2T's soft split: overlapping kxk patches unfolded into tokens of width C*k*k, then a Linear to the width
    asked when it differs (T2T-ViT's ``soft_split0``)."""

    type: Literal["soft_split"] = "soft_split"
    kernel: KernelInt = 7
    stride: KernelInt = 4
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")
    dim: PosInt | None = Field(None, description="output width; a Linear projects C*k*k to it when they differ; "
                               "default: the first stage's width")


class SoftSplitDownSpec(OpSpec):
    """T2T's soft split: overlapping kxk patches unfolded into tokens of width C*k*k, then a Linear to the width
    asked when it differs (T2T-ViT's ``soft_split1``, ``soft_split2`` + ``project``)."""

    type: Literal["soft_split"] = "soft_split"
    kernel: KernelInt = 3
    stride: KernelInt = 2
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")


SoftSplitSpec = SoftSplitStemSpec | SoftSplitDownSpec


class SoftSplit(nn.Module):
    """``proj(unfold(x))``: each kxk patch of the maps is one token of width C*k*k, ordered (channel, row, col)
    as ``nn.Unfold`` orders it; ``proj`` is a Linear to the width asked, or nothing."""

    def __init__(self, kernel: int, stride: int, padding: int, grid: tuple[int, int], proj: nn.Module) -> None:
        super().__init__()
        self.soft_split = nn.Unfold(kernel, stride=stride, padding=padding)
        self.grid = grid
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H', W', C')
        x = self.soft_split(x).transpose(1, 2)  # (B, H'*W', C*k*k)
        return self.proj(x.unflatten(1, self.grid))  # (B, H', W', C*k*k) -> (B, H', W', C')


def _padding(spec: SoftSplitSpec) -> int:
    return default_padding(spec.kernel, spec.stride) if spec.padding is None else spec.padding


def _soft_split_shape(spec: SoftSplitSpec, x: TensorType, dim: int) -> TensorType:
    require_layout(x, "maps", op="soft_split")
    maps = strided_conv_shape(x, dim, spec.kernel, spec.stride, _padding(spec), {})
    return TensorType("tokens", dim, maps.height, maps.width)


def _build_soft_split(spec: SoftSplitSpec, r: Resolved) -> nn.Module:
    x, out = r.in_type, r.out_type
    width = x.channels * spec.kernel**2
    proj = nn.Identity() if width == out.channels else nn.Linear(width, out.channels)
    return SoftSplit(spec.kernel, spec.stride, _padding(spec), (out.height, out.width), proj)


SOFT_SPLIT_STEM = OpDef(SoftSplitStemSpec, _soft_split_shape, _build_soft_split,
                        cases=(Case({}, _IMAGE, 3 * 49), Case({"kernel": 4, "stride": 4}, _IMAGE, 16, id="proj")))
SOFT_SPLIT_DOWN = OpDef(SoftSplitDownSpec, _soft_split_shape, _build_soft_split, accepts=("maps",),
                        cases=(Case({}, _MAPS, 4 * 9), Case({"kernel": 2, "padding": 0}, _MAPS, 12, id="proj")))
