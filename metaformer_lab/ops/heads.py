"""Classifier heads: global pool + norm + linear, class token(s), MLP head.

With ``num_classes: 0`` a head stops before its classifier and returns the pooled features.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, NonNegInt, OpSpec, PosInt, Prob, Ratio, make_act, require_layout
from metaformer_lab.ops.norms import BatchNormSpec, LayerNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.stems import ConvNormAct

_MAPS = TensorType("maps", 16, 3, 4)
_TOKENS = TensorType("tokens", 16, 3, 4)
_PREFIXED = TensorType("tokens", 16, 3, 4, prefix=2)

Pool = Literal["avg", "max"]


class GlobalPool(nn.Module):
    """Pools every layout to (B, C); prefix tokens are left out of the pool (as timm's ViT does)."""

    def __init__(self, mode: Pool, x: TensorType) -> None:
        super().__init__()
        self.mode, self.layout, self.prefix = mode, x.layout, x.prefix

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "vector":
            return x
        if self.layout == "maps":
            dims: tuple[int, ...] = (2, 3)  # (B, C, H, W)
        elif self.prefix:
            x, dims = x[:, self.prefix:], (1,)  # (B, H*W, C)
        else:
            dims = (1, 2)  # (B, H, W, C)
        return x.mean(dims) if self.mode == "avg" else x.amax(dims)


def _pooled_shape(x: TensorType, norm: OpSpec | None) -> TensorType:
    require_layout(x, "maps", "tokens", "vector", op="a head")
    pooled = TensorType("vector", x.channels)
    check_norm(norm, pooled, "norm")
    return pooled


class PoolNormLinearSpec(OpSpec):
    """Global pooling, a norm, dropout and a Linear classifier (timm ``ClassifierHead`` + norm)."""

    type: Literal["pool_norm_linear"] = "pool_norm_linear"
    pool: Pool = "avg"
    norm: NormSpec | None = Field(default_factory=LayerNormSpec, description="applied after pooling")
    drop: Prob = 0.0
    bias: bool = True
    distilled: bool = Field(False, description="a second classifier fc_dist on the same features, averaged with fc "
                                               "(EfficientFormer's head + head_dist)")


class PoolNormLinear(nn.Module):
    def __init__(self, pool: GlobalPool, norm: nn.Module, drop: float, fc: nn.Module,
                 fc_dist: nn.Module | None = None) -> None:
        super().__init__()
        self.pool, self.norm, self.drop, self.fc = pool, norm, nn.Dropout(drop), fc
        self.fc_dist = fc_dist

    def forward(self, x: Tensor) -> Tensor:  # any layout -> (B, num_classes)
        x = self.drop(self.norm(self.pool(x)))
        if self.fc_dist is None:
            return self.fc(x)
        return (self.fc(x) + self.fc_dist(x)) / 2  # timm's order, for exact parity


def _pool_norm_linear_shape(spec: PoolNormLinearSpec, x: TensorType, num_classes: int) -> TensorType:
    pooled = _pooled_shape(x, spec.norm)
    return pooled.with_channels(num_classes or pooled.channels)


def _build_pool_norm_linear(spec: PoolNormLinearSpec, r: Resolved) -> nn.Module:
    x, num_classes = r.in_type, r.out_dim
    pooled = _pooled_shape(x, spec.norm)
    fc = nn.Linear(x.channels, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    fc_dist = nn.Linear(x.channels, num_classes, bias=spec.bias) if num_classes and spec.distilled else None
    return PoolNormLinear(GlobalPool(spec.pool, x), build_norm(spec.norm, pooled), spec.drop, fc, fc_dist)


class ClassTokenSpec(OpSpec):
    """Classify from prefix tokens: one Linear per listed token, outputs averaged (ViT; DeiT's
    class + distillation tokens)."""

    type: Literal["class_token"] = "class_token"
    tokens: list[NonNegInt] = Field(default_factory=lambda: [0], min_length=1, max_length=8,
                                    description="indices of the prefix tokens that each get a classifier")
    norm: NormSpec | None = Field(None, description="applied to the selected tokens (timm's fc_norm)")
    drop: Prob = 0.0
    bias: bool = True


class ClassTokenHead(nn.Module):
    def __init__(self, tokens: list[int], norm: nn.Module, drop: float, fcs: list[nn.Module]) -> None:
        super().__init__()
        self.tokens = tokens
        self.norm, self.drop = norm, nn.Dropout(drop)
        self.fc = nn.ModuleList(fcs)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, num_classes)
        outs = [fc(self.drop(self.norm(x[:, t]))) for t, fc in zip(self.tokens, self.fc, strict=True)]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)


