"""Classifier heads: global pool + norm + linear, class token(s), MLP head.

With ``num_classes: 0`` a head stops before its classifier and returns the pooled features.
"""

from __future__ import annotations

from typing import Literal, cast

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    Act,
    NonNegInt,
    OpSpec,
    PosInt,
    Prob,
    Ratio,
    layout_change,
    make_act,
    require_layout,
)
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import BatchNormSpec, LayerNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.stems import ConvNormAct

_MAPS = TensorType("maps", 16, 3, 4)
_TOKENS = TensorType("tokens", 16, 3, 4)
_PREFIXED = TensorType("tokens", 16, 3, 4, prefix=2)

Pool = Literal["avg", "max"]


class GlobalPool(nn.Module):
    """Pools every layout to (B, C); prefix tokens are left out of the pool (as timm's ViT does).
    ``mode`` may be changed later (``Head.reset``'s ``global_pool``)."""

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


class Head(nn.Module):
    """What every head offers timm's model protocol (``Network.forward_head``, ``reset_classifier``): the features
    its classifier reads (``pre_logits``), the classifier itself, and resetting it for another class count."""

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        """The final classifier (a tuple where there are several, as timm's ``get_classifier``)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        fcs = self.classifier if isinstance(self.classifier, tuple) else (self.classifier,)
        return fcs[0].out_features if isinstance(fcs[0], nn.Linear) else 0

    def pre_logits(self, x: Tensor) -> Tensor:
        """The pooled (normed) features the classifier reads: timm's ``forward_head(x, pre_logits=True)``."""
        raise NotImplementedError

    def hidden_size(self, in_features: int) -> int:
        """The width of ``pre_logits`` for an input of ``in_features`` channels (timm's ``head_hidden_size``)."""
        return in_features

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none, the head returns ``pre_logits``), initialised as
        timm does; ``global_pool`` ('avg' or 'max') changes the pooling, None keeps it."""
        raise NotImplementedError

    @staticmethod
    def _set_pool(pool: GlobalPool, global_pool: str | None) -> None:
        if global_pool is None:
            return
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max' for this head, not {global_pool!r}")
        pool.mode = global_pool  # type: ignore[assignment]

    def _linear(self, in_features: int, out_features: int, bias: bool, device: torch.device | None,
                dtype: torch.dtype | None) -> nn.Module:
        """A Linear layer (Identity for 0 outputs) in timm's init (truncated normal .02, zero bias), in this
        head's train/eval mode."""
        if not out_features:
            return nn.Identity()
        from timm.layers import trunc_normal_

        fc = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        trunc_normal_(fc.weight, std=0.02)
        if fc.bias is not None:
            nn.init.zeros_(fc.bias)
        return fc.train(self.training)

    @staticmethod
    def _has_bias(fc: nn.Module) -> bool:
        """Whether a classifier has a bias (an Identity stands for the spec's default, True)."""
        return not isinstance(fc, nn.Linear) or fc.bias is not None


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


class PoolNormLinear(Head):
    def __init__(self, pool: GlobalPool, norm: nn.Module, drop: float, fc: nn.Module,
                 fc_dist: nn.Module | None = None) -> None:
        super().__init__()
        self.pool, self.norm, self.drop, self.fc = pool, norm, nn.Dropout(drop), fc
        self.fc_dist = fc_dist
        self.distilled, self.fc_bias = fc_dist is not None, self._has_bias(fc)

    @classmethod
    def plain(cls, x: TensorType, num_classes: int, pool: str = "avg", *, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> PoolNormLinear:
        """Pooling and a Linear classifier, no norm (timm's head after ``reset_classifier(..., reset_other=True)``)."""
        head = cls(GlobalPool("avg", x), nn.Identity(), 0.0, nn.Identity())
        head.reset(num_classes, pool, in_features=x.channels, device=device, dtype=dtype)
        return head

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        return self.fc if self.fc_dist is None else (self.fc, self.fc_dist)

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.drop(self.norm(self.pool(x)))

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self._set_pool(self.pool, global_pool)
        self.fc = self._linear(in_features, num_classes, self.fc_bias, device, dtype)
        distilled = self.distilled and num_classes > 0
        self.fc_dist = self._linear(in_features, num_classes, self.fc_bias, device, dtype) if distilled else None

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


class ClassTokenHead(Head):
    def __init__(self, tokens: list[int], norm: nn.Module, drop: float, fcs: list[nn.Module]) -> None:
        super().__init__()
        self.tokens = tokens
        self.norm, self.drop = norm, nn.Dropout(drop)
        self.fc = nn.ModuleList(fcs)
        self.fc_bias = self._has_bias(fcs[0])

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        return self.fc[0] if len(self.fc) == 1 else tuple(self.fc)

    def pre_logits(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, C); several tokens: their mean, as timm's DeiT
        feats = [self.drop(self.norm(x[:, t])) for t in self.tokens]
        return feats[0] if len(feats) == 1 else sum(feats[1:], feats[0]) / len(feats)

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"a class_token head reads its prefix tokens: global_pool must be 'token' or None, "
                             f"not {global_pool!r}")
        self.fc = nn.ModuleList([self._linear(in_features, num_classes, self.fc_bias, device, dtype)
                                 for _ in self.tokens])

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
    pre_logits: Literal["pooled", "hidden"] = Field(
        "pooled", description="what pre_logits (and the head with no classes) gives: pooled and normed, before the "
                              "MLP (timm's MetaFormer), or the hidden layer's output (timm's NormMlpClassifierHead: "
                              "MaxViT)")

    key_optional = frozenset({"pre_logits"})


