"""The arithmetic of the deploy form: moving a per-channel affine into a neighbouring Linear or Conv2d.

Ops declare *where* their modules fold (a :class:`~metaformer_lab.core.registry.Folding` from their OpDef's
``fold`` hook); this file does *how*, the same for every op: an affine that a module applies last (a norm's
weight and bias, a layer scale, an eval-mode BatchNorm) moves forward into the Linear / Conv2d that alone reads
it (or through a module that commutes with it, PoolFormer's pooling, into the one after), or, when nothing else
is left of the module, backward into the layer that wrote its input. Each move is made only where it is exact
(a conv with zero padding takes a shift only when it does not pad).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import ChannelAffine, FoldHook, Folding
from metaformer_lab.ops.common import LayerScale, fold_layer_scale

_LAYERS = (nn.Linear, nn.Conv2d)


@functools.cache
def _hooks() -> tuple[FoldHook, ...]:
    from metaformer_lab.ops import REGISTRIES  # the package imports this file's users

    hooks: dict[FoldHook, None] = {fold_layer_scale: None}  # the scale glue is no registry op
    for registry in REGISTRIES.values():
        hooks.update({d.fold: None for d in registry if d.fold is not None})
    return tuple(hooks)


def folding_of(module: nn.Module) -> Folding:
    """What ``module`` declares about its deploy form: its op's ``fold`` hook's answer; a bare Linear or Conv2d
    reads and writes itself; anything else declares nothing."""
    if isinstance(module, _LAYERS):
        return Folding(reads=(module,), writes=module)
    for hook in _hooks():
        folding = hook(module)
        if folding is not None:
            return folding
    return Folding()


def _set(module: nn.Module, name: str, value: Tensor | None) -> None:
    if value is None:
        module.register_parameter(name, None)
    else:
        module.register_parameter(name, nn.Parameter(value.detach().clone()))


def _fuse_bn(target: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """torch's own fusion of an eval-mode BatchNorm into the conv or linear before it (in place)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    fused = fuse_conv_bn_eval(target, bn) if isinstance(target, nn.Conv2d) else fuse_linear_bn_eval(target, bn)  # type: ignore[arg-type]
    _set(target, "weight", fused.weight)
    _set(target, "bias", fused.bias)


def fold_output(target: nn.Module | None, affine: ChannelAffine) -> bool:
    """``target``'s output becomes ``weight * y + bias`` per output channel, in place; False where it cannot hold it.

    ``target`` is a Linear, a Conv2d or a norm with a per-channel ``weight`` (a ``bias`` slot too when the affine
    shifts).
    """
    w, b = affine.weight, affine.bias
    if target is None:
        return False
    source = affine.source
    if isinstance(source, nn.modules.batchnorm._BatchNorm) and isinstance(target, _LAYERS) and \
            target.weight.shape[0] == len(source.running_mean):
        _fuse_bn(target, source)
        return True
    weight = getattr(target, "weight", None)
    if not isinstance(weight, Tensor) or (not isinstance(target, _LAYERS) and weight.ndim != 1):
        return False
    if b is not None and not isinstance(target, _LAYERS) and "bias" not in target._parameters:
        return False  # a norm with no shift at all (RMSNorm)
    scale = weight.new_ones(weight.shape[0]) if w is None else w
    old = target.bias if isinstance(getattr(target, "bias", None), Tensor) else None
    bias = old * scale if old is not None else None
    if b is not None:
        bias = b.clone() if bias is None else bias + b
    _set(target, "weight", weight * scale.view(-1, *[1] * (weight.ndim - 1)))
    _set(target, "bias", bias)
    return True


