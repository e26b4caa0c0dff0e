"""The containers a compiled network is made of. Their ``forward`` reads like the paper's equations;
the ops inside come from the block library.

timm is imported where a module is built, not here: ``validate`` imports this file (through the API) and
must not pay for timm's ``__init__``, which imports every timm model."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from metaformer_lab.compile.protocol import TimmProtocol
from metaformer_lab.core.types import TensorType


class BranchPlan(NamedTuple):
    """One residual branch of a compiled block: its part names, its shortcut part names, and whether it
    reads / writes the prefix tokens only (``Branch.reads`` / ``Branch.writes == "prefix"``)."""

    parts: list[str]
    shortcut: list[str]
    reads_prefix: bool = False
    writes_prefix: bool = False
    residual: bool = True  # False: x = parts(x), no shortcut, no sum, no drop path (``Branch.residual``)
    drop_path: bool = True  # False: the sum takes parts(x) as is (CMT's LPU, Shuffle's neighbour conv)


class Block(nn.Module):
    """A block wired by its template (:mod:`metaformer_lab.spec.templates`): for each residual branch,
    ``x = shortcut(x) + drop_path(parts(x))``, parts applied in order. Submodules are named by part
    (``norm1``, ``token_mixer``, ``ls1``, ``rs1``, ...); parts the spec leaves out are absent.

    A branch that reads the prefix tokens only runs its parts on ``x[:, :prefix]``; one that writes them
    only computes ``x_cls = shortcut(x_cls) + drop_path(parts(.))`` and puts it back in front of the
    unchanged grid tokens (CaiT's class-attention blocks). A branch without a residual is ``x = parts(x)``; one
    without ``drop_path`` adds its parts' output without stochastic depth. A block written as ``steps`` is such
    a list of branches, one per step, its modules named as the steps say (``proj``, ``norm1``, ``attn``, ...).
    """

    def __init__(self, *, layout_in: nn.Module, parts: dict[str, nn.Module],
                 branches: list[BranchPlan], drop_path: float, prefix: int = 0) -> None:
        super().__init__()
        self.layout_in = layout_in
        for name, module in parts.items():
            self.add_module(name, module)
        self.branches = branches
        self.prefix = prefix  # P, the number of prefix tokens (used by prefix-only branches)
        # parts that read the stage's context (GC-ViT's global queries): module(x, context)
        self.context_parts = frozenset(n for n, m in parts.items() if getattr(m, "stage_context", None))
        from timm.layers import DropPath

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def updates_prefix_only(self) -> bool:
        """Whether every branch writes the prefix tokens only (CaiT's class attention): the grid tokens pass
        through unchanged, so the block yields no new feature map."""
        return bool(self.branches) and all(b.writes_prefix and b.residual for b in self.branches)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``context``: the stage's context (:meth:`Stage.context_of`), for the parts that read it."""
        x = self.layout_in(x)
        for parts, shortcut, reads_prefix, writes_prefix, residual, drop_path in self.branches:
            h = x[:, : self.prefix] if reads_prefix else x  # (B, P, C) prefix tokens, or all of x
            for name in parts:
                if name in self.context_parts:
                    h = self._modules[name](h, context)  # type: ignore[misc]
                else:
                    h = self._modules[name](h)  # type: ignore[misc]
            if not residual:
                x = h
                continue
            s = x[:, : self.prefix] if writes_prefix else x
            for name in shortcut:
                s = self._modules[name](s)  # type: ignore[misc]
            s = s + (self.drop_path(h) if drop_path else h)
            x = torch.cat([s, x[:, self.prefix :]], dim=1) if writes_prefix else s  # (B, P + H*W, C) or as x
        return x


class Stage(nn.Module):
    """``downsample -> layout -> prefix -> [pos] -> blocks (pos after block k) -> [collect] -> norm``.

    ``collect`` (P > 0, ``StageSpec.collect_prefix``): the output is every block's P prefix tokens, in block order,
    then the last block's grid tokens (CeiT's layer-wise class-token attention reads them).

    ``context`` (name, module), from the blocks' parts (:func:`~metaformer_lab.compile.compiler.hoist_stage_context`):
    run once on the blocks' input, its output handed to every block (GC-ViT's global query generator)."""

    def __init__(self, *, downsample_layout: nn.Module, downsample: nn.Module, layout: nn.Module, prefix: nn.Module,
                 pos_embed: nn.Module, pos_after: int, blocks: list[nn.Module], norm: nn.Module,
                 collect: int = 0, context: tuple[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.downsample_layout, self.downsample = downsample_layout, downsample
        self.context_name = None if context is None else context[0]
        if context is not None:
            self.add_module(*context)
        self.layout, self.prefix = layout, prefix
        self.pos_embed, self.pos_after = pos_embed, pos_after
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.collect = collect

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.forward_body(x))

    # The same computation in steps, for feature taps and gradient checkpointing.
    def forward_pre(self, x: Tensor) -> Tensor:
        """Everything before the first block: downsampler, layout, prefix tokens, a position embedding at the start."""
        x = self.prefix(self.layout(self.downsample(self.downsample_layout(x))))
        return self.pos_embed(x) if self.pos_after < 0 else x

    def context_of(self, x: Tensor) -> Tensor | None:
        """The stage's context for the blocks' input ``x`` (forward_pre's output), or None without one."""
        return None if self.context_name is None else self._modules[self.context_name](x)  # type: ignore[misc]

    def forward_block(self, j: int, x: Tensor, *, checkpointed: bool = False,
                      taps: list[Tensor] | None = None, context: Tensor | None = None) -> Tensor:
        """Block ``j`` (recomputed in the backward pass when ``checkpointed``), then a position embedding placed
        after it; a collecting stage appends the block's prefix tokens to ``taps``. ``context``: the stage's."""
        block = self.blocks[j]
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(block, x, context, use_reentrant=False)
        else:
            x = block(x, context) if context is not None else block(x)
        if self.collect and taps is not None:
            taps.append(x[:, : self.collect])  # (B, P, C)
        return self.pos_embed(x) if j == self.pos_after else x

    def gather(self, x: Tensor, taps: list[Tensor]) -> Tensor:
        """The stage's output before its norm: ``x``, or for a collecting stage every block's prefix tokens
        (``taps``) in front of ``x``'s grid tokens, (B, D*P + H*W, C)."""
        return torch.cat([*taps, x[:, self.collect :]], dim=1) if self.collect else x

    def forward_body(self, x: Tensor, *, checkpointed: bool = False) -> Tensor:
        """``forward`` without the stage's closing norm."""
        x = self.forward_pre(x)
        context = self.context_of(x)
        taps: list[Tensor] = []
        for j in range(len(self.blocks)):
            x = self.forward_block(j, x, checkpointed=checkpointed, taps=taps, context=context)
        return self.gather(x, taps)


class Network(TimmProtocol):
    """A compiled architecture: ``head(stages(stem(x)))``, with timm's model protocol
    (:class:`~metaformer_lab.compile.protocol.TimmProtocol`: ``forward_intermediates``, ``feature_info``,
    ``reset_classifier``, ``no_weight_decay``, ``group_matcher``, ``pretrained_cfg``, ...).

    Attributes:
        input_type: the input it was compiled for (token ops that need the grid are sized for it).
        output_type: the type of its output (kept up to date by ``reset_classifier`` and pruning).
        feature_types: the output type of each stage.
    """

    def __init__(self, *, name: str, stem: nn.Module, stages: list[Stage], head: nn.Module, input_type: TensorType,
                 output_type: TensorType, feature_types: list[TensorType]) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.head = head
        self.input_type, self.output_type, self.feature_types = input_type, output_type, feature_types
        self.init_protocol()

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training:
            return self.forward_checkpointed(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The head on ``forward_features``' output; ``pre_logits``: the pooled, normed features its classifier
        reads (timm's convention)."""
        if pre_logits:
            return self.head_pre_logits(x)
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