def _class_token_shape(spec: ClassTokenSpec, x: TensorType, num_classes: int) -> TensorType:
    require_layout(x, "tokens", op="class_token")
    for i, t in enumerate(spec.tokens):
        if t >= x.prefix:
            raise ShapeIssue(f"tokens[{i}]",
                             f"{t} is not a prefix token index; the input has {x.prefix} prefix token(s)")
    out = TensorType("vector", x.channels)
    check_norm(spec.norm, out, "norm")
    return out.with_channels(num_classes or x.channels)


def _build_class_token(spec: ClassTokenSpec, r: Resolved) -> nn.Module:
    x, num_classes = r.in_type, r.out_dim
    def fc() -> nn.Module:
        return nn.Linear(x.channels, num_classes, bias=spec.bias) if num_classes else nn.Identity()

    norm = build_norm(spec.norm, TensorType("vector", x.channels))
    return ClassTokenHead(list(spec.tokens), norm, spec.drop, [fc() for _ in spec.tokens])


class MlpHeadSpec(OpSpec):
    """Pool, norm, then a two-layer MLP classifier (ConvFormer/CAFormer's ``MlpHead``)."""

    type: Literal["mlp_head"] = "mlp_head"
    pool: Pool = "avg"
    norm: NormSpec | None = Field(default_factory=LayerNormSpec, description="applied after pooling")
    ratio: Ratio = 4.0
    act: Act = "squared_relu"
    hidden_norm: NormSpec | None = Field(default_factory=LayerNormSpec)
    drop: Prob = 0.0
    bias: bool = True


class MlpHead(nn.Module):
    def __init__(self, pool: GlobalPool, norm: nn.Module, fc1: nn.Module, act: nn.Module, hidden_norm: nn.Module,
                 drop: float, fc2: nn.Module) -> None:
        super().__init__()
        self.pool, self.norm = pool, norm
        self.fc1, self.act, self.hidden_norm, self.drop, self.fc2 = fc1, act, hidden_norm, nn.Dropout(drop), fc2

    def forward(self, x: Tensor) -> Tensor:  # any layout -> (B, num_classes)
        x = self.norm(self.pool(x))
        return self.fc2(self.drop(self.hidden_norm(self.act(self.fc1(x)))))


def _mlp_head_shape(spec: MlpHeadSpec, x: TensorType, num_classes: int) -> TensorType:
    pooled = _pooled_shape(x, spec.norm)
    check_norm(spec.hidden_norm, pooled.with_channels(int(spec.ratio * x.channels)), "hidden_norm")
    return pooled.with_channels(num_classes or pooled.channels)


def _build_mlp_head(spec: MlpHeadSpec, r: Resolved) -> nn.Module:
    x, num_classes = r.in_type, r.out_dim
    pooled = _mlp_head_shape(spec, x, 0)
    norm = build_norm(spec.norm, pooled)
    if not num_classes:
        return PoolNormLinear(GlobalPool(spec.pool, x), norm, 0.0, nn.Identity())
    hidden = int(spec.ratio * x.channels)
    return MlpHead(GlobalPool(spec.pool, x), norm, nn.Linear(x.channels, hidden, bias=spec.bias), make_act(spec.act),
                   build_norm(spec.hidden_norm, pooled.with_channels(hidden)), spec.drop,
                   nn.Linear(hidden, num_classes, bias=spec.bias))


POOL_NORM_LINEAR = OpDef(PoolNormLinearSpec, _pool_norm_linear_shape, _build_pool_norm_linear,
                         cases=(Case({}, _MAPS, 10), Case({"pool": "max", "norm": None}, _TOKENS, 10, id="max"),
                                Case({}, _PREFIXED, 0, id="features"),
                                Case({"distilled": True}, _TOKENS, 10, id="distilled"),
                                Case({"distilled": True, "norm": None}, _MAPS, 0, id="distilled-features")))
CLASS_TOKEN = OpDef(ClassTokenSpec, _class_token_shape, _build_class_token,
                    cases=(Case({}, _PREFIXED, 10), Case({"tokens": [0, 1], "norm": {"type": "layernorm"}},
                                                         _PREFIXED, 10, id="distilled")))
MLP_HEAD = OpDef(MlpHeadSpec, _mlp_head_shape, _build_mlp_head,
                 cases=(Case({}, _MAPS, 10), Case({"ratio": 2.0, "act": "gelu"}, _TOKENS, 10, id="tokens"),
                        Case({}, _MAPS, 0, id="features")))