def _input_fold(target: nn.Module, w: Tensor | None, b: Tensor | None) -> dict[str, Tensor | None] | None:
    """``target``'s new parameters when it reads ``w * x + b`` instead of ``x``; None where that is not exact."""
    if isinstance(target, LayerScale):
        return None if b is not None else {"scale": target.scale if w is None else target.scale * w}
    if isinstance(target, nn.Linear):
        weight = target.weight if w is None else target.weight * w  # (out, in) * (in,)
        shift = None if b is None else target.weight @ b
    elif isinstance(target, nn.Conv2d) and target.padding_mode == "zeros":
        pads = target.padding != "valid" and any(p > 0 for p in target.padding)  # type: ignore[union-attr]
        if b is not None and pads and bool(b.any()):
            return None  # the zeros it pads with are not shifted: not exact at the borders
        depthwise = target.groups == target.in_channels == target.out_channels
        if target.groups != 1 and not depthwise:
            return None
        view = (-1, 1, 1, 1) if depthwise else (1, -1, 1, 1)
        weight = target.weight if w is None else target.weight * w.view(view)
        if b is None:
            shift = None
        elif depthwise:
            shift = target.weight.sum((1, 2, 3)) * b
        else:
            shift = (target.weight * b.view(1, -1, 1, 1)).sum((1, 2, 3))
    else:
        return None
    if shift is not None and target.bias is not None:
        shift = target.bias + shift
    return {"weight": weight, "bias": target.bias if shift is None else shift}


def fold_input(targets: Sequence[nn.Module], affine: ChannelAffine) -> bool:
    """Every target reads ``weight * x + bias`` instead of ``x`` (in place), or none does (False)."""
    if not targets:
        return False
    new = [_input_fold(t, affine.weight, affine.bias) for t in targets]
    if any(n is None for n in new):
        return False
    for target, params in zip(targets, new, strict=True):
        for name, value in params.items():  # type: ignore[union-attr]
            _set(target, name, value)
    return True


def _neighbour(parts: list[nn.Module], i: int, step: int) -> int | None:
    """The index of the next part from ``i`` in direction ``step`` that is not ``nn.Identity``."""
    j = i + step
    while 0 <= j < len(parts) and isinstance(parts[j], nn.Identity):
        j += step
    return j if 0 <= j < len(parts) else None


def _fold_backward(parts: list[nn.Module], i: int, affine: ChannelAffine) -> bool:
    before = _neighbour(parts, i, -1)
    alone = isinstance(affine.rest, nn.Identity)
    return alone and before is not None and fold_output(folding_of(parts[before]).writes, affine)


def _fold_forward(parts: list[nn.Module], i: int, affine: ChannelAffine) -> bool:
    after = _neighbour(parts, i, 1)
    if after is None:
        return False
    folding = folding_of(parts[after])
    if folding.reads or not folding.commutes:
        return fold_input(folding.reads, affine)
    if affine.weight is None:
        return True  # a shift alone drops out
    beyond = _neighbour(parts, after, 1)
    passed = ChannelAffine(affine.weight, None, rest=affine.rest, source=affine.source)
    return beyond is not None and fold_input(folding_of(parts[beyond]).reads, passed)


def fold_chain(parts: Sequence[nn.Module]) -> list[nn.Module]:
    """Fold the affine each part ends with into its neighbour in ``parts`` (modules run one after the other,
    each one's output read by the next alone); a part that is nothing but that affine becomes ``nn.Identity``.

    The affine moves backward into the previous part's ``writes`` when nothing else is left of its part (a
    BatchNorm after a conv, a layer scale after a mixer), else forward into the next part's ``reads`` (a norm's
    weight and bias into the next linear, leaving a norm without them), or through a next part that
    ``commutes`` with it into the one after (a norm's weight through PoolFormer's pooling into the layer scale).
    """
    parts = list(parts)
    with torch.no_grad():
        for i, part in enumerate(parts):
            affine = folding_of(part).affine
            if affine is not None and (_fold_backward(parts, i, affine) or _fold_forward(parts, i, affine)):
                parts[i] = affine.rest
    return parts


def fold_parts(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """:func:`fold_chain` over the submodules ``names`` of ``module`` (run in that order), set back in place."""
    for name, part in zip(names, fold_chain([getattr(module, n) for n in names]), strict=True):
        setattr(module, name, part)
    return module
