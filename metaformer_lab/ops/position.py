"""Position encodings a stage can carry: learned absolute (ViT) and a conditional position generator
(PEG, a depthwise conv with a residual; CPVT, Twins)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    DwGroups,
    NonNegInt,
    OddKernel,
    OpSpec,
    join_prefix,
    require_grid,
    require_groups,
    require_layout,
    split_prefix,
)


class LearnedPosSpec(OpSpec):
    """A learned absolute position embedding added to every token (prefix tokens included) or pixel."""

    type: Literal["learned"] = "learned"
    init_std: float = Field(0.02, gt=0.0, le=1.0)
    after_block: NonNegInt | None = Field(None, description="None: at the stage start, before the first block")


class LearnedPosition(nn.Module):
    def __init__(self, x: TensorType, init_std: float) -> None:
        super().__init__()
        self.maps, self.prefix, self.grid = x.layout == "maps", x.prefix, x.grid
        shape = (1, x.channels, x.height, x.width) if self.maps else (1, x.num_tokens, x.channels)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.init_std = init_std

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's ``pos_embed``)."""
        return {"weight"}

    def init_weights(self) -> None:
        from timm.layers import trunc_normal_
        trunc_normal_(self.weight, std=self.init_std)

    def forward(self, x: Tensor) -> Tensor:
        if self.maps or self.prefix:
            return x + self.weight  # (B, C, H, W) or (B, P + H*W, C)
        return x + self.weight.view(1, *self.grid, -1)  # (B, H, W, C)


class PegSpec(OpSpec):
    """Position generator: ``x + dwconv(x)`` on the token grid, inserted after a block (Twins, CPVT)."""

    type: Literal["peg"] = "peg"
    kernel: OddKernel = 3
    after_block: NonNegInt | None = Field(0, description="index of the block it follows; None: stage start")
    groups: DwGroups = Field(None, description="conv groups; null: depthwise (one per channel)")

    key_optional = frozenset({"groups"})


class PositionGenerator(nn.Module):
    def __init__(self, x: TensorType, kernel: int, groups: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(x.channels, x.channels, kernel, padding=kernel // 2, groups=groups or x.channels)
        self.maps, self.prefix, self.grid = x.layout == "maps", x.prefix, x.grid

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (all of them, as timm's Twins does for ``pos_block``)."""
        return {name for name, _ in self.named_parameters()}

    def forward(self, x: Tensor) -> Tensor:
        if self.maps:
            return x + self.proj(x)  # (B, C, H, W)
        prefix, grid = split_prefix(x, self.prefix, self.grid)  # grid: (B, H, W, C)
        grid = grid + self.proj(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return join_prefix(prefix, grid)


def _learned_shape(spec: LearnedPosSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="learned position embedding")
    return x


def _peg_shape(spec: PegSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="peg")
    require_grid(x, op="peg")
    if spec.groups is not None:
        require_groups(spec.groups, input=x.channels)
    return x


LEARNED_POS = OpDef(LearnedPosSpec, _learned_shape, lambda spec, r: LearnedPosition(r.in_type, spec.init_std),
                    preserves_type=True,
                    cases=(Case({}, TensorType("tokens", 8, 3, 4, prefix=1)), Case({}, TensorType("tokens", 8, 3, 4),
                                                                                   id="grid"),
                           Case({}, TensorType("maps", 8, 3, 4), id="maps")))
PEG = OpDef(PegSpec, _peg_shape, lambda spec, r: PositionGenerator(r.in_type, spec.kernel, spec.groups),
            preserves_type=True,
            cases=(Case({}, TensorType("tokens", 8, 3, 4)), Case({"kernel": 5}, TensorType("tokens", 8, 3, 4, prefix=1),
                                                                  id="prefixed"),
                   Case({}, TensorType("maps", 8, 3, 4), id="maps"),
                   Case({"groups": 2}, TensorType("tokens", 8, 3, 4, prefix=1), id="grouped")))


class PrefixTokens(nn.Module):
    """Learned tokens put in front of the sequence (class token, distillation token)."""

    def __init__(self, count: int, dim: int, had_prefix: bool) -> None:
        super().__init__()
        self.tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, dim)) for _ in range(count)])
        self.had_prefix = had_prefix

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's ``cls_token``, ``dist_token``)."""
        return {f"tokens.{i}" for i in range(len(self.tokens))}

    def init_weights(self) -> None:
        from timm.layers import trunc_normal_

        for token in self.tokens:
            trunc_normal_(token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if not self.had_prefix:
            x = x.flatten(1, 2)  # (B, H, W, C) -> (B, H*W, C)
        prefix = torch.cat(list(self.tokens), dim=1).expand(x.shape[0], -1, -1)  # (B, P, C)
        return torch.cat([prefix, x], dim=1)  # (B, P + N, C)
