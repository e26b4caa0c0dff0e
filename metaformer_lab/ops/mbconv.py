"""The inverted residual / MBConv layer (Sandler et al., "MobileNetV2", 2018; Tan & Le, "EfficientNet",
2019) with optional squeeze-excitation: 1x1 expand -> depthwise kxk -> [SE] -> 1x1 project.

One op serves as a token mixer (CoAtNet's MBConv blocks, EfficientViT's MBConv blocks and its strided
MBConv that opens a stage, both with ``out_dim`` and ``stride``) and as a channel mixer (EfficientViT's
local module, an FFN with a depthwise conv inside). Without the expansion conv it is the depthwise-separable
conv of MobileNetV1 (EfficientViT's ``DSConv``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    Act,
    DwGroups,
    KernelInt,
    OddKernel,
    PosInt,
    Ratio,
    act_layer,
    make_act,
    require_groups,
    require_layout,
)
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import BatchNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix
from metaformer_lab.ops.stems import SAME_PADDING_DOC, conv_out, same_conv, same_out

_MAPS = TensorType("maps", 8, 6, 6)

SeRatio = Annotated[float, Field(gt=0.0, le=1.0)]


class MbConvSpec(GridOpSpec):
    """MBConv on maps: ``out_norm(project(SE(act(norm(dw(act(norm(expand(pool(pre_act(pre_norm(x))))))))))))``
    (timm ``maxxvit.MbConvBlock`` without its shortcut; timm ``efficientvit_mit.MBConv`` and ``DSConv``).

    A strided MBConv (``stride`` > 1) or one with ``out_dim`` changes the tensor type: in a residual block
    it needs the block's ``shortcut`` (CoAtNet), or it stands alone in a ``plain`` block (EfficientViT).
    """

    type: Literal["mbconv"] = "mbconv"
    ratio: Ratio = Field(4.0, description="expansion: hidden width = ratio x the input (or output) width")
    expand_from: Literal["in", "out"] = Field(
        "in", description="the width the ratio multiplies: the input's (timm's rw CoAtNet, EfficientViT) or "
                          "out_dim (timm's MaxxVit expand_output)")
    divisor: PosInt = Field(1, description="round the hidden width to a multiple of this (timm make_divisible; "
                                           "1: to the nearest integer)")
    expand: bool = Field(True, description="false: no 1x1 expansion conv, the depthwise conv runs on the input "
                                           "width (a depthwise-separable conv, EfficientViT's DSConv; ratio 1)")
    kernel: OddKernel = Field(3, description="depthwise kernel")
    stride: KernelInt = Field(1, description="spatial stride (a downsampling MBConv)")
    stride_mode: Literal["dw", "pool"] = Field(
        "dw", description="dw: the depthwise conv strides (padding ((stride-1) + (kernel-1)) // 2, as timm); "
                          "pool: average pooling (kernel = stride) after the pre-norm (timm's rw CoAtNet)")
    out_dim: PosInt | None = Field(None, description="output width; null: the input width")
    pre_norm: NormSpec | None = Field(None, description="norm on the input (CoAtNet's pre-norm BN)")
    pre_act: Act = Field("identity", description="activation after pre_norm (timm's rw CoAtNet: silu)")
    norm: NormSpec | None = Field(default_factory=BatchNormSpec,
                                  description="norm after the expansion conv and after the depthwise conv")
    act: Act = Field("silu", description="activation after the expansion and the depthwise conv (and their norms)")
    hidden_bias: bool = Field(False, description="bias of the expansion and depthwise convs (EfficientViT "
                                                 "sets it where it drops their norms)")
    out_norm: NormSpec | None = Field(None, description="norm after the projection (EfficientViT: BN)")
    out_bias: bool = Field(False, description="bias of the projection conv")
    se_ratio: SeRatio | None = Field(None, description="squeeze-excitation width = int(se_ratio x the se_from "
                                                        "width); null: no SE")
    se_from: Literal["hidden", "in", "out"] = Field(
        "hidden", description="the width se_ratio multiplies: the hidden width (timm's rw CoAtNet), the input's "
                              "(EfficientNet) or the output's (timm's MaxxVit with expand_output)")
    se_act: Act = Field("relu", description="activation inside the SE (timm's rw CoAtNet: relu)")
    se_gate: Act = Field("sigmoid", description="the SE's gate (LocalViT's FFN: hardsigmoid)")
    se_early: bool = Field(False, description="SE between the depthwise conv and its norm (timm attn_early), "
                                              "instead of after the norm and activation")
    groups: DwGroups = Field(None, description="groups of the kxk conv; null: depthwise (one per channel)")
    dw_residual: bool = Field(False, description="an inner residual around the kxk conv: y + dw(y) (it must keep "
                                                 "the grid: stride 1, or stride_mode pool)")
    same_padding: bool = Field(False, description=SAME_PADDING_DOC + " (the depthwise conv)")

    key_optional = frozenset({"groups", "dw_residual", "se_gate", "same_padding"})


def hidden_width(spec: MbConvSpec, x: TensorType) -> int:
    if not spec.expand:
        return x.channels
    base = x.channels if spec.expand_from == "in" else spec.out_dim or x.channels
    from timm.layers import make_divisible
    return make_divisible(base * spec.ratio, spec.divisor)


def dw_padding(kernel: int, stride: int) -> int:
    """timm's default conv padding: ``((stride - 1) + (kernel - 1)) // 2``."""
    return ((stride - 1) + (kernel - 1)) // 2


