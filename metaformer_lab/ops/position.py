"""Position encodings a stage can carry: learned absolute (ViT), fixed sine-cosine (Transformer, T2T-ViT, MAE)
and a conditional position generator (PEG, a depthwise conv with a residual; CPVT, Twins)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
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
    decay: bool = Field(False, description="true: the embedding takes weight decay (timm's Visformer marks none "
                                           "of its pos_embeds); false: kept out of it (timm's ViT)")

    key_optional = frozenset({"decay"})


class LearnedPosition(nn.Module):
    def __init__(self, x: TensorType, init_std: float, decay: bool = False) -> None:
        super().__init__()
        self.maps, self.prefix, self.grid = x.layout == "maps", x.prefix, x.grid
        shape = (1, x.channels, x.height, x.width) if self.maps else (1, x.num_tokens, x.channels)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.init_std, self.decay = init_std, decay

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's ``pos_embed``), unless it decays."""
        return set() if self.decay else {"weight"}

    def init_weights(self) -> None:
        from timm.layers import trunc_normal_
        trunc_normal_(self.weight, std=self.init_std)

    def forward(self, x: Tensor) -> Tensor:
        return add_position(x, self.weight, maps=self.maps, prefix=self.prefix, grid=self.grid)


def add_position(x: Tensor, table: Tensor, *, maps: bool, prefix: int, grid: tuple[int, int]) -> Tensor:
    """``x + table`` for a table of shape (1, C, H, W) on maps, (1, P + H*W, C) on tokens."""
    if maps or prefix:
        return x + table  # (B, C, H, W) or (B, P + H*W, C)
    return x + table.view(1, *grid, -1)  # (B, H, W, C)


class SinusoidalPosSpec(OpSpec):
    """A fixed sine-cosine position embedding added to every token or pixel: 1d over the token sequence
    (Transformer; T2T-ViT's ``get_sinusoid_encoding``) or 2d over the grid (MAE's ``get_2d_sincos_pos_embed``).

    ``1d``: token ``p`` (prefix tokens first, from 0) gets ``sin(p / t^(2i/C))`` in channel ``2i`` and
    ``cos`` of the same in ``2i + 1``. ``2d``: the grid token in column ``x``, row ``y`` gets ``[sin(x w), cos(x w),
    sin(y w), cos(y w)]``, ``w_k = t^(-k / (C/4))``, prefix tokens zeros (MAE's class token). A persistent buffer
    ``weight``, not a parameter: never trained, and the authors' ``pos_embed`` (a frozen parameter in their
    state_dict) loads into it.
    """

    type: Literal["sinusoidal"] = "sinusoidal"
    variant: Literal["1d", "2d"] = Field("2d", description="1d: over the token sequence (T2T-ViT); 2d: over "
                                                           "columns and rows, 4 channel blocks (MAE)")
    temperature: float = Field(10000.0, gt=1.0, description="t: the wavelengths run from 2 pi to 2 pi t")
    after_block: NonNegInt | None = Field(None, description="None: at the stage start, before the first block")


def sinusoid_1d(tokens: int, channels: int, temperature: float) -> Tensor:
    """(tokens, channels): ``sin`` / ``cos`` of ``p / t^(2 (j // 2) / C)`` in even / odd channels ``j``."""
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]  # (N, 1)
    exponent = 2 * (torch.arange(channels) // 2).to(torch.float64) / channels  # (C,)
    angle = pos / temperature**exponent  # (N, C)
    return torch.where(torch.arange(channels) % 2 == 0, angle.sin(), angle.cos()).float()


def sincos_2d(grid: tuple[int, int], channels: int, temperature: float) -> Tensor:
    """(H*W, channels), tokens row-major: ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` for column x, row y."""
    quarter = channels // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")  # (H, W) each
    x, y = (c.flatten()[:, None] * omega for c in (cols, rows))  # (H*W, C/4) each
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class SinusoidalPosition(nn.Module):
    weight: Tensor

    def __init__(self, x: TensorType, variant: str, temperature: float) -> None:
        super().__init__()
        self.maps, self.prefix, self.grid = x.layout == "maps", x.prefix, x.grid
        if variant == "1d":
            table = sinusoid_1d(x.num_tokens, x.channels, temperature)  # (P + H*W, C)
        else:
            table = torch.cat([torch.zeros(x.prefix, x.channels), sincos_2d(x.grid, x.channels, temperature)])
        table = table.T.reshape(1, x.channels, *x.grid) if self.maps else table[None]  # (1, C, H, W), (1, N, C)
        self.register_buffer("weight", table, persistent=True)  # in the state_dict, as the authors' pos_embed

    def forward(self, x: Tensor) -> Tensor:
        return add_position(x, self.weight, maps=self.maps, prefix=self.prefix, grid=self.grid)


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


def _sinusoidal_shape(spec: SinusoidalPosSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="sinusoidal position embedding")
    if spec.variant == "2d" and x.channels % 4:
        raise ShapeIssue("variant", f"2d needs a width divisible by 4 (sin and cos of columns and rows), got "
                                    f"{x.channels}; use 1d or a multiple of 4")
    return x


def _peg_shape(spec: PegSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="peg")
    require_grid(x, op="peg")
    if spec.groups is not None:
        require_groups(spec.groups, input=x.channels)
    return x


LEARNED_POS = OpDef(LearnedPosSpec, _learned_shape,
                    lambda spec, r: LearnedPosition(r.in_type, spec.init_std, spec.decay), preserves_type=True,
                    cases=(Case({}, TensorType("tokens", 8, 3, 4, prefix=1)), Case({}, TensorType("tokens", 8, 3, 4),
                                                                                   id="grid"),
                           Case({}, TensorType("maps", 8, 3, 4), id="maps"),
                           Case({"decay": True}, TensorType("maps", 8, 3, 4), id="visformer-decay")))
SINUSOIDAL_POS = OpDef(
    SinusoidalPosSpec, _sinusoidal_shape,
    lambda spec, r: SinusoidalPosition(r.in_type, spec.variant, spec.temperature), preserves_type=True,
    cases=(Case({}, TensorType("tokens", 8, 3, 4, prefix=1)), Case({"variant": "1d"}, TensorType("tokens", 6, 3, 4),
                                                                   id="1d-grid"),
           Case({"variant": "1d", "temperature": 100.0}, TensorType("tokens", 7, 2, 2, prefix=2), id="1d-prefixed"),
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
