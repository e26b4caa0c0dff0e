"""The architecture spec: what a YAML file says, validated field by field by pydantic.

Cross-field and shape rules (heads dividing widths, windows dividing maps, ...) are checked when the
spec is lowered to the typed graph, where each problem keeps its spec path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from metaformer_lab.core.registry import CompositeDef, Registry
from metaformer_lab.ops import CHANNEL_MIXERS, DOWNSAMPLERS, HEADS, POSITIONS, STEMS, TOKEN_MIXERS
from metaformer_lab.ops.common import MAX_SIZE, NonNegInt, PosInt, Prob
from metaformer_lab.ops.heads import PoolNormLinearSpec
from metaformer_lab.ops.mlp import MlpSpec
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec


def tagged_union(registry: Registry) -> Any:
    """The config classes of a registry as one pydantic union, told apart by ``type``: the registry is the
    single list of a role's ops, so a new op is its file plus one line in :mod:`metaformer_lab.ops`."""
    return Annotated[Union[tuple(registry.specs())], Field(discriminator="type")]  # noqa: UP007


TokenMixerSpec = tagged_union(TOKEN_MIXERS)
ChannelMixerSpec = tagged_union(CHANNEL_MIXERS)
StemSpec = tagged_union(STEMS)
DownsampleSpec = tagged_union(DOWNSAMPLERS)
HeadSpec = tagged_union(HEADS)
PosEmbedSpec = tagged_union(POSITIONS)

for _composite in TOKEN_MIXERS:  # composite mixers hold token mixers: resolve their forward reference
    if isinstance(_composite, CompositeDef):
        _composite.spec.model_rebuild(_types_namespace={"TokenMixerSpec": TokenMixerSpec})