class MlpHead(Head):
    """With no classes (``reset(0)``) its MLP becomes identities and the head returns ``pre_logits``; a later
    reset builds the MLP again (fresh weights, as timm's MetaFormer does)."""

    def __init__(self, pool: GlobalPool, norm: nn.Module, fc1: nn.Module, act: nn.Module, hidden_norm: nn.Module,
                 drop: float, fc2: nn.Module, hidden_pre_logits: bool = False) -> None:
        super().__init__()
        self.pool, self.norm, self.hidden_pre_logits = pool, norm, hidden_pre_logits
        self.fc1, self.act, self.hidden_norm, self.drop, self.fc2 = fc1, act, hidden_norm, nn.Dropout(drop), fc2
        # what a reset rebuilds the MLP from: hidden width, bias, activation, hidden norm (not submodules)
        self._mlp = (fc1.out_features, fc1.bias is not None, act, hidden_norm) if isinstance(fc1, nn.Linear) else None

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        return self.fc2

    def hidden(self, x: Tensor) -> Tensor:  # any layout -> (B, hidden)
        return self.drop(self.hidden_norm(self.act(self.fc1(self.norm(self.pool(x))))))

    def pre_logits(self, x: Tensor) -> Tensor:
        if self.hidden_pre_logits:  # timm's NormMlpClassifierHead: after the hidden layer
            return self.hidden(x)
        return self.norm(self.pool(x))  # timm's MetaFormer: pooled and normed, before the MLP

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        import copy

        self._set_pool(self.pool, global_pool)
        if self.hidden_pre_logits and self._mlp is not None:  # the hidden layer stays, as timm's does
            hidden, bias = self._mlp[0], self._mlp[1]
            self.fc2 = self._linear(hidden, num_classes, bias, device, dtype) if num_classes else nn.Identity()
            return
        if not num_classes or self._mlp is None:
            self.fc1, self.act, self.hidden_norm, self.fc2 = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
            if num_classes:  # nothing to rebuild the MLP from: a Linear classifier
                self.fc2 = self._linear(in_features, num_classes, True, device, dtype)
            return
        hidden, bias, act, hidden_norm = self._mlp
        norm = copy.deepcopy(hidden_norm).to(device=device, dtype=dtype).train(self.training)
        for m in norm.modules():
            reset_parameters = getattr(m, "reset_parameters", None)
            if callable(reset_parameters):
                reset_parameters()
        self.fc1 = self._linear(in_features, hidden, bias, device, dtype)
        self.act, self.hidden_norm = copy.deepcopy(act).train(self.training), norm
        self.fc2 = self._linear(hidden, num_classes, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:  # any layout -> (B, num_classes)
        return self.fc2(self.hidden(x))


def _mlp_head_shape(spec: MlpHeadSpec, x: TensorType, num_classes: int) -> TensorType:
    pooled = _pooled_shape(x, spec.norm)
    hidden = int(spec.ratio * x.channels)
    check_norm(spec.hidden_norm, pooled.with_channels(hidden), "hidden_norm")
    features = hidden if spec.pre_logits == "hidden" else pooled.channels
    return pooled.with_channels(num_classes or features)


def _build_mlp_head(spec: MlpHeadSpec, r: Resolved) -> nn.Module:
    x, num_classes = r.in_type, r.out_dim
    pooled = _pooled_shape(x, spec.norm)
    norm = build_norm(spec.norm, pooled)
    keep_hidden = spec.pre_logits == "hidden"
    if not num_classes and not keep_hidden:
        return PoolNormLinear(GlobalPool(spec.pool, x), norm, 0.0, nn.Identity())
    hidden = int(spec.ratio * x.channels)
    fc2 = nn.Linear(hidden, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    return MlpHead(GlobalPool(spec.pool, x), norm, nn.Linear(x.channels, hidden, bias=spec.bias), make_act(spec.act),
                   build_norm(spec.hidden_norm, pooled.with_channels(hidden)), spec.drop, fc2,
                   hidden_pre_logits=keep_hidden)


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
                        Case({}, _MAPS, 0, id="features"),
                        Case({"ratio": 1.0, "act": "tanh", "hidden_norm": None, "pre_logits": "hidden"}, _MAPS, 10,
                             id="maxvit"),
                        Case({"ratio": 2.0, "act": "tanh", "hidden_norm": None, "pre_logits": "hidden"}, _MAPS, 0,
                             id="maxvit-features")))


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
    conv_order: Literal["norm_act", "act_norm"] = Field(
        "norm_act", description="after the conv: its norm, then the activation; act_norm: the activation first "
                                "(Conv2Former)")
    pool: Pool = "avg"
    hidden: list[PosInt] = Field(default_factory=list, max_length=4,
                                 description="widths of the hidden Linear layers after pooling")
    hidden_norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5),
                                         description="norm after each hidden Linear")
    hidden_bias: bool = False
    act: Act = Field("hardswish", description="activation after the conv's norm and each hidden layer's norm")
    drop: Prob = Field(0.0, description="dropout before the classifier")
    bias: bool = True

    key_optional = frozenset({"conv_order"})


