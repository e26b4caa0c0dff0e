"""The containers a compiled network is made of. Their ``forward`` reads like the paper's equations;
the ops inside come from the block library.

timm is imported where a module is built, not here: ``validate`` imports this file (through the API) and
must not pay for timm's ``__init__``, which imports every timm model."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType


class BranchPlan(NamedTuple):
    """One residual branch of a compiled block: its part names, its shortcut part names, and whether it
    reads / writes the prefix tokens only (``Branch.reads`` / ``Branch.writes == "prefix"``)."""

    parts: list[str]
    shortcut: list[str]
    reads_prefix: bool = False
    writes_prefix: bool = False
    residual: bool = True  # False: x = parts(x), no shortcut, no sum, no drop path (``Branch.residual``)


class Block(nn.Module):
    """A block wired by its template (:mod:`metaformer_lab.spec.templates`): for each residual branch,
    ``x = shortcut(x) + drop_path(parts(x))``, parts applied in order. Submodules are named by part
    (``norm1``, ``token_mixer``, ``ls1``, ``rs1``, ...); parts the spec leaves out are absent.

    A branch that reads the prefix tokens only runs its parts on ``x[:, :prefix]``; one that writes them
    only computes ``x_cls = shortcut(x_cls) + drop_path(parts(.))`` and puts it back in front of the
    unchanged grid tokens (CaiT's class-attention blocks). A branch without a residual is ``x = parts(x)``.
    """

    def __init__(self, *, layout_in: nn.Module, parts: dict[str, nn.Module],
                 branches: list[BranchPlan], drop_path: float, prefix: int = 0) -> None:
        super().__init__()
        self.layout_in = layout_in
        for name, module in parts.items():
            self.add_module(name, module)
        self.branches = branches
        self.prefix = prefix  # P, the number of prefix tokens (used by prefix-only branches)
        from timm.layers import DropPath

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.layout_in(x)
        for parts, shortcut, reads_prefix, writes_prefix, residual in self.branches:
            h = x[:, : self.prefix] if reads_prefix else x  # (B, P, C) prefix tokens, or all of x
            for name in parts:
                h = self._modules[name](h)  # type: ignore[misc]
            if not residual:
                x = h
                continue
            s = x[:, : self.prefix] if writes_prefix else x
            for name in shortcut:
                s = self._modules[name](s)  # type: ignore[misc]
            s = s + self.drop_path(h)
            x = torch.cat([s, x[:, self.prefix :]], dim=1) if writes_prefix else s  # (B, P + H*W, C) or as x
        return x


class Stage(nn.Module):
    """``down -> layout -> prefix -> [pos] -> blocks (pos after block k) -> norm``."""

    def __init__(self, *, down_layout: nn.Module, down: nn.Module, layout: nn.Module, prefix: nn.Module,
                 pos_embed: nn.Module, pos_after: int, blocks: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.down_layout, self.down, self.layout, self.prefix = down_layout, down, layout, prefix
        self.pos_embed, self.pos_after = pos_embed, pos_after
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.prefix(self.layout(self.down(self.down_layout(x))))
        if self.pos_after < 0:
            x = self.pos_embed(x)
        for j, block in enumerate(self.blocks):
            x = block(x)
            if j == self.pos_after:
                x = self.pos_embed(x)
        return self.norm(x)


class Network(nn.Module):
    """A compiled architecture: ``head(stages(stem(x)))``.

    Attributes:
        input_type: the input it was compiled for (token ops that need the grid are sized for it).
        output_type: the type of its output.
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

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