class ConvMlpHeadSpec(OpSpec):
    """An optional 1x1 conv + norm + act on the map, global pooling, hidden Linear + norm + act layers, then
    the classifier (EfficientViT's ``efficientvit_mit.ClassifierHead``; with no hidden layer, EfficientNet's
    conv head; with no conv and an unnormed hidden layer, MobileNetV3's head).

    With ``num_classes: 0`` the hidden layers stay (timm's pre-logits) and only the classifier goes.
    """

    type: Literal["conv_mlp_head"] = "conv_mlp_head"
    conv_dim: PosInt | None = Field(None, description="width of the 1x1 conv before pooling; null: no conv")
    conv_norm: NormSpec | None = Field(default_factory=BatchNormSpec, description="norm after the conv")
    conv_bias: bool = False
    pool: Pool = "avg"
    hidden: list[PosInt] = Field(default_factory=list, max_length=4,
                                 description="widths of the hidden Linear layers after pooling")
    hidden_norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5),
                                         description="norm after each hidden Linear")
    hidden_bias: bool = False
    act: Act = Field("hardswish", description="activation after the conv's norm and each hidden layer's norm")
    drop: Prob = Field(0.0, description="dropout before the classifier")
    bias: bool = True


class LinearNormAct(nn.Module):
    def __init__(self, fc: nn.Linear, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.fc, self.norm, self.act = fc, norm, act

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in) -> (B, C_out)
        return self.act(self.norm(self.fc(x)))


class ConvMlpHead(nn.Module):
    def __init__(self, conv: nn.Module, pool: GlobalPool, hidden: list[nn.Module], drop: float, fc: nn.Module) -> None:
        super().__init__()
        self.conv, self.pool = conv, pool
        self.hidden = nn.Sequential(*hidden)
        self.drop, self.fc = nn.Dropout(drop), fc

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or tokens -> (B, num_classes)
        x = self.hidden(self.pool(self.conv(x)))  # (B, hidden[-1])
        return self.fc(self.drop(x))


def _conv_mlp_head_types(spec: ConvMlpHeadSpec, x: TensorType) -> list[TensorType]:
    """The conv's output type, then the pooled vector and each hidden layer's output."""
    if spec.conv_dim is not None:
        require_layout(x, "maps", op="conv_mlp_head's conv")
        x = x.with_channels(spec.conv_dim)
        check_norm(spec.conv_norm, x, "conv_norm")
    types = [x, _pooled_shape(x, None)]
    for width in spec.hidden:
        types.append(TensorType("vector", width))
        check_norm(spec.hidden_norm, types[-1], "hidden_norm")
    return types


def _conv_mlp_head_shape(spec: ConvMlpHeadSpec, x: TensorType, num_classes: int) -> TensorType:
    out = _conv_mlp_head_types(spec, x)[-1]
    return out.with_channels(num_classes or out.channels)


def _build_conv_mlp_head(spec: ConvMlpHeadSpec, r: Resolved) -> nn.Module:
    x, num_classes = r.in_type, r.out_dim
    mapped, *vectors = _conv_mlp_head_types(spec, x)
    conv: nn.Module = nn.Identity()
    if spec.conv_dim is not None:
        conv = ConvNormAct(nn.Conv2d(x.channels, spec.conv_dim, 1, bias=spec.conv_bias),
                           build_norm(spec.conv_norm, mapped), make_act(spec.act))
    hidden: list[nn.Module] = [
        LinearNormAct(nn.Linear(a.channels, b.channels, bias=spec.hidden_bias), build_norm(spec.hidden_norm, b),
                      make_act(spec.act))
        for a, b in zip(vectors, vectors[1:], strict=False)]
    width = vectors[-1].channels
    fc = nn.Linear(width, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    return ConvMlpHead(conv, GlobalPool(spec.pool, mapped), hidden, spec.drop, fc)


CONV_MLP_HEAD = OpDef(ConvMlpHeadSpec, _conv_mlp_head_shape, _build_conv_mlp_head,
                      cases=(Case({"conv_dim": 32, "hidden": [24]}, _MAPS, 10),
                             Case({"conv_dim": 24}, _MAPS, 10, id="conv-only"),
                             Case({"hidden": [32, 24], "hidden_norm": None, "hidden_bias": True, "act": "gelu"},
                                  _TOKENS, 10, id="mlp-tokens"),
                             Case({"conv_dim": 32, "hidden": [24]}, _MAPS, 0, id="features")))
