"""Normalisation layers, each usable in every layout (the builder picks the module for the layout)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, ChannelAffine, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Eps, OpSpec, PosInt, Prob

_MAPS = TensorType("maps", 16, 5, 6)
_TOKENS = TensorType("tokens", 16, 5, 6)
_PREFIXED = TensorType("tokens", 16, 5, 6, prefix=1)
_VECTOR = TensorType("vector", 16)


def _same(spec: OpSpec, x: TensorType, out_dim: int | None) -> TensorType:
    return x


class LayerNormSpec(OpSpec):
    """LayerNorm over channels (``nn.LayerNorm`` on tokens, timm ``LayerNorm2d`` on maps)."""

    type: Literal["layernorm"] = "layernorm"
    eps: Eps = Field(1e-6, description="timm's LayerNorm default is 1e-6, torch's nn.LayerNorm 1e-5")
    affine: bool = Field(True, description="learnable per-channel weight")
    bias: bool = Field(True, description="learnable per-channel bias (needs affine)")


def _build_layernorm(spec: LayerNormSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    bias = spec.bias and spec.affine
    if x.layout == "maps":
        from timm.layers import LayerNorm2d
        return LayerNorm2d(x.channels, eps=spec.eps, affine=spec.affine, bias=bias)
    return nn.LayerNorm(x.channels, eps=spec.eps, elementwise_affine=spec.affine, bias=bias)


class BatchNormSpec(OpSpec):
    """BatchNorm over channels (running statistics in eval mode)."""

    type: Literal["batchnorm"] = "batchnorm"
    eps: Eps = 1e-5
    momentum: Prob = 0.1
    affine: bool = True


class ChannelsLastBatchNorm(nn.BatchNorm2d):
    """BatchNorm for channels-last tensors of any rank: (B, ..., C)."""

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's name
        pass

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


def _build_batchnorm(spec: BatchNormSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    cls = {"maps": nn.BatchNorm2d, "vector": nn.BatchNorm1d}.get(x.layout, ChannelsLastBatchNorm)
    return cls(x.channels, eps=spec.eps, momentum=spec.momentum, affine=spec.affine)


class GroupNormSpec(OpSpec):
    """GroupNorm; with ``groups: 1`` it normalises over all channels and positions (PoolFormer's GN1)."""

    type: Literal["groupnorm"] = "groupnorm"
    groups: PosInt = 1
    eps: Eps = 1e-5
    affine: bool = True
    bias: bool = Field(True, description="learnable per-channel bias (needs affine)")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` for any layout, optionally without bias."""

    def __init__(self, groups: int, channels: int, eps: float, affine: bool, bias: bool, channels_last: bool):
        super().__init__(groups, channels, eps=eps, affine=affine)
        if not bias and affine:
            self.register_parameter("bias", None)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # (B, ..., C) -> (B, C, ...) and back
            return F.group_norm(x.movedim(-1, 1), self.num_groups, self.weight, self.bias, self.eps).movedim(1, -1)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _infer_groupnorm(spec: GroupNormSpec, x: TensorType, out_dim: int | None) -> TensorType:
    if x.channels % spec.groups:
        raise ShapeIssue("groups", f"{spec.groups} does not divide {x.channels} channels")
    return x


def _build_groupnorm(spec: GroupNormSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    return GroupNorm(spec.groups, x.channels, spec.eps, spec.affine, spec.bias, channels_last=x.layout == "tokens")


class RmsNormSpec(OpSpec):
    """RMSNorm over channels (timm ``RmsNorm`` / ``RmsNorm2d``)."""

    type: Literal["rmsnorm"] = "rmsnorm"
    eps: Eps = 1e-6
    affine: bool = True


def _build_rmsnorm(spec: RmsNormSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    from timm.layers import RmsNorm, RmsNorm2d
    cls = RmsNorm2d if x.layout == "maps" else RmsNorm
    return cls(x.channels, eps=spec.eps, affine=spec.affine)


class AffineSpec(OpSpec):
    """ResMLP's ``Aff``: a per-channel ``alpha * x + beta`` with no statistics."""

    type: Literal["affine"] = "affine"


class Affine(nn.Module):
    def __init__(self, dim: int, maps: bool) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.maps = maps

    def forward(self, x: Tensor) -> Tensor:
        # addcmul as in timm's mlp_mixer.Affine: beta + alpha * x rounds differently (ResMLP-36 by 3.5e-8)
        if self.maps:
            return torch.addcmul(self.beta.view(-1, 1, 1), self.alpha.view(-1, 1, 1), x)  # (B, C, H, W)
        return torch.addcmul(self.beta, self.alpha, x)  # (B, ..., C)


def _without_affine(norm: nn.Module) -> nn.Module:
    """A copy of ``norm`` that only normalises (its weight and bias are moving into a neighbour).

    A layer norm keeps a weight of ones (a buffer, out of the state_dict): torch's CPU ``layer_norm`` without a
    weight takes a path about twice as slow as with one (197x384 tokens: 69 us against 32 us at one thread), and
    multiplying by one is exact. GroupNorm and RMSNorm are as fast or faster without it.
    """
    import copy

    from timm.layers import LayerNorm2d

    plain = copy.deepcopy(norm)
    for name in ("weight", "bias"):
        if name in plain._parameters:
            plain.register_parameter(name, None)
    for flag in ("elementwise_affine", "affine"):
        if hasattr(plain, flag):
            setattr(plain, flag, False)
    if isinstance(plain, (nn.LayerNorm, LayerNorm2d)) and norm.weight is not None:
        del plain.weight
        plain.register_buffer("weight", torch.ones_like(norm.weight), persistent=False)
    return plain


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine | None:
    """An eval-mode BatchNorm is ``weight / std * (x - mean) + bias``: nothing but a per-channel affine."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return ChannelAffine(scale, shift, rest=nn.Identity(), source=bn)


def fold_norm(module: nn.Module) -> Folding | None:
    """The norms' deploy form: a norm's per-channel weight and bias (an eval-mode BatchNorm, ResMLP's affine:
    the whole norm) can move into a neighbouring linear; an affine norm also takes a scale after it."""
    from timm.layers import LayerNorm2d, RmsNorm, RmsNorm2d

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        affine = _batchnorm_affine(module)
        return Folding(affine=affine) if affine is not None else Folding()
    if isinstance(module, Affine):
        return Folding(affine=ChannelAffine(module.alpha, module.beta, rest=nn.Identity(), source=module))
    if isinstance(module, (nn.LayerNorm, LayerNorm2d, GroupNorm, RmsNorm, RmsNorm2d)):
        if module.weight is None:
            return Folding()
        bias = getattr(module, "bias", None)
        return Folding(writes=module, affine=ChannelAffine(module.weight, bias, rest=_without_affine(module),
                                                           source=module))
    return None


_ANY = (Case({}, _MAPS, id="maps"), Case({}, _TOKENS, id="tokens"), Case({}, _PREFIXED, id="prefixed"),
        Case({}, _VECTOR, id="vector"))

LAYERNORM = OpDef(LayerNormSpec, _same, _build_layernorm, preserves_type=True, fold=fold_norm,
                  cases=(*_ANY, Case({"bias": False}, _MAPS, id="maps-nobias"),
                         Case({"affine": False}, _TOKENS, id="plain")))
BATCHNORM = OpDef(BatchNormSpec, _same, _build_batchnorm, cases=_ANY, preserves_type=True, fold=fold_norm)
GROUPNORM = OpDef(GroupNormSpec, _infer_groupnorm, _build_groupnorm, preserves_type=True, fold=fold_norm,
                  cases=(*_ANY, Case({"groups": 4, "bias": False}, _MAPS, id="g4-nobias")))
RMSNORM = OpDef(RmsNormSpec, _same, _build_rmsnorm, cases=_ANY, preserves_type=True, fold=fold_norm)
AFFINE = OpDef(AffineSpec, _same, lambda spec, r: Affine(r.in_type.channels, r.in_type.layout == "maps"), cases=_ANY,
               preserves_type=True, fold=fold_norm)

NORM_DEFS = (LAYERNORM, BATCHNORM, GROUPNORM, RMSNORM, AFFINE)

NormSpec = Annotated[Union[tuple(d.spec for d in NORM_DEFS)], Field(discriminator="type")]  # noqa: UP007
"""Every norm, as a tagged union (ops that contain a norm, such as stems, take one of these)."""

_BY_TAG = {d.tag: d for d in NORM_DEFS}


def build_norm(spec: OpSpec | None, x: TensorType) -> nn.Module:
    """The norm module for ``spec`` on input ``x`` (``nn.Identity`` for no norm)."""
    if spec is None:
        return nn.Identity()
    return _BY_TAG[spec.type].make(spec, x)  # type: ignore[attr-defined]


def infer_norm(spec: OpSpec | None, x: TensorType) -> TensorType:
    """Shape rule of ``spec`` on ``x``; raises ShapeIssue with a field relative to the norm."""
    if spec is None:
        return x
    return _BY_TAG[spec.type].resolve(spec, x).out_type  # type: ignore[attr-defined]


def check_norm(spec: OpSpec | None, x: TensorType, field: str) -> None:
    """Run a nested norm's shape rule, reporting its problems under ``field``."""
    try:
        infer_norm(spec, x)
    except ShapeIssue as issue:
        raise ShapeIssue(f"{field}.{issue.field}" if issue.field else field, issue.message) from None
