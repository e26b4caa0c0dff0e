"""Convolutional token mixers: depthwise conv (ConvNeXt) and inverted separable conv (ConvFormer); either
conv may be grouped instead (``groups``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    Act,
    DwGroups,
    Kernel2d,
    Ratio,
    make_act,
    pair,
    require_groups,
    require_layout,
    require_no_prefix,
)
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix

_MAPS = TensorType("maps", 8, 6, 5)
_TOKENS = TensorType("tokens", 8, 6, 5)


class DwConvSpec(GridOpSpec):
    """Depthwise convolution, stride 1, same padding (ConvNeXt's 7x7, InceptionNeXt's 1x11 and 11x1)."""

    type: Literal["dwconv"] = "dwconv"
    kernel: Kernel2d = Field(7, description="odd size, or [height, width]")
    bias: bool = True
    groups: DwGroups = Field(None, description="conv groups; null: depthwise (one per channel), 1: a full conv")

    key_optional = frozenset({"groups"})


class DepthwiseConv(nn.Module):
    """Depthwise (or grouped) conv on maps, or on channels-last tokens (permuted around the conv)."""

    def __init__(self, dim: int, kernel: tuple[int, int], bias: bool, channels_last: bool,
                 groups: int | None = None) -> None:
        super().__init__()
        padding = (kernel[0] // 2, kernel[1] // 2)
        self.dw = nn.Conv2d(dim, dim, kernel, padding=padding, groups=groups or dim, bias=bias)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            return self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) -> same
        return self.dw(x)  # (B, C, H, W) -> same


def _odd_kernel(kernel: tuple[int, int]) -> None:
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ShapeIssue("kernel", f"{kernel[0]}x{kernel[1]} must be odd to keep the size with stride 1")


def dwconv_shape(spec: DwConvSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="dwconv")
    require_no_prefix(x, op="dwconv")
    _odd_kernel(pair(spec.kernel))
    if spec.groups is not None:
        require_groups(spec.groups, input=x.channels)
    return x


def fold_dwconv(module: nn.Module) -> Folding | None:
    """The depthwise conv reads and writes the channels one to one: a layer scale after it folds into it, a
    norm's weight before it too (a shift only without one: the conv pads with zeros)."""
    if isinstance(module, DepthwiseConv):
        return Folding(reads=(module.dw,), writes=module.dw)
    return None


DWCONV = around_prefix(OpDef(
    DwConvSpec,
    infer=dwconv_shape,
    build=lambda spec, r: DepthwiseConv(r.in_type.channels, pair(spec.kernel), spec.bias, r.in_type.layout == "tokens",
                                        spec.groups),
    preserves_type=True,
    fold=fold_dwconv,
    cases=(Case({}, _MAPS), Case({"kernel": [1, 5], "bias": False}, _TOKENS, id="tokens-1x5"),
           Case({"groups": 2}, _MAPS, id="grouped"), Case({"kernel": 3, "groups": 1}, _TOKENS, id="full-tokens"),
           Case({"kernel": 3, "prefix": "linear"}, _TOKENS.with_prefix(1), id="prefix-linear")),
))


class SepConvSpec(GridOpSpec):
    """Inverted separable conv from MobileNetV2: pointwise up, act, depthwise, pointwise down
    (timm ``metaformer.SepConv``)."""

    type: Literal["sepconv"] = "sepconv"
    ratio: Ratio = Field(2.0, description="expansion of the middle width")
    kernel: Kernel2d = 7
    act: Act = "star_relu"
    act2: Act = Field("identity", description="activation after the depthwise conv")
    bias: bool = False
    groups: DwGroups = Field(None, description="groups of the kxk conv; null: depthwise (one per channel)")
    project: bool = Field(True, description="false: no pointwise conv down, the depthwise conv's output is the "
                                            "op's (ratio 1; Conv2Former's gate: 1x1 conv, GELU, depthwise conv)")

    key_optional = frozenset({"groups", "project"})


class SeparableConv(nn.Module):
    def __init__(self, dim: int, spec: SepConvSpec, channels_last: bool) -> None:
        super().__init__()
        mid = int(spec.ratio * dim)
        kernel = pair(spec.kernel)
        # 1x1 convs on maps, Linear on channels-last tokens: the same weights up to a reshape.
        self.pwconv1 = nn.Linear(dim, mid, bias=spec.bias) if channels_last else nn.Conv2d(dim, mid, 1, bias=spec.bias)
        self.act1 = make_act(spec.act)
        self.dwconv = nn.Conv2d(mid, mid, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=spec.groups or mid,
                                bias=spec.bias)
        self.act2 = make_act(spec.act2)
        self.pwconv2: nn.Module = nn.Identity()
        if spec.project:
            self.pwconv2 = nn.Linear(mid, dim, bias=spec.bias) if channels_last else nn.Conv2d(mid, dim, 1,
                                                                                               bias=spec.bias)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.pwconv1(x))
        if self.channels_last:
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, mid)
        else:
            x = self.dwconv(x)  # (B, mid, H, W)
        return self.pwconv2(self.act2(x))


def sepconv_shape(spec: SepConvSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="sepconv")
    require_no_prefix(x, op="sepconv")
    _odd_kernel(pair(spec.kernel))
    if spec.groups is not None:
        require_groups(spec.groups, hidden=int(spec.ratio * x.channels))
    if not spec.project and int(spec.ratio * x.channels) != x.channels:
        raise ShapeIssue("project", f"false keeps the middle width {int(spec.ratio * x.channels)} as the output, "
                                    f"but the op must give its {x.channels} input channels; set ratio: 1")
    return x


def fold_sepconv(module: nn.Module) -> Folding | None:
    """pwconv1 reads the input, pwconv2 writes the output."""
    if isinstance(module, SeparableConv):
        writes = module.pwconv2 if isinstance(module.pwconv2, (nn.Linear, nn.Conv2d)) else None
        return Folding(reads=(module.pwconv1,), writes=writes)
    return None


SEPCONV = around_prefix(OpDef(
    SepConvSpec,
    infer=sepconv_shape,
    build=lambda spec, r: SeparableConv(r.in_type.channels, spec, r.in_type.layout == "tokens"),
    preserves_type=True,
    fold=fold_sepconv,
    cases=(Case({}, _MAPS), Case({"kernel": 3, "act": "gelu", "bias": True}, _TOKENS, id="tokens"),
           Case({"kernel": 3, "groups": 4}, _TOKENS, id="grouped"),
           Case({"ratio": 1.0, "kernel": 5, "act": "gelu", "bias": True, "project": False}, _MAPS,
                id="no-projection")),
))
