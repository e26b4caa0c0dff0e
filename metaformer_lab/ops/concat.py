"""A concatenating composite: branches that all see the whole input, each giving its own width, joined along
the channels and optionally projected once. The shape of HiLo's Hi-Fi / Lo-Fi attention (LITv2, Pan et al.
2022), Shunted's two key/value scales (Ren et al. 2022), CSWin's two stripe directions (Dong et al. 2022),
DilateFormer's dilation groups (Jiao et al. 2023) and iFormer's high / low frequency mixers (Si et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, CompositeDef, Folding, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import OpSpec, PosInt, channel_dim, pointwise

if TYPE_CHECKING:  # the union is defined in metaformer_lab.spec, which resolves this forward ref
    from metaformer_lab.spec.arch import TokenMixerSpec

WIDTH_OPS = "attention, sr_attention, window_attention"
"""The token mixers whose output width a composite can ask for (their heads and ``proj`` follow it)."""


class ConcatSpec(OpSpec):
    """Branches that all see the whole input, each giving its own width; outputs concatenated, optionally
    projected back to the input width (HiLo, Shunted, CSWin, iFormer).

    Branch ``i`` is asked for ``widths[i]`` channels: an attention branch sizes its heads and output
    projection to it (``head_dim`` then divides the branch width, not the input's); an op that keeps its
    input width takes only ``widths[i]`` equal to it. Without ``proj`` the widths sum to the input width.
    """

    type: Literal["concat"] = "concat"
    branches: list[TokenMixerSpec] = Field(min_length=2, max_length=8)
    widths: list[PosInt] | None = Field(
        None, min_length=2, max_length=8,
        description="output width of each branch; null: the input width split evenly, the first taking the rest")
    proj: bool = Field(False, description="Linear (tokens) or 1x1 conv (maps) from the concatenated width back to "
                                          "the input width, after the concatenation")


class Concat(nn.Module):
    def __init__(self, branches: list[nn.Module], dim: int, proj: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.dim = dim
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or (B, ..., C) -> the same, C from proj or the widths
        return self.proj(torch.cat([branch(x) for branch in self.branches], dim=self.dim))


def concat_widths(spec: ConcatSpec, channels: int) -> list[int]:
    """Each branch's output width for a ``channels``-wide input (raises ShapeIssue)."""
    n = len(spec.branches)
    if spec.widths is None:
        if channels < n:
            raise ShapeIssue("branches", f"{n} branches need at least {n} input channels, got {channels}")
        return [channels - (n - 1) * (channels // n), *[channels // n] * (n - 1)]
    if len(spec.widths) != n:
        raise ShapeIssue("widths", f"{len(spec.widths)} widths for {n} branches")
    if not spec.proj and sum(spec.widths) != channels:
        raise ShapeIssue("widths", f"sum to {sum(spec.widths)}, but without proj the concatenation must give the "
                                   f"{channels} input channels; make them sum to {channels} or set proj: true")
    return list(spec.widths)


def _join(spec: ConcatSpec, x: TensorType, outs: list[TensorType]) -> TensorType:
    widths = concat_widths(spec, x.channels)
    for i, (out, width) in enumerate(zip(outs, widths, strict=True)):
        if out.with_channels(x.channels) != x:
            raise ShapeIssue(f"branches[{i}]", f"changes the tensor type to {out}; a branch must keep {x}'s layout, "
                                               "grid and prefix tokens")
        if out.channels != width:
            raise ShapeIssue(f"branches[{i}]", f"'{spec.branches[i].type}' gives {out.channels} channels, but the "
                                               f"concatenation asks it for {width}; only {WIDTH_OPS} take a width, "
                                               "other ops keep their input's")
    return x if spec.proj else x.with_channels(sum(widths))


def concat_proj(spec: ConcatSpec, x: TensorType) -> tuple[nn.Module, TensorType]:
    """The projection after the concatenation (``nn.Identity`` without ``proj``) and the type it reads."""
    joined = x.with_channels(sum(concat_widths(spec, x.channels)))
    if not spec.proj:
        return nn.Identity(), joined
    return pointwise(x.layout, joined.channels, x.channels), joined


def _build_concat(spec: ConcatSpec, r: Resolved, children: list[nn.Module]) -> Concat:
    return Concat(children, channel_dim(r.in_type.layout), concat_proj(spec, r.in_type)[0])


def fold_concat(module: nn.Module) -> Folding | None:
    """The projection writes the output (a layer scale after it folds in); each branch folds on its own."""
    if not isinstance(module, Concat):
        return None
    return Folding(writes=module.proj) if isinstance(module.proj, (nn.Linear, nn.Conv2d)) else Folding()


CONCAT = CompositeDef(
    ConcatSpec,
    branches=lambda spec: spec.branches,
    split=lambda spec, x: [x] * len(spec.branches),
    join=_join,
    build=_build_concat,
    fold=fold_concat,
    out_dims=lambda spec, x: list(concat_widths(spec, x.channels)),
    cases=(
        Case({"widths": [12, 4], "branches": [{"type": "window_attention", "window": 2, "head_dim": 4},
                                              {"type": "sr_attention", "sr_ratio": 2, "head_dim": 4}]},
             TensorType("tokens", 16, 4, 4), id="hilo"),
        Case({"proj": True, "branches": [{"type": "attention", "head_dim": 4},
                                         {"type": "attention", "num_heads": 2, "fused": False}]},
             TensorType("maps", 16, 4, 4), id="maps-proj"),
        Case({"widths": [16, 8], "proj": True, "branches": [{"type": "dwconv", "kernel": 3},
                                                            {"type": "attention", "head_dim": 4}]},
             TensorType("tokens", 16, 3, 4), id="conv-and-attention"),
        Case({"branches": [{"type": "attention", "head_dim": 2}, {"type": "attention", "num_heads": 1},
                           {"type": "attention", "head_dim": 4}]},
             TensorType("tokens", 12, 3, 3, prefix=1), id="three-prefixed"),
    ),
)
