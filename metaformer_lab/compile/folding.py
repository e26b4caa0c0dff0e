"""The deploy form of a compiled network: the same outputs in eval mode, with inference-only structure folded
away (BatchNorms into convs, norm affines into the next linear, layer scales into the last linear, parallel
convs into one).

Ops declare how their modules fold (their OpDef's ``fold`` hook, :class:`~metaformer_lab.core.registry.Folding`);
this walker applies the declarations bottom-up, the same way for every op: each module's own deploy form first,
then, inside each block, the affine a part ends with moves into its neighbour along the branch (the block's plan
says which parts run one after the other). Module names stay; folded-away parts leave their block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metaformer_lab.compile.network import Block
from metaformer_lab.ops.folds import fold_chain, folding_of
from metaformer_lab.ops.packed import pack_linears


def _fold_branch(block: Block, names: list[str]) -> list[str]:
    """Fold one chain of a block's parts; the names of the parts that are left (a part the spec made an identity,
    IdentityFormer's token mixer, stays)."""
    parts = [block._modules[n] for n in names]
    folded = fold_chain(parts)  # type: ignore[arg-type]
    kept = []
    for name, part, original in zip(names, folded, parts, strict=True):
        if part is not original and isinstance(part, nn.Identity):
            delattr(block, name)
        else:
            setattr(block, name, part)
            kept.append(name)
    return kept


def _fold_block(block: Block) -> Block:
    block.branches = [
        b._replace(parts=_fold_branch(block, list(b.parts)), shortcut=_fold_branch(block, list(b.shortcut)))
        for b in block.branches]
    return block


def _fold(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        folded = _fold(child)
        if folded is not child:
            module._modules[name] = folded
    if isinstance(module, Block):
        return _fold_block(module)
    folding = folding_of(module)
    return folding.deploy() if folding.deploy is not None else module


def deploy_form(module: nn.Module) -> nn.Module:
    """A folded copy of ``module`` (a compiled network, a feature backbone, or any module built from ops) in eval
    mode, giving the same outputs in eval mode; ``module`` itself is left untouched.

    The copy is for inference: its state_dict has fewer entries than the training form's, so it does not load
    training checkpoints (load them first, then deploy).
    """
    folded = copy.deepcopy(module).eval()
    with torch.no_grad():
        folded = _fold(folded)
    # channels-last 4-D weights: a convolution whose weight is channels-last returns channels-last maps, so from the
    # stem on the maps stay channels-last (the caller's input needs no change): oneDNN's 1x1 convs and pooling run
    # over channels-last maps. Its Linears keep oneDNN's reordered weight for large CPU calls (ops.packed). The
    # deploy forms' times against timm's eager ones: benchmarks/timm_ratio.py.
    return pack_linears(to_channels_last(folded)).eval()


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with every 4-D parameter and buffer channels-last, converted in place (``Module.to(memory_format=
    torch.channels_last)`` refuses a module that also holds 5-D tensors, such as agent attention's biases)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for name, b in m._buffers.items():
            if b is not None and b.dim() == 4:
                m._buffers[name] = b.contiguous(memory_format=torch.channels_last)
    return module
