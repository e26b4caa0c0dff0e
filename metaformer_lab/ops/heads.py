"""Classifier heads: global pool + norm + linear, class token(s), MLP head.

With ``num_classes: 0`` a head stops before its classifier and returns the pooled features.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, NonNegInt, OpSpec, Prob, Ratio, make_act, require_layout
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm

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


class PoolNormLinear(nn.Module):
    def __init__(self, pool: GlobalPool, norm: nn.Module, drop: float, fc: nn.Module) -> None:
        super().__init__()
        self.pool, self.norm, self.drop, self.fc = pool, norm, nn.Dropout(drop), fc

    def forward(self, x: Tensor) -> Tensor:  # any layout -> (B, num_classes)
        return self.fc(self.drop(self.norm(self.pool(x))))


def _pool_norm_linear_shape(spec: PoolNormLinearSpec, x: TensorType, num_classes: int) -> TensorType:
    pooled = _pooled_shape(x, spec.norm)
    return pooled.with_channels(num_classes or pooled.channels)


def _build_pool_norm_linear(spec: PoolNormLinearSpec, x: TensorType, num_classes: int) -> nn.Module:
    pooled = _pooled_shape(x, spec.norm)
    fc = nn.Linear(x.channels, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    return PoolNormLinear(GlobalPool(spec.pool, x), build_norm(spec.norm, pooled), spec.drop, fc)


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


def _build_class_token(spec: ClassTokenSpec, x: TensorType, num_classes: int) -> nn.Module:
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


def _build_mlp_head(spec: MlpHeadSpec, x: TensorType, num_classes: int) -> nn.Module:
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
                                Case({}, _PREFIXED, 0, id="features")))
CLASS_TOKEN = OpDef(ClassTokenSpec, _class_token_shape, _build_class_token,
                    cases=(Case({}, _PREFIXED, 10), Case({"tokens": [0, 1], "norm": {"type": "layernorm"}},
                                                         _PREFIXED, 10, id="distilled")))
MLP_HEAD = OpDef(MlpHeadSpec, _mlp_head_shape, _build_mlp_head,
                 cases=(Case({}, _MAPS, 10), Case({"ratio": 2.0, "act": "gelu"}, _TOKENS, 10, id="tokens"),
                        Case({}, _MAPS, 0, id="features")))
