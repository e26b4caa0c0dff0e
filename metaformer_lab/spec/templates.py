"""Block templates: how a block's parts are wired, as data.

A template is a list of residual branches. For each branch, with the block's parts:

    x = shortcut_parts(x) + drop_path(parts(x))

Parts name the block's fields (see :data:`PART_FIELDS`); a part whose field is null is left out, and
a branch whose mixer parts (token mixer, channel mixer) are all null is dropped with its norm, scales
and shortcut (a MetaFormer block with ``channel_mixer: null`` is a single-residual block, one with
``token_mixer: null`` an FFN-only block); a branch with ``residual=False`` is ``x = parts(x)``. The graph lowering and
the compiled ``Block`` both read these tables, so a new wiring is a new entry here, not new code.

A block with ``steps`` writes its wiring itself: each step is one branch of the same form (:func:`step_branch`),
its parts named after the step (its mixer by the step's key, its norm and scales numbered among the steps that
have one: ``norm1``, ``layer_scale1``, ``res_scale1``). :func:`part_sources` says, for every part name a block's
branches use, which spec field configures it; nothing else tells templates and steps apart.
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
    drop_path: bool = True  # False: the sum takes the parts' output as is, without stochastic depth


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


@dataclass(frozen=True)
class Source:
    """What configures a part: its spec field, relative to the block (``norm``, ``steps.attn.token_mixer``),
    its registry role (None: a layer or res scale, whose value is its init) and its value (None: absent)."""

    field: str
    role: str | None
    value: Any


STEP_PARTS = (("norm", "norm"), ("layer_scale", None), ("res_scale", None))
"""A step's numbered parts: its field (also the module-name stem, ``norm1``) and registry role."""

RESERVED_NAMES = frozenset({"layout", "layout_in", "drop_path", "branches", "prefix"})
"""Names a step cannot take: the block's own attributes and the block's layout node."""


def _step_mixer(step: Any) -> tuple[str, str] | None:
    """The mixer field a step sets and its role (the token mixer if it sets both), or None."""
    return next(((f, f) for f in MIXER_FIELDS if getattr(step, f) is not None), None)


def _step_names(block: Any) -> list[dict[str, str]]:
    """Each step's part names by field: ``{"mixer": "attn", "norm": "norm1", "layer_scale": "layer_scale1"}``
    (fields the step leaves null have no name, nor a res scale without a residual to scale)."""
    counts = dict.fromkeys((f for f, _ in STEP_PARTS), 0)
    names = []
    for key, step in block.steps.items():
        own = {"mixer": key}
        for f, _ in STEP_PARTS:
            if getattr(step, f) is not None and (step.residual or f != "res_scale"):
                counts[f] += 1
                own[f] = f"{f}{counts[f]}"
        names.append(own)
    return names


def step_branch(step: Any, names: dict[str, str]) -> Branch:
    """One step as a branch: ``x = rs*x + drop_path(ls*mixer(norm(x)))`` (``x = ls*mixer(norm(x))`` without its
    residual)."""
    parts = tuple(names[f] for f in ("norm", "mixer", "layer_scale") if f in names)
    shortcut = (names["res_scale"],) if "res_scale" in names else ()
    return Branch(names["mixer"], parts, shortcut, residual=step.residual, drop_path=step.drop_path)


def part_sources(block: Any) -> dict[str, Source]:
    """Part name -> what configures it, for every part ``block``'s branches can name."""
    if block.steps is None:
        return {p: Source(f, PART_ROLES.get(f), getattr(block, f)) for p, f in PART_FIELDS.items()}
    sources = {}
    for (key, step), names in zip(block.steps.items(), _step_names(block), strict=True):
        mixer = _step_mixer(step)
        if mixer is not None:
            sources[names["mixer"]] = Source(f"steps.{key}.{mixer[0]}", mixer[1], getattr(step, mixer[0]))
        for f, role in STEP_PARTS:
            if f in names:
                sources[names[f]] = Source(f"steps.{key}.{f}", role, getattr(step, f))
    return sources


def step_part_names(block: Any) -> list[list[str]]:
    """The module names each step of ``block`` adds, in step order (mixer first)."""
    return [list(names.values()) for names in _step_names(block)]


def mixer_fields(branch: Branch, block: Any, sources: dict[str, Source] | None = None) -> list[str]:
    """The mixer fields of ``branch`` that ``block`` sets (``block``: a ``BlockSpec``), in part order, relative
    to the block (``token_mixer``, ``steps.mlp.channel_mixer``). ``sources``: ``part_sources(block)`` where the
    caller has it."""
    sources = part_sources(block) if sources is None else sources
    found = [sources[p] for p in branch.parts if p in sources]
    return [s.field for s in found if s.role in MIXER_FIELDS and s.value is not None]


def kept_branches(block: Any, sources: dict[str, Source] | None = None) -> tuple[Branch, ...]:
    """The branches of ``block``'s wiring that it keeps: those with at least one mixer set (a block with ``steps``:
    one branch per step that has a mixer). ``sources``: ``part_sources(block)`` where the caller has it."""
    if block.steps is not None:
        steps = block.steps.values()
        return tuple(step_branch(step, names) for step, names in zip(steps, _step_names(block), strict=True)
                     if _step_mixer(step) is not None)
    sources = part_sources(block) if sources is None else sources
    return tuple(b for b in TEMPLATES[block.template] if mixer_fields(b, block, sources))


def used_fields(block: Any, sources: dict[str, Source] | None = None,
                kept: tuple[Branch, ...] | None = None) -> set[str]:
    """The block fields its kept branches read (relative to the block: ``norm``, ``steps.attn.norm``).
    ``sources`` and ``kept``: ``part_sources(block)`` and ``kept_branches(block)`` where the caller has them."""
    sources = part_sources(block) if sources is None else sources
    kept = kept_branches(block, sources) if kept is None else kept
    return {sources[p].field for b in kept for p in (*b.parts, *b.shortcut)}