def _strided(spec: MbConvSpec, size: int) -> int:
    if spec.stride_mode == "pool":
        return size // spec.stride
    if spec.same_padding:
        return same_out(size, spec.stride)
    return conv_out(size, spec.kernel, spec.stride, dw_padding(spec.kernel, spec.stride))


def mbconv_shape(spec: MbConvSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", op="mbconv")
    if not spec.expand and spec.ratio != 1.0:
        raise ShapeIssue("ratio", f"{spec.ratio} must be 1 without the expansion conv (expand: false)")
    h, w = _strided(spec, x.height), _strided(spec, x.width)
    if h < 1 or w < 1:
        raise ShapeIssue("stride", f"{spec.stride} is larger than the {x.height}x{x.width} input")
    hidden = x.with_channels(hidden_width(spec, x))
    if spec.groups is not None:
        require_groups(spec.groups, hidden=hidden.channels)
    if spec.dw_residual and spec.stride > 1 and spec.stride_mode == "dw":
        raise ShapeIssue("dw_residual", f"needs the kxk conv to keep the grid, but it has stride {spec.stride}; "
                                        "use stride_mode: pool, or no inner residual")
    check_norm(spec.pre_norm, x, "pre_norm")
    check_norm(spec.norm, hidden, "norm")
    out = x.with_channels(spec.out_dim or x.channels).with_grid(h, w)
    check_norm(spec.out_norm, out, "out_norm")
    return out


class MbConv(nn.Module):
    """Module names: pre_norm, expand_conv, expand_norm, dw_conv, dw_norm, se, project_conv, project_norm."""

    def __init__(self, *, pre_norm: nn.Module, pre_act: nn.Module, pool: nn.Module, expand_conv: nn.Module,
                 expand_norm: nn.Module, expand_act: nn.Module, dw_conv: nn.Conv2d, dw_norm: nn.Module,
                 dw_act: nn.Module, se: nn.Module, se_early: bool, project_conv: nn.Conv2d,
                 project_norm: nn.Module, dw_residual: bool = False) -> None:
        super().__init__()
        self.dw_residual = dw_residual
        self.pre_norm, self.pre_act, self.pool = pre_norm, pre_act, pool
        self.expand_conv, self.expand_norm, self.expand_act = expand_conv, expand_norm, expand_act
        self.dw_conv, self.dw_norm, self.dw_act = dw_conv, dw_norm, dw_act
        self.se, self.se_early = se, se_early
        self.project_conv, self.project_norm = project_conv, project_norm

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C_out, H / stride, W / stride)
        x = self.pool(self.pre_act(self.pre_norm(x)))
        x = self.expand_act(self.expand_norm(self.expand_conv(x)))  # (B, hidden, H', W')
        x = x + self.dw_conv(x) if self.dw_residual else self.dw_conv(x)  # (B, hidden, H', W')
        if self.se_early:
            x = self.se(x)
        x = self.dw_act(self.dw_norm(x))
        if not self.se_early:
            x = self.se(x)
        return self.project_norm(self.project_conv(x))  # (B, C_out, H', W')


