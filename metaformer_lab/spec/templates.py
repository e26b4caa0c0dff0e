"""Block templates: how a block's parts are wired, as data.

A template is a list of residual branches. For each branch, with the block's parts:

    x = shortcut_parts(x) + drop_path(parts(x))

Parts name the block's fields (see :data:`PART_FIELDS`); a part whose field is null is left out, and
a branch whose mixer parts (token mixer, channel mixer) are all null is dropped with its norm, scales
and shortcut (a MetaFormer block with ``channel_mixer: null`` is a single-residual block, one with
``token_mixer: null`` an FFN-only block); a branch with ``residual=False`` is ``x = parts(x)``. The graph lowering and
the compiled ``Block`` both read these tables, so a new wiring is a new entry here, not new code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Tokens = Literal["all", "prefix"]
"""Which tokens a branch reads or writes: all of them, or the prefix (class) tokens only, (B, P, C)."""


@dataclass(frozen=True)
class Branch:
    """One residual branch. ``reads: prefix``: the parts see the prefix tokens only; ``writes: prefix``: the
    sum lands in the prefix tokens (the shortcut is the prefix tokens) and the grid tokens pass through."""

    main: str
    parts: tuple[str, ...]
    shortcut: tuple[str, ...] = ()
    reads: Tokens = "all"
    writes: Tokens = "all"
    residual: bool = True  # False: no shortcut and no sum, x = parts(x) (the ``plain`` template)


TEMPLATES: dict[str, tuple[Branch, ...]] = {
    # x = rs1*shortcut(x) + ls1*TokenMixer(norm1(x));  x = rs2*x + ls2*ChannelMixer(norm2(x))
    "metaformer": (
        Branch("token_mixer", ("norm1", "token_mixer", "layer_scale1"), ("shortcut", "res_scale1")),
        Branch("mlp", ("norm2", "mlp", "layer_scale2"), ("res_scale2",)),
    ),
    # x = shortcut(x) + ls*ChannelMixer(norm(TokenMixer(x)))   (ConvNeXt, InceptionNeXt)
    "convnext": (
        Branch("token_mixer", ("token_mixer", "norm", "mlp", "layer_scale"), ("shortcut",)),
    ),
    # x_cls = rs1*x_cls + ls1*TokenMixer(norm1(x));  x_cls = rs2*x_cls + ls2*ChannelMixer(norm2(x_cls))
    # only the prefix (class) tokens x_cls = x[:, :P] are updated (CaiT's class-attention block)
    "class_attention": (
        Branch("token_mixer", ("norm1", "token_mixer", "layer_scale1"), ("res_scale1",), writes="prefix"),
        Branch("mlp", ("norm2", "mlp", "layer_scale2"), ("res_scale2",), reads="prefix", writes="prefix"),
    ),
    # x = rs1*shortcut(x) + ls1*norm1(TokenMixer(x));  x = rs2*x + ls2*norm2(ChannelMixer(x))
    # (residual post-norm: FocalNet's use_post_norm, Swin V2)
    "postnorm": (
        Branch("token_mixer", ("token_mixer", "norm1", "layer_scale1"), ("shortcut", "res_scale1")),
        Branch("mlp", ("mlp", "norm2", "layer_scale2"), ("res_scale2",)),
    ),
    # x = ls*TokenMixer(norm(x)), no residual: a layer that changes the tensor type on its own
    # (EfficientViT's strided MBConv opening a stage)
    "plain": (
        Branch("token_mixer", ("norm", "token_mixer", "layer_scale"), residual=False),
    ),
}

PART_FIELDS = {
    "norm1": "norm", "norm2": "norm", "norm": "norm",
    "token_mixer": "token_mixer", "mlp": "channel_mixer",
    "layer_scale1": "layer_scale", "layer_scale2": "layer_scale", "layer_scale": "layer_scale",
    "res_scale1": "res_scale", "res_scale2": "res_scale",
    "shortcut": "shortcut",
}
"""Part name (also the module name inside the block, as timm names it: ``mlp``, ``layer_scale1``) -> the block
field that configures it."""

PART_ROLES = {"norm": "norm", "token_mixer": "token_mixer", "channel_mixer": "channel_mixer",
              "shortcut": "downsample"}
"""Block field -> registry role (fields not listed are scales)."""

MIXER_FIELDS = ("token_mixer", "channel_mixer")
"""Block fields that make a branch: a branch none of whose parts is a set mixer is dropped."""


def mixer_fields(branch: Branch, block: Any) -> list[str]:
    """The mixer fields of ``branch`` that ``block`` sets (``block``: a ``BlockSpec``), in part order."""
    fields = [PART_FIELDS[p] for p in branch.parts if PART_FIELDS[p] in MIXER_FIELDS]
    return [f for f in fields if getattr(block, f) is not None]


def kept_branches(block: Any) -> tuple[Branch, ...]:
    """The branches of ``block``'s template that it keeps: those with at least one mixer set."""
    return tuple(b for b in TEMPLATES[block.template] if mixer_fields(b, block))


def used_fields(block: Any) -> set[str]:
    """The block fields its kept branches read."""
    return {PART_FIELDS[p] for b in kept_branches(block) for p in (*b.parts, *b.shortcut)}
