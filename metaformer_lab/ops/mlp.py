"""Channel mixers: MLP/FFN, ConvFFN (PVTv2) and the GLU family (GLU, SwiGLU, GEGLU, TransNeXt's ConvGLU)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    Act,
    DwGroups,
    OddKernel,
    OpSpec,
    PosInt,
    Prob,
    Ratio,
    act_layer,
    channel_dim,
    join_prefix,
    make_act,
    pointwise,
    require_grid,
    require_groups,
    require_layout,
    split_prefix,
)
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import NormSpec, build_norm, check_norm
from metaformer_lab.ops.packed import PackedLinear, gelu_of
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix

_MAPS = TensorType("maps", 8, 4, 5)
_TOKENS = TensorType("tokens", 8, 4, 5)
_PREFIXED = TensorType("tokens", 8, 4, 5, prefix=2)
_VECTOR = TensorType("vector", 8)


def _channelwise(spec: OpSpec, x: TensorType, out_dim: int | None) -> TensorType:
    return x


class MlpSpec(OpSpec):
    """Two-layer MLP over channels (timm ``Mlp``; 1x1 convs on maps, Linear on tokens), optionally with
    norms on the hidden layer and the output (EfficientFormer's ``ConvMlpWithNorm``: fc1 -> BN -> act ->
    fc2 -> BN)."""

    type: Literal["mlp"] = "mlp"
    ratio: Ratio = Field(4.0, description="hidden width = int(ratio * channels)")
    act: Act = "gelu"
    bias: bool = True
    drop: Prob = 0.0
    hidden_norm: NormSpec | None = Field(None, description="norm right after fc1, before the activation")
    out_norm: NormSpec | None = Field(None, description="norm after fc2")
    out_dim: PosInt | None = Field(None, description="output width; null: the input width (another width needs a "
                                                     "branch without a residual: a step with residual: false)")
    proj: bool = Field(False, description="adds a Linear (1x1 conv on maps) of the input at the output width: "
                                          "fc2(act(fc1(x))) + proj(x) (MViT's proj of the normed input where a "
                                          "block widens, in a step with residual: false)")

    key_optional = frozenset({"out_dim", "proj"})


class MlpWithNorms(nn.Module):
    """fc1 -> norm1 -> act -> drop -> fc2 -> norm2 -> drop, named as timm ``efficientformer.ConvMlpWithNorm`` (the
    spec's ``hidden_norm`` and ``out_norm``); plus ``proj(x)`` when it has one (MViT's widening ``proj``)."""

    def __init__(self, fc1: nn.Module, hidden_norm: nn.Module, act: nn.Module, drop: float, fc2: nn.Module,
                 out_norm: nn.Module, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.norm1, self.act, self.drop = fc1, hidden_norm, act, nn.Dropout(drop)
        self.fc2, self.norm2 = fc2, out_norm
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or (B, ..., C) -> same, at the output width
        y = self.drop(self.act(self.norm1(self.fc1(x))))
        y = self.drop(self.norm2(self.fc2(y)))
        return y if self.proj is None else y + self.proj(x)


def _mlp_shape(spec: MlpSpec, x: TensorType, out_dim: int | None) -> TensorType:
    out = x.with_channels(spec.out_dim or x.channels)
    check_norm(spec.hidden_norm, x.with_channels(int(spec.ratio * x.channels)), "hidden_norm")
    check_norm(spec.out_norm, out, "out_norm")
    return out


def _build_mlp(spec: MlpSpec, r: Resolved) -> nn.Module:
    x, out = r.in_type, r.out_type.channels
    hidden = int(spec.ratio * x.channels)
    if spec.hidden_norm is None and spec.out_norm is None and not spec.proj:
        from timm.layers import Mlp
        return Mlp(x.channels, hidden, out, act_layer=act_layer(spec.act), bias=spec.bias, drop=spec.drop,
                   use_conv=x.layout == "maps")
    fc1 = pointwise(x.layout, x.channels, hidden, spec.bias)
    fc2 = pointwise(x.layout, hidden, out, spec.bias)
    proj = pointwise(x.layout, x.channels, out) if spec.proj else None
    return MlpWithNorms(fc1, build_norm(spec.hidden_norm, x.with_channels(hidden)), make_act(spec.act), spec.drop,
                        fc2, build_norm(spec.out_norm, r.out_type), proj)


def _fuse_gelu(mlp: nn.Module) -> nn.Module:
    """timm's ``Mlp`` runs ``act`` right after ``fc1``: a GELU there joins fc1's kernel (ops.packed)."""
    gelu = gelu_of(mlp.act)
    if gelu is not None and type(mlp.fc1) is nn.Linear:
        mlp.fc1, mlp.act = PackedLinear.of(mlp.fc1, gelu), nn.Identity()
    return mlp


def fold_mlp(module: nn.Module) -> Folding | None:
    """An MLP's input feeds fc1 alone and fc2 writes its output: a norm before it folds into fc1, a layer scale
    after it into fc2; its own BatchNorms fold into the layer before them."""
    from timm.layers import GluMlp, Mlp

    if isinstance(module, (Mlp, GluMlp)):
        def deploy_timm() -> nn.Module:  # the GELU fuses only in Mlp itself (a subclass may run its own forward)
            folded = fold_parts(module, ("norm", "fc2"))
            return _fuse_gelu(folded) if type(module) is Mlp else folded

        return Folding(reads=(module.fc1,), writes=module.fc2, deploy=deploy_timm)
    if isinstance(module, MlpWithNorms):
        def deploy() -> nn.Module:
            return fold_parts(fold_parts(module, ("fc1", "norm1")), ("fc2", "norm2"))

        if module.proj is not None:  # the input feeds proj too, and the output is a sum
            return Folding(reads=(module.fc1, module.proj), deploy=deploy)
        writes = module.fc2 if isinstance(module.norm2, nn.Identity) else None
        return Folding(reads=(module.fc1,), writes=writes, deploy=deploy)
    if isinstance(module, ConvGlu):
        return Folding(reads=(module.fc1,), writes=module.fc2)
    if isinstance(module, ConvFfn):
        return Folding(reads=(module.fc1,), writes=module.fc2 if isinstance(module.out_norm, nn.Identity) else None)
    return None


MLP = OpDef(MlpSpec, _mlp_shape, _build_mlp, preserves_type=True, fold=fold_mlp,
            cases=(Case({}, _MAPS), Case({"act": "star_relu", "bias": False}, _TOKENS, id="tokens"),
                   Case({"ratio": 2.0}, _PREFIXED, id="prefixed"), Case({}, _VECTOR, id="vector"),
                   Case({"hidden_norm": {"type": "batchnorm"}, "out_norm": {"type": "batchnorm"}}, _MAPS,
                        id="efficientformer-bn"),
                   Case({"hidden_norm": {"type": "layernorm"}, "act": "star_relu"}, _PREFIXED, id="hidden-ln"),
                   Case({"out_dim": 16}, _TOKENS, id="wider"),
                   Case({"out_dim": 16, "proj": True}, _PREFIXED, id="mvit-proj"),
                   Case({"ratio": 2.0, "out_dim": 12, "proj": True}, _MAPS, id="proj-maps")))


class ConvFfnSpec(GridOpSpec):
    """FFN with a depthwise conv after the first layer (PVTv2's ``MlpWithDepthwiseConv``)."""

    type: Literal["conv_ffn"] = "conv_ffn"
    ratio: Ratio = 4.0
    kernel: OddKernel = 3
    act: Act = "gelu"
    bias: bool = True
    hidden_act: Act = Field("identity", description="activation right after fc1 (PVTv2-li uses relu)")
    drop: Prob = 0.0
    groups: DwGroups = Field(None, description="groups of the kxk conv; null: depthwise (one per channel)")
    dw_residual: bool = Field(False, description="an inner residual around the kxk conv: y + dw(y) (CMT's IRFFN)")
    hidden_norm: NormSpec | None = Field(None, description="norm after fc1 and hidden_act (CMT's conv1 BatchNorm)")
    dw_norm: NormSpec | None = Field(None, description="norm after the kxk conv's activation (CMT's proj_bn)")
    out_norm: NormSpec | None = Field(None, description="norm after fc2 (CMT's conv2 BatchNorm)")
    act_inside: bool = Field(False, description="with dw_residual, act inside the inner residual: y + act(dw(y)) "
                                                "(Conv2Former), not act(y + dw(y))")
    dw_bias: bool = Field(True, description="bias of the kxk conv (Visformer's grouped conv has none)")

    key_optional = frozenset({"groups", "dw_residual", "hidden_norm", "dw_norm", "out_norm", "act_inside", "dw_bias"})


class ConvFfn(nn.Module):
    """fc1 -> [act] -> [norm] -> depthwise conv -> act -> [norm] -> fc2 -> [norm]; prefix tokens skip the conv
    (the norms see them)."""

    def __init__(self, dim: int, spec: ConvFfnSpec, x: TensorType) -> None:
        super().__init__()
        hidden = int(spec.ratio * dim)
        self.maps = x.layout == "maps"
        self.prefix, self.grid = x.prefix, x.grid
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=spec.bias) if self.maps else nn.Linear(dim, hidden, bias=spec.bias)
        self.hidden_act = make_act(spec.hidden_act)
        self.dwconv = nn.Conv2d(hidden, hidden, spec.kernel, padding=spec.kernel // 2, groups=spec.groups or hidden,
                                bias=spec.dw_bias)
        self.dw_residual = spec.dw_residual
        self.act_inside = spec.dw_residual and spec.act_inside
        self.act = make_act(spec.act)
        self.drop = nn.Dropout(spec.drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=spec.bias) if self.maps else nn.Linear(hidden, dim, bias=spec.bias)
        self.hidden_norm = build_norm(spec.hidden_norm, x.with_channels(hidden))
        self.dw_norm = build_norm(spec.dw_norm, x.with_channels(hidden))
        self.out_norm = build_norm(spec.out_norm, x)

    def dw(self, x: Tensor) -> Tensor:  # (B, hidden, H, W) -> same
        """The kxk conv, with its inner residual ``x + dwconv(x)`` when asked (``x + act(dwconv(x))``, the
        activation inside)."""
        y = self.dwconv(x)
        if self.act_inside:
            return x + self.act(y)
        return x + y if self.dw_residual else y

    def forward(self, x: Tensor) -> Tensor:
        x = self.hidden_norm(self.hidden_act(self.fc1(x)))
        if self.maps:
            x = self.dw(x)  # (B, hidden, H, W)
        else:
            prefix, grid = split_prefix(x, self.prefix, self.grid)  # grid: (B, H, W, hidden)
            grid = self.dw(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = join_prefix(prefix, grid)
        x = self.drop(self.dw_norm(x if self.act_inside else self.act(x)))
        return self.drop(self.out_norm(self.fc2(x)))


def _conv_ffn_shape(spec: ConvFfnSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="conv_ffn")
    require_grid(x, op="conv_ffn")
    hidden = x.with_channels(int(spec.ratio * x.channels))
    check_norm(spec.hidden_norm, hidden, "hidden_norm")
    check_norm(spec.dw_norm, hidden, "dw_norm")
    check_norm(spec.out_norm, x, "out_norm")
    if spec.act_inside and not spec.dw_residual:
        raise ShapeIssue("act_inside", "puts the activation inside the inner residual; it needs dw_residual: true")
    if spec.groups is not None:
        require_groups(spec.groups, hidden=int(spec.ratio * x.channels))
    return x


CONV_FFN = around_prefix(OpDef(
    ConvFfnSpec, _conv_ffn_shape, lambda spec, r: ConvFfn(r.in_type.channels, spec, r.in_type), preserves_type=True,
    fold=fold_mlp,
    cases=(Case({}, _TOKENS), Case({"hidden_act": "relu", "kernel": 5}, _MAPS, id="maps"),
           Case({}, _PREFIXED, id="prefixed"),
           Case({"groups": 4, "dw_residual": True}, _PREFIXED, id="grouped-inner-residual"),
           Case({"groups": 8, "bias": False, "dw_bias": False, "hidden_act": "gelu"}, _MAPS, id="visformer-no-bias"),
           Case({"dw_residual": True}, _MAPS, id="maps-inner-residual"),
           Case({"dw_residual": True, "act_inside": True}, _MAPS, id="conv2former-act-inside"),
           Case({"dw_residual": True, "act_inside": True}, _PREFIXED, id="prefixed-act-inside"),
           Case({"prefix": "pass"}, _PREFIXED, id="leff-prefix-pass"),
           Case({"prefix": "zero", "dw_residual": True}, _PREFIXED, id="localvit-prefix-zero"),
           Case({"dw_residual": True, "hidden_act": "gelu", "hidden_norm": {"type": "batchnorm"},
                 "dw_norm": {"type": "batchnorm"}, "out_norm": {"type": "batchnorm"}}, _TOKENS, id="cmt-irffn"),
           Case({"dw_residual": True, "hidden_norm": {"type": "batchnorm"}, "dw_norm": {"type": "batchnorm"},
                 "out_norm": {"type": "batchnorm"}}, _MAPS, id="maps-irffn"))))


class GluSpec(OpSpec):
    """Gated linear unit FFN: ``fc2(a * act(g))`` with ``[a, g] = fc1(x)`` (timm ``GluMlp``).

    ``act: sigmoid`` is GLU, ``silu`` SwiGLU, ``gelu`` GEGLU. ``kernel`` adds a depthwise conv to the gate
    (TransNeXt's ``ConvolutionalGLU``, Shi 2024): ``fc2(act(dwconv(g)) * a)`` with ``[g, a] = fc1(x)``, the gate
    the first half then, as in the authors' code.
    """

    type: Literal["glu"] = "glu"
    ratio: Ratio = Field(4.0, description="width of the gated hidden layer = int(ratio * channels)")
    act: Act = "silu"
    bias: bool = True
    drop: Prob = 0.0
    kernel: OddKernel | None = Field(None, description="a depthwise kxk conv (with bias) on the gate before act, "
                                                       "fc1's first half the gate (TransNeXt's ConvGLU: 3); prefix "
                                                       "tokens skip the conv; null: none")

    key_optional = frozenset({"kernel"})


class ConvGlu(nn.Module):
    """fc1 -> [gate, value] -> ``act(dwconv(gate)) * value`` -> drop -> fc2 -> drop, named as TransNeXt's
    ``ConvolutionalGLU`` (its ``dwconv.dwconv`` is our ``dwconv``); prefix tokens skip the conv."""

    def __init__(self, dim: int, hidden: int, spec: GluSpec, x: TensorType) -> None:
        super().__init__()
        kernel = spec.kernel or 1
        self.maps, self.prefix, self.grid = x.layout == "maps", x.prefix, x.grid
        self.fc1 = pointwise(x.layout, dim, 2 * hidden, bias=spec.bias)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.act = make_act(spec.act)
        self.drop = nn.Dropout(spec.drop)
        self.fc2 = pointwise(x.layout, hidden, dim, bias=spec.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=channel_dim("maps" if self.maps else "tokens"))
        if self.maps:
            gate = self.dwconv(gate)  # (B, hidden, H, W)
        else:
            prefix, grid = split_prefix(gate, self.prefix, self.grid)  # grid: (B, H, W, hidden)
            gate = join_prefix(prefix, self.dwconv(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.drop(self.fc2(self.drop(self.act(gate) * value)))


def _glu_shape(spec: GluSpec, x: TensorType, out_dim: int | None) -> TensorType:
    if spec.kernel is not None:
        require_layout(x, "maps", "tokens", op="glu with a kernel")
        require_grid(x, op="glu with a kernel")
    return x


def _build_glu(spec: GluSpec, r: Resolved) -> nn.Module:
    # timm's GluMlp splits fc1's output in two halves, so fc1 is twice the gated width.
    x = r.in_type
    if spec.kernel is not None:
        return ConvGlu(x.channels, int(spec.ratio * x.channels), spec, x)
    from timm.layers import GluMlp
    return GluMlp(x.channels, 2 * int(spec.ratio * x.channels), act_layer=act_layer(spec.act), bias=spec.bias,
                  drop=spec.drop, use_conv=x.layout == "maps")


GLU = OpDef(GluSpec, _glu_shape, _build_glu, preserves_type=True, fold=fold_mlp,
            cases=(Case({}, _TOKENS), Case({"act": "gelu", "bias": False}, _MAPS, id="geglu-maps"),
                   Case({"act": "sigmoid"}, _PREFIXED, id="glu"),
                   Case({"act": "gelu", "kernel": 3, "ratio": 2.0}, _TOKENS, id="conv-glu"),
                   Case({"act": "gelu", "kernel": 3, "bias": False}, _MAPS, id="conv-glu-maps"),
                   Case({"act": "gelu", "kernel": 5}, _PREFIXED, id="conv-glu-prefixed")))