class LinearNormAct(nn.Module):
    def __init__(self, fc: nn.Linear, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.fc, self.norm, self.act = fc, norm, act

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in) -> (B, C_out)
        return self.act(self.norm(self.fc(x)))


class ConvMlpHead(Head):
    def __init__(self, conv: nn.Module, pool: GlobalPool, hidden: list[nn.Module], drop: float, fc: nn.Module,
                 to_maps: nn.Module | None = None) -> None:
        super().__init__()
        self.to_maps = to_maps or nn.Identity()  # tokens (B, H, W, C) -> maps before the conv (CMT)
        self.conv, self.pool = conv, pool
        self.hidden = nn.Sequential(*hidden)
        self.drop, self.fc = nn.Dropout(drop), fc
        self.fc_bias = self._has_bias(fc)

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        return self.fc

    def pre_logits(self, x: Tensor) -> Tensor:  # after the hidden layers (timm's EfficientViT head)
        return self.drop(self.hidden(self.pool(self.conv(self.to_maps(x)))))

    def hidden_size(self, in_features: int) -> int:
        if len(self.hidden):
            return cast(LinearNormAct, self.hidden[-1]).fc.out_features
        return int(self.conv.conv.out_channels) if isinstance(self.conv, ConvNormAct) else in_features

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self._set_pool(self.pool, global_pool)
        self.fc = self._linear(self.hidden_size(in_features), num_classes, self.fc_bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or tokens -> (B, num_classes)
        x = self.hidden(self.pool(self.conv(self.to_maps(x))))  # (B, hidden[-1])
        return self.fc(self.drop(x))


def _conv_mlp_head_types(spec: ConvMlpHeadSpec, x: TensorType) -> list[TensorType]:
    """The conv's output type, then the pooled vector and each hidden layer's output."""
    if spec.conv_dim is not None:
        require_layout(x, "maps", "tokens", op="conv_mlp_head's conv")
        if x.prefix:
            raise ShapeIssue("conv_dim", f"the conv sees a map, but the input has {x.prefix} prefix token(s)")
        x = x.to("maps").with_channels(spec.conv_dim)  # tokens are made a map first (CMT's head)
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
    to_maps = layout_change(x, "maps") if spec.conv_dim is not None and x.layout == "tokens" else None
    if spec.conv_dim is not None:
        conv = ConvNormAct(nn.Conv2d(x.channels, spec.conv_dim, 1, bias=spec.conv_bias),
                           build_norm(spec.conv_norm, mapped), make_act(spec.act),
                           act_first=spec.conv_order == "act_norm")
    hidden: list[nn.Module] = [
        LinearNormAct(nn.Linear(a.channels, b.channels, bias=spec.hidden_bias), build_norm(spec.hidden_norm, b),
                      make_act(spec.act))
        for a, b in zip(vectors, vectors[1:], strict=False)]
    width = vectors[-1].channels
    fc = nn.Linear(width, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    return ConvMlpHead(conv, GlobalPool(spec.pool, mapped), hidden, spec.drop, fc, to_maps)


def fold_hidden_layer(module: nn.Module) -> Folding | None:
    """A hidden layer's BatchNorm folds into its linear. Heads keep their other norms and their classifier as
    they are: ``forward_head(pre_logits=True)`` and ``reset_classifier`` read them."""
    if isinstance(module, LinearNormAct):
        return Folding(deploy=lambda: fold_parts(module, ("fc", "norm")))
    return None


CONV_MLP_HEAD = OpDef(ConvMlpHeadSpec, _conv_mlp_head_shape, _build_conv_mlp_head, fold=fold_hidden_layer,
                      cases=(Case({"conv_dim": 32, "hidden": [24]}, _MAPS, 10),
                             Case({"conv_dim": 24}, _MAPS, 10, id="conv-only"),
                             Case({"conv_dim": 24, "act": "silu"}, _TOKENS, 10, id="cmt-tokens"),
                             Case({"conv_dim": 24, "conv_bias": True, "conv_norm": {"type": "layernorm"},
                                   "act": "gelu", "conv_order": "act_norm"}, _MAPS, 10, id="conv2former-act-norm"),
                             Case({"hidden": [32, 24], "hidden_norm": None, "hidden_bias": True, "act": "gelu"},
                                  _TOKENS, 10, id="mlp-tokens"),
                             Case({"conv_dim": 32, "hidden": [24]}, _MAPS, 0, id="features")))
