"""Stems: patchify (ViT), overlapping conv (PoolFormer, PVTv2), conv stack (EfficientFormer, CoAtNet, CMT, ResNet)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, Groups, KernelInt, OpSpec, PosInt, make_act, require_groups, require_layout
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import BatchNormSpec, NormSpec, build_norm, check_norm

_IMAGE = TensorType("maps", 3, 32, 32)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def same_conv(cin: int, cout: int, kernel: int, stride: int, groups: int, bias: bool) -> nn.Conv2d:
    """A conv with TensorFlow's 'same' padding (timm ``create_conv2d(padding='same')``): ``ceil(size / stride)``
    outputs; a strided conv pads at run time, the odd pixel at the bottom/right (timm ``Conv2dSame``)."""
    from timm.layers import create_conv2d
    conv: nn.Conv2d = create_conv2d(cin, cout, kernel, stride=stride, padding="same", groups=groups, bias=bias)
    return conv


def same_out(size: int, stride: int) -> int:
    """Outputs of a 'same'-padded conv or pool: ``ceil(size / stride)``."""
    return -(-size // stride)


SAME_PADDING_DOC = ("TensorFlow 'same' padding: ceil(size / stride) outputs, a strided conv pads more at the "
                    "bottom/right (timm padding='same': MaxViT's tf models)")


def default_padding(kernel: int, stride: int) -> int:
    """Padding that gives ``size / stride`` outputs for sizes divisible by the stride (k3s2 -> 1, k2s2 -> 0)."""
    return max(0, (kernel - stride + 1) // 2)


class ConvEmbed(nn.Module):
    """``act(post(conv(pre(x))))`` on maps: the shape of most stems and strided downsamplers.

    Named as timm names them: a single norm is ``norm`` whether it comes before the conv (MetaFormer's
    ``Downsampling``) or after it (its ``Stem``, PVTv2's patch embedding); with both, the first is ``pre_norm``.
    ``conv`` is a Conv2d, or any module that reads the maps as one (CrossFormer's several convs).
    """

    def __init__(self, pre: nn.Module, conv: nn.Module, post: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm_first = isinstance(post, nn.Identity) and not isinstance(pre, nn.Identity)
        self.pre_norm = nn.Identity() if self.norm_first else pre
        self.conv = conv
        self.norm = pre if self.norm_first else post
        self.act = nn.Identity() if act is None else act

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        x = self.pre_norm(x)
        x = self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))
        return self.act(x)


def strided_conv_shape(x: TensorType, dim: int, kernel: int, stride: int, padding: int,
                       norms: dict[str, OpSpec | None], groups: int = 1) -> TensorType:
    """Shared shape rule of conv stems and conv downsamplers (norms: field name -> norm spec)."""
    require_layout(x, "maps", op="a strided conv")
    require_groups(groups, input=x.channels, output=dim)
    if padding >= kernel:
        raise ShapeIssue("padding", f"{padding} must be smaller than the kernel {kernel}")
    h, w = conv_out(x.height, kernel, stride, padding), conv_out(x.width, kernel, stride, padding)
    if h < 1 or w < 1:
        raise ShapeIssue("kernel", f"{kernel} is larger than the padded {x.height}x{x.width} input")
    out = x.with_channels(dim).with_grid(h, w)
    for name, norm in norms.items():
        check_norm(norm, x if name.endswith("before") else out, name)
    return out


class PatchifySpec(OpSpec):
    """Non-overlapping patches: a conv with kernel = stride = patch (ViT, Swin, ConvNeXt)."""

    type: Literal["patchify"] = "patchify"
    patch: KernelInt = 16
    bias: bool = True
    norm_after: NormSpec | None = None
    dim: PosInt | None = Field(None, description="output width; default: the first stage's width")
    groups: Groups = Field(1, description="conv groups (1: a full conv); must divide the input and output widths")

    key_optional = frozenset({"groups"})


def _patchify_shape(spec: PatchifySpec, x: TensorType, dim: int) -> TensorType:
    require_layout(x, "maps", op="patchify")
    if x.height % spec.patch or x.width % spec.patch:
        raise ShapeIssue("patch", f"{spec.patch} does not divide the {x.height}x{x.width} input")
    return strided_conv_shape(x, dim, spec.patch, spec.patch, 0, {"norm_after": spec.norm_after}, spec.groups)


def _build_patchify(spec: PatchifySpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    conv = nn.Conv2d(x.channels, dim, spec.patch, stride=spec.patch, bias=spec.bias, groups=spec.groups)
    out = r.out_type
    return ConvEmbed(nn.Identity(), conv, build_norm(spec.norm_after, out))


class ConvStemSpec(OpSpec):
    """One strided, usually overlapping conv (PoolFormer's 7x7 stride 4, PVTv2's 7x7 stride 4 pad 3)."""

    type: Literal["conv"] = "conv"
    kernel: KernelInt = 7
    stride: KernelInt = 4
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")
    bias: bool = True
    norm_after: NormSpec | None = None
    dim: PosInt | None = Field(None, description="output width; default: the first stage's width")
    groups: Groups = Field(1, description="conv groups (1: a full conv); must divide the input and output widths")

    key_optional = frozenset({"groups"})


def _conv_stem_shape(spec: ConvStemSpec, x: TensorType, dim: int) -> TensorType:
    padding = default_padding(spec.kernel, spec.stride) if spec.padding is None else spec.padding
    return strided_conv_shape(x, dim, spec.kernel, spec.stride, padding, {"norm_after": spec.norm_after}, spec.groups)


def _build_conv_stem(spec: ConvStemSpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    padding = default_padding(spec.kernel, spec.stride) if spec.padding is None else spec.padding
    conv = nn.Conv2d(x.channels, dim, spec.kernel, stride=spec.stride, padding=padding, bias=spec.bias,
                     groups=spec.groups)
    return ConvEmbed(nn.Identity(), conv, build_norm(spec.norm_after, r.out_type))


class StemPoolSpec(OpSpec):
    """A max-pool after a stem's convs (ResNet's 3x3 stride 2, padding 1)."""

    kernel: KernelInt = 3
    stride: KernelInt = 2
    padding: int | None = Field(None, ge=0, le=31, description="default: (kernel - stride + 1) // 2; at most "
                                "half the kernel")


class ConvStackSpec(OpSpec):
    """A stack of convs, each followed by a norm and an activation, then an optional max-pool (EfficientFormer,
    LeViT, CoAtNet, CMT, Visformer, ResNet)."""

    type: Literal["conv_stack"] = "conv_stack"
    strides: list[KernelInt] = Field(default_factory=lambda: [2, 2], min_length=1, max_length=8,
                                     description="one entry per conv")
    widths: list[PosInt] | None = Field(None, description="output widths of all convs but the last "
                                        "(which gives the stem's width); default: half of it")
    kernel: KernelInt = 3
    kernels: list[KernelInt] | None = Field(None, description="kernel of each conv (one entry per conv); "
                                            "default: kernel for every conv")
    bias: bool = Field(False, description="conv bias (usually off, a norm follows)")
    norm: NormSpec | None = Field(default_factory=BatchNormSpec)
    act: Act = "relu"
    order: Literal["norm_act", "act_norm"] = Field("norm_act", description="after each conv: its norm, then the "
                                                   "activation; act_norm: the activation first (CMT)")
    last_norm: bool = True
    last_act: bool = True
    pool: StemPoolSpec | None = Field(None, description="a max-pool after the convs (ResNet: {kernel: 3, stride: 2})")
    dim: PosInt | None = Field(None, description="output width; default: the first stage's width")
    groups: list[Groups] | None = Field(None, description="groups of each conv (one entry per conv); "
                                        "default: 1, full convs")
    same_padding: bool = Field(False, description=SAME_PADDING_DOC)

    key_optional = frozenset({"groups", "kernels", "order", "pool", "same_padding"})


class ConvNormAct(nn.Module):
    """``act(norm(conv(x)))``, or ``norm(act(conv(x)))`` with ``act_first`` (CMT's stem)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module, act_first: bool = False) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act
        self.act_first = act_first

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        x = self.conv(x)
        return self.norm(self.act(x)) if self.act_first else self.act(self.norm(x))


def _stack_widths(spec: ConvStackSpec, dim: int) -> list[int]:
    n = len(spec.strides)
    hidden = spec.widths if spec.widths is not None else [max(1, dim // 2)] * (n - 1)
    if len(hidden) != n - 1:
        raise ShapeIssue("widths", f"needs {n - 1} entries (one per conv but the last), got {len(hidden)}")
    return [*hidden, dim]


def _per_conv(spec: ConvStackSpec, field: str, default: int) -> list[int]:
    """A per-conv list field (``groups``, ``kernels``), checked against ``strides``; ``default`` for every conv."""
    n, values = len(spec.strides), getattr(spec, field)
    if values is not None and len(values) != n:
        raise ShapeIssue(field, f"needs {n} entries (one per conv), got {len(values)}")
    return values or [default] * n


def _stack_pool_padding(pool: StemPoolSpec) -> int:
    padding = default_padding(pool.kernel, pool.stride) if pool.padding is None else pool.padding
    if 2 * padding > pool.kernel:
        raise ShapeIssue("pool.padding", f"{padding} is more than half the kernel {pool.kernel}")
    return padding


def _conv_stack_types(spec: ConvStackSpec, x: TensorType, dim: int) -> list[TensorType]:
    """The output type of each conv, then of the pool when there is one."""
    types: list[TensorType] = []
    layers = zip(spec.strides, _per_conv(spec, "kernels", spec.kernel), _stack_widths(spec, dim),
                 _per_conv(spec, "groups", 1), strict=True)
    for i, (stride, kernel, width, groups) in enumerate(layers):
        try:
            require_groups(groups, f"groups[{i}]", input=x.channels, output=width)
            h, w = same_out(x.height, stride), same_out(x.width, stride)
            x = strided_conv_shape(x, width, kernel, stride, default_padding(kernel, stride), {})
            x = x.with_grid(h, w) if spec.same_padding else x
        except ShapeIssue as issue:
            field = "kernels" if issue.field == "kernel" and spec.kernels else "strides"
            raise ShapeIssue(issue.field if issue.field.startswith("groups") else f"{field}[{i}]",
                             issue.message) from None
        types.append(x)
    check_norm(spec.norm, types[-1], "norm")
    if spec.pool is not None:
        try:
            types.append(strided_conv_shape(x, x.channels, spec.pool.kernel, spec.pool.stride,
                                            _stack_pool_padding(spec.pool), {}))
        except ShapeIssue as issue:
            raise ShapeIssue(issue.field if issue.field.startswith("pool") else f"pool.{issue.field}",
                             issue.message) from None
    return types


def _build_conv_stack(spec: ConvStackSpec, r: Resolved) -> nn.Module:
    x, dim = r.in_type, r.out_dim
    layers: list[nn.Module] = []
    types = _conv_stack_types(spec, x, dim)
    n = len(spec.strides)
    layers_in = zip(spec.strides, _per_conv(spec, "kernels", spec.kernel), _per_conv(spec, "groups", 1), types[:n],
                    strict=True)
    for i, (stride, kernel, groups, out) in enumerate(layers_in):
        last = i == n - 1
        conv = same_conv(x.channels, out.channels, kernel, stride, groups, spec.bias) if spec.same_padding else \
            nn.Conv2d(x.channels, out.channels, kernel, stride=stride, padding=default_padding(kernel, stride),
                      bias=spec.bias, groups=groups)
        norm = build_norm(spec.norm if (spec.last_norm or not last) else None, out)
        act = make_act(spec.act) if (spec.last_act or not last) else nn.Identity()
        layers.append(ConvNormAct(conv, norm, act, act_first=spec.order == "act_norm"))
        x = out
    if spec.pool is not None:
        layers.append(nn.MaxPool2d(spec.pool.kernel, spec.pool.stride, padding=_stack_pool_padding(spec.pool)))
    return nn.Sequential(*layers)


def fold_conv_embed(module: nn.Module) -> Folding | None:
    """A conv's norms fold into it: a BatchNorm after it (torch's fusion), a norm's affine before it where exact
    (the conv does not pad, or the norm has no bias); a conv that ends the module also takes a scale after it
    (a res scale on a downsampling shortcut)."""
    if isinstance(module, ConvEmbed):
        names = ("pre_norm", "norm", "conv") if module.norm_first else ("pre_norm", "conv", "norm")
        ends_in_conv = ((module.norm_first or isinstance(module.norm, nn.Identity))
                        and isinstance(module.act, nn.Identity) and isinstance(module.conv, nn.Conv2d))
        return Folding(writes=module.conv if ends_in_conv else None, deploy=lambda: fold_parts(module, names))
    if isinstance(module, ConvNormAct):
        names = ("conv", "act", "norm") if module.act_first else ("conv", "norm")
        return Folding(deploy=lambda: fold_parts(module, names))
    return None


PATCHIFY = OpDef(PatchifySpec, _patchify_shape, _build_patchify, fold=fold_conv_embed,
                 cases=(Case({"patch": 4}, _IMAGE, 16), Case({"patch": 8, "norm_after": {"type": "layernorm"}},
                                                              _IMAGE, 16, id="norm"),
                        Case({"patch": 4, "groups": 3}, _IMAGE, 12, id="grouped")))
CONV_STEM = OpDef(ConvStemSpec, _conv_stem_shape, _build_conv_stem, fold=fold_conv_embed,
                  cases=(Case({}, _IMAGE, 16), Case({"kernel": 3, "stride": 1, "norm_after": {"type": "batchnorm"}},
                                                    _IMAGE, 8, id="k3s1"),
                         Case({"kernel": 3, "stride": 2, "groups": 3}, _IMAGE, 12, id="grouped")))
CONV_STACK = OpDef(ConvStackSpec, lambda spec, x, dim: _conv_stack_types(spec, x, dim)[-1], _build_conv_stack,
                   fold=fold_conv_embed,
                   cases=(Case({}, _IMAGE, 16), Case({"strides": [2, 1, 2], "widths": [8, 12], "act": "gelu",
                                                      "last_act": False}, _IMAGE, 16, id="three"),
                          Case({"strides": [2, 1], "widths": [8], "groups": [1, 4]}, _IMAGE, 16, id="grouped"),
                          Case({"strides": [2, 1, 1], "widths": [8, 8], "act": "gelu", "order": "act_norm"}, _IMAGE,
                               8, id="cmt"),
                          Case({"strides": [2], "kernels": [7], "pool": {}}, _IMAGE, 8, id="resnet"),
                          Case({"strides": [2, 1], "widths": [8], "bias": True, "last_norm": False, "last_act": False,
                                "same_padding": True}, TensorType("maps", 3, 15, 16), 8, id="maxvit-tf-same")))