def _build_mbconv(spec: MbConvSpec, r: Resolved) -> MbConv:
    x = r.in_type
    out = r.out_type
    width = hidden_width(spec, x)
    hidden = out.with_channels(width)
    pooled = spec.stride_mode == "pool" and spec.stride > 1
    dw_stride = 1 if spec.stride_mode == "pool" else spec.stride
    expand_conv = nn.Conv2d(x.channels, width, 1, bias=spec.hidden_bias) if spec.expand else nn.Identity()
    dw_conv = same_conv(width, width, spec.kernel, dw_stride, spec.groups or width, spec.hidden_bias) \
        if spec.same_padding else nn.Conv2d(width, width, spec.kernel, stride=dw_stride,
                                            padding=dw_padding(spec.kernel, dw_stride), groups=spec.groups or width,
                                            bias=spec.hidden_bias)
    se: nn.Module = nn.Identity()
    if spec.se_ratio is not None:
        base = {"hidden": width, "in": x.channels, "out": out.channels}[spec.se_from]
        from timm.layers import SEModule
        se = SEModule(width, rd_channels=max(1, int(spec.se_ratio * base)), act_layer=act_layer(spec.se_act),
                      gate_layer=act_layer(spec.se_gate))
    return MbConv(
        pre_norm=build_norm(spec.pre_norm, x), pre_act=make_act(spec.pre_act),
        pool=nn.AvgPool2d(spec.stride, spec.stride) if pooled else nn.Identity(),
        expand_conv=expand_conv, expand_norm=build_norm(spec.norm if spec.expand else None, hidden),
        expand_act=make_act(spec.act if spec.expand else "identity"),
        dw_conv=dw_conv, dw_norm=build_norm(spec.norm, hidden), dw_act=make_act(spec.act),
        se=se, se_early=spec.se_early,
        project_conv=nn.Conv2d(width, out.channels, 1, bias=spec.out_bias),
        project_norm=build_norm(spec.out_norm, out), dw_residual=spec.dw_residual,
    )


def fold_mbconv(module: nn.Module) -> Folding | None:
    """Each BatchNorm folds into the conv before it (not across an early SE or an inner residual); a norm before
    the block folds into the first conv when nothing comes between (no pre-norm, activation or pooling), a layer
    scale after it into the projection once its norm is folded."""
    if not isinstance(module, MbConv):
        return None
    se = ("se",)
    order = ("pre_norm", "pre_act", "pool", "expand_conv", "expand_norm", "expand_act", "dw_conv",
             *(se if module.se_early else ()), "dw_norm", "dw_act", *(() if module.se_early else se),
             "project_conv", "project_norm")
    plain_input = all(isinstance(m, nn.Identity) for m in (module.pre_norm, module.pre_act, module.pool))
    first = module.expand_conv if isinstance(module.expand_conv, nn.Conv2d) else module.dw_conv
    # an inner residual (y + dw(y)) comes between the kxk conv and its norm: the chain breaks there
    cut = order.index("dw_conv") + 1 if module.dw_residual else len(order)
    return Folding(reads=(first,) if plain_input else (),
                   writes=module.project_conv if isinstance(module.project_norm, nn.Identity) else None,
                   deploy=lambda: fold_parts(fold_parts(module, order[:cut]), order[cut:]))


_COATNET = {"stride": 2, "out_dim": 16, "stride_mode": "pool", "divisor": 8, "pre_norm": {"type": "batchnorm"},
            "pre_act": "silu", "se_ratio": 0.25, "se_early": True}
_EFFICIENTVIT = {"stride": 2, "out_dim": 16, "kernel": 5, "norm": None, "hidden_bias": True, "act": "hardswish",
                 "out_norm": {"type": "batchnorm"}}

MBCONV = around_prefix(OpDef(
    MbConvSpec,
    infer=mbconv_shape,
    build=_build_mbconv,
    fold=fold_mbconv,
    cases=(
        Case({}, _MAPS),
        Case(_COATNET, _MAPS, id="coatnet-down"),
        Case(_EFFICIENTVIT, TensorType("maps", 8, 7, 5), id="efficientvit-down"),
        Case({"expand": False, "ratio": 1.0, "act": "hardswish", "out_norm": {"type": "batchnorm"}}, _MAPS,
             id="dsconv"),
        Case({"expand_from": "out", "out_dim": 12, "se_ratio": 0.25, "se_from": "out", "se_act": "silu",
              "act": "gelu"}, _MAPS, id="expand-out-se-late"),
        Case({"groups": 4, "dw_residual": True}, _MAPS, id="grouped-inner-residual"),
        Case({"stride": 2, "expand_from": "out", "out_dim": 12, "se_ratio": 0.25, "se_from": "out",
              "pre_norm": {"type": "batchnorm"}, "out_bias": True, "same_padding": True}, TensorType("maps", 8, 7, 6),
             id="maxvit-tf-same"),
        Case({**_COATNET, "dw_residual": True, "groups": 8}, _MAPS, id="pooled-inner-residual"),
        Case({**_COATNET, "prefix": "linear"}, TensorType("tokens", 8, 6, 6, prefix=1), id="prefix-linear"),
        Case({"act": "hardswish", "out_norm": {"type": "batchnorm"}, "se_ratio": 0.125, "se_gate": "hardsigmoid",
              "prefix": "zero"}, TensorType("tokens", 8, 6, 6, prefix=1), id="localvit-ffn"),
    ),
), layout="maps")