MAX_DEPTH = 256
StageLayout = Literal["maps", "tokens"]


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _module_name(value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", value):
        raise PydanticCustomError("module_name", "'{value}' is not a module name: up to 32 lower-case letters, digits "
                                  "and '_', starting with a letter", {"value": value})
    return value


StepName = Annotated[str, AfterValidator(_module_name)]
"""A step's key: the module name of its mixer in the compiled block (the authors' name: attn, local, mlp)."""


class StepSpec(SpecModel):
    """One residual step of a block: ``x = rs*x + drop_path(ls*Mixer(norm(x)))``; the mixer is a token mixer or
    a channel mixer (one of the two). Its modules: the mixer is named by the step's key in ``steps``; the norm,
    layer scale and res scale are ``norm{k}``, ``layer_scale{k}``, ``res_scale{k}``, numbered among the block's
    steps that have one (CMT: ``proj``, ``norm1``, ``attn``, ``norm2``, ``mlp``)."""

    token_mixer: TokenMixerSpec | None = Field(None, description="the step's mixer, if a token mixer")
    channel_mixer: ChannelMixerSpec | None = Field(None, description="the step's mixer, if a channel mixer")
    norm: NormSpec | None = Field(default_factory=LayerNormSpec,
                                  description="norm before the mixer; null: none; left out: the block's norm")
    layer_scale: float | None = Field(None, ge=0.0, le=10.0, description="init value of layer scale; null: off; "
                                      "left out: the block's")
    res_scale: float | None = Field(None, ge=0.0, le=10.0, description="init value of res scale; null: off; "
                                    "left out: the block's")
    residual: bool = Field(True, description="false: x = ls*Mixer(norm(x)), no shortcut and no sum")
    drop_path: bool = Field(True, description="false: no stochastic depth on this step (CMT's LPU)")


class BlockSpec(SpecModel):
    """One block, wired by its template (see :mod:`metaformer_lab.spec.templates`):

    - ``metaformer``: ``x = rs1*shortcut(x) + ls1*TokenMixer(norm(x)); x = rs2*x + ls2*ChannelMixer(norm(x))``
      (``channel_mixer: null`` keeps the first residual only; ``token_mixer: null`` the second only, an
      FFN-only block ``x = rs2*x + ls2*ChannelMixer(norm(x))``; a branch left out takes its norm, scales and
      shortcut with it);
    - ``convnext``: ``x = shortcut(x) + ls*ChannelMixer(norm(TokenMixer(x)))`` (norm after the mixer);
    - ``postnorm``: ``x = rs1*shortcut(x) + ls1*norm(TokenMixer(x)); x = rs2*x + ls2*norm(ChannelMixer(x))``
      (residual post-norm: FocalNet's ``use_post_norm``, Swin V2);
    - ``class_attention``: the ``metaformer`` wiring updating only the prefix (class) tokens ``x_cls``:
      ``x_cls = rs1*x_cls + ls1*TokenMixer(norm(x)); x_cls = rs2*x_cls + ls2*ChannelMixer(norm(x_cls))``
      (CaiT's class-attention blocks; the grid tokens pass through);
    - ``plain``: ``x = ls*TokenMixer(norm(x))``, no residual (a layer that changes the tensor type on its own,
      EfficientViT's strided MBConv opening a stage; ``channel_mixer`` and ``shortcut`` are unused).

    A block with ``steps`` is wired by them instead: one residual step after another, each with its own norm,
    mixer and scales (CMT's LPU, attention and IRFFN; Shuffle's attention, neighbour conv and MLP); ``token_mixer``
    and ``channel_mixer`` are then left out.
    """

    template: Literal["metaformer", "convnext", "postnorm", "class_attention", "plain"] = "metaformer"
    token_mixer: TokenMixerSpec | None = Field(description="null: no token-mixer branch (an FFN-only block)")
    channel_mixer: ChannelMixerSpec | None = Field(default_factory=MlpSpec,
                                                   description="null: no channel-mixer branch")
    norm: NormSpec | None = Field(default_factory=LayerNormSpec, description="null: no norm (EfficientFormer)")
    layer_scale: float | None = Field(None, ge=0.0, le=10.0, description="init value of layer scale; null: off")
    res_scale: float | None = Field(None, ge=0.0, le=10.0, description="init value of res scale; null: off")
    layout: StageLayout | None = Field(None, description="overrides the stage's layout for this block")
    shortcut: DownsampleSpec | None = Field(None, description="op on the first residual's shortcut, for a token "
                                            "mixer that changes width or resolution (a downsampling block)")
    steps: Annotated[dict[StepName, StepSpec], Field(min_length=1, max_length=16)] | None = Field(
        None, description="residual steps run in order in place of the template, keyed by the module name of "
                          "their mixer (attn: {token_mixer: ..., norm: ...})")

    @model_validator(mode="before")
    @classmethod
    def _mixers_from_steps(cls, data: Any) -> Any:
        """A block with ``steps`` takes its mixers from them: ``token_mixer`` and ``channel_mixer`` default to null."""
        if isinstance(data, dict) and data.get("steps") is not None:
            return {"token_mixer": None, "channel_mixer": None, **data}
        return data


INHERITED_BLOCK_FIELDS = ("norm", "layer_scale", "res_scale")
"""Block fields that ``defaults`` can set for every block that leaves them out (and a block for its steps)."""


def inherit_fields(block: Any, inherited: dict[str, Any]) -> Any:
    """A raw block mapping with ``inherited`` (copied) filling the fields it leaves out, and its own inherited
    fields filling its steps' (anything else is returned as is)."""
    if not isinstance(block, dict):
        return block
    block = {**copy.deepcopy(inherited), **block}
    if isinstance(block.get("steps"), dict):
        own = {k: block[k] for k in INHERITED_BLOCK_FIELDS if k in block}
        block["steps"] = {name: {**copy.deepcopy(own), **step} if isinstance(step, dict) else step
                          for name, step in block["steps"].items()}
    return block


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


BlockList = Annotated[list[BlockSpec], BeforeValidator(_as_list), Field(min_length=1, max_length=MAX_DEPTH)]
"""One block, or a list of blocks."""


class FirstThenCycleSpec(SpecModel):
    """``{first: A, cycle: [B, C]}``: the stage's first block(s), then the ``cycle`` list repeated over the
    rest of the depth (A, B, C, B, C, ...; MaxViT-style stages whose first block downsamples)."""

    first: BlockList = Field(description="the first block, or a list of the first blocks")
    cycle: BlockList = Field(description="the blocks after them, cycled over the rest of the depth")


def is_first_then_cycle(value: Any) -> bool:
    """Whether a stage's raw ``block`` value is the ``{first: ..., cycle: ...}`` form (a block mapping has
    neither key)."""
    return isinstance(value, dict) and ("first" in value or "cycle" in value)


def map_blocks(value: Any, path: str, fn: Callable[[Any, str], Any]) -> Any:
    """A stage's raw ``block`` value (one block, a list, or first-then-cycle) with ``fn(block, path)`` applied
    to each block, in the same form; ``path`` is the stage's ``block`` path and grows with each item's place."""
    if is_first_then_cycle(value):
        return {key: map_blocks(item, f"{path}.{key}", fn) if key in ("first", "cycle") else item
                for key, item in value.items()}
    if isinstance(value, list):
        return [fn(item, f"{path}[{k}]") for k, item in enumerate(value)]
    return fn(value, path)


def _block_form(value: Any) -> str:
    """The union member of a raw value (validation) or of a validated one (serialisation)."""
    return "first_then_cycle" if is_first_then_cycle(value) or isinstance(value, FirstThenCycleSpec) else "blocks"


StageBlocks = Annotated[
    Union[Annotated[BlockList, Tag("blocks")], Annotated[FirstThenCycleSpec, Tag("first_then_cycle")]],  # noqa: UP007
    Discriminator(_block_form)]


class StageSpec(SpecModel):
    """A stage: an optional downsampler, then ``depth`` blocks. ``block`` is one block, a list of blocks cycled
    over the depth, or ``{first: ..., cycle: [...]}`` (the first block(s), then a list cycled over the rest)."""

    depth: Annotated[int, Field(ge=1, le=MAX_DEPTH)]
    dim: PosInt
    block: StageBlocks
    downsample: DownsampleSpec | None = None
    layout: StageLayout = Field("maps", description="maps: (B, C, H, W); tokens: channels last")
    prefix_tokens: Annotated[int, Field(ge=0, le=16)] = Field(0, description="class/distillation tokens added here")
    pos_embed: PosEmbedSpec | None = None
    collect_prefix: bool = Field(False, description="the stage's output carries the prefix tokens of each of its "
                                                    "blocks, in order (depth x P of them, before the last block's "
                                                    "grid tokens): CeiT's layer-wise class-token attention head")
    norm: NormSpec | None = Field(None, description="norm after the last block")

    def block_at(self, index: int) -> BlockSpec:
        """The spec of block ``index``."""
        return self._entry(index)[0]

    def block_path(self, index: int) -> str:
        """Where block ``index`` is written, relative to the stage (``block``, ``block[1]``, ``block.cycle[0]``)."""
        return self._entry(index)[1]

    def _entry(self, index: int) -> tuple[BlockSpec, str]:
        if isinstance(self.block, FirstThenCycleSpec):
            first, cycle = self.block.first, self.block.cycle
            key, items, k = ("first", first, index) if index < len(first) else \
                ("cycle", cycle, (index - len(first)) % len(cycle))
            return items[k], f"block.{key}" + (f"[{k}]" if len(items) > 1 else "")
        k = index % len(self.block)
        return self.block[k], "block" + (f"[{k}]" if len(self.block) > 1 else "")

    def blocks(self) -> list[BlockSpec]:
        """Every block spec the stage lists, in order (each once)."""
        if isinstance(self.block, FirstThenCycleSpec):
            return [*self.block.first, *self.block.cycle]
        return list(self.block)


Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]


class InputSpec(SpecModel):
    channels: Annotated[int, Field(ge=1, le=64)] = 3
    size: Size | Annotated[list[Size], Field(min_length=2, max_length=2)] = 224

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else (self.size[0], self.size[1])


class DefaultsSpec(SpecModel):
    """Network-wide settings. ``norm``, ``layer_scale`` and ``res_scale`` fill every block that leaves
    them out (applied when the YAML is read)."""

    drop_path_rate: Prob = Field(0.0, description="stochastic depth, rising linearly to this over all blocks")
    norm: NormSpec | None = Field(default_factory=LayerNormSpec)
    layer_scale: float | None = Field(None, ge=0.0, le=10.0)
    res_scale: float | None = Field(None, ge=0.0, le=10.0)


class ArchSpec(SpecModel):
    """A whole network: input, stem, stages, head."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    input: InputSpec = Field(default_factory=InputSpec)
    num_classes: NonNegInt = Field(1000, description="0: the head returns pooled features")
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    stem: StemSpec
    stages: Annotated[list[StageSpec], Field(min_length=1, max_length=16)]
    head: HeadSpec = Field(default_factory=PoolNormLinearSpec)

    @property
    def num_blocks(self) -> int:
        return sum(stage.depth for stage in self.stages)
