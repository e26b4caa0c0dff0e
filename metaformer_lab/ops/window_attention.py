"""(Shifted) window attention: Swin's W-MSA / SW-MSA (Liu et al., "Swin Transformer", 2021) and, without
relative position bias and shift, Twins' locally-grouped attention (Chu et al., "Twins", 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import OpSpec, PosInt, Prob, require_layout, require_no_prefix

MASKED = -100.0
"""Bias between tokens of one shifted window that come from different regions (timm's value, not -inf)."""


class WindowAttentionSpec(OpSpec):
    """Multi-head self-attention inside non-overlapping windows, optionally shifted by half a window
    (timm ``swin_transformer.WindowAttention`` + ``SwinTransformerBlock._attn``; with
    ``rel_pos_bias: false`` and no shift, timm ``twins.LocallyGroupedAttn``)."""

    type: Literal["window_attention"] = "window_attention"
    window: PosInt = Field(7, description="window side; must divide H and W")
    shift: bool = Field(False, description="roll by window // 2 (SW-MSA); off along an axis no longer than the window")
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    rel_pos_bias: bool = Field(True, description="learned ((2w-1)^2, heads) relative position bias table")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


def partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C), windows in row-major order (timm ``window_partition``)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window, window, W // window, window, C)  # (B, H/w, w, W/w, w, C)
    return x.transpose(2, 3).reshape(-1, window * window, C)  # (B, H/w, W/w, w, w, C) -> (B*nW, w*w, C)


def merge(windows: Tensor, grid: tuple[int, int], window: int) -> Tensor:
    """Inverse of :func:`partition`: (B * nW, w*w, C) -> (B, H, W, C)."""
    H, W = grid
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window, W // window, window, window, C)  # (B, H/w, W/w, w, w, C)
    return x.transpose(2, 3).reshape(-1, H, W, C)  # (B, H/w, w, W/w, w, C) -> (B, H, W, C)


def _regions(size: int, window: int, shift: int) -> Tensor:  # (size,)
    """Region label along one axis after the roll: the last window mixes two regions when shifted."""
    label = torch.zeros(size, dtype=torch.long)
    if shift:
        label[size - window:] = 1
        label[size - shift:] = 2
    return label


def shift_mask(grid: tuple[int, int], window: int, shift: tuple[int, int]) -> Tensor | None:
    """(nW, 1, w*w, w*w) additive mask keeping a shifted window's regions apart, None without shift."""
    if not any(shift):
        return None
    rows, cols = _regions(grid[0], window, shift[0]), _regions(grid[1], window, shift[1])
    region = rows[:, None] * 3 + cols[None, :]  # (H, W)
    region = partition(region[None, :, :, None], window).squeeze(-1)  # (1, H, W, 1) -> (nW, w*w)
    apart = region[:, None, :] != region[:, :, None]  # (nW, w*w, w*w)
    return torch.zeros(apart.shape).masked_fill(apart, MASKED).unsqueeze(1)  # (nW, 1, w*w, w*w)


def shift_sizes(grid: tuple[int, int], window: int, shift: bool) -> tuple[int, int]:
    """window // 2 along each axis, but 0 along an axis the window already covers (as timm's Swin)."""
    rows, cols = (window // 2 if shift and size > window else 0 for size in grid)
    return rows, cols


class WindowAttention(nn.Module):
    """Parameter names follow timm's Swin ``WindowAttention`` (qkv, proj, relative_position_bias_table)."""

    relative_position_bias_table: nn.Parameter | None
    relative_position_index: Tensor | None
    attn_mask: Tensor | None

    def __init__(self, dim: int, grid: tuple[int, int], window: int, shift: bool, num_heads: int, head_dim: int,
                 rel_pos_bias: bool, qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.grid, self.window, self.fused = grid, window, fused
        self.num_heads, self.head_dim = num_heads, head_dim
        self.shift = shift_sizes(grid, window, shift)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
            from timm.layers import trunc_normal_
            from timm.models.swin_transformer import get_relative_position_index
            trunc_normal_(self.relative_position_bias_table, std=0.02)
            index = get_relative_position_index(window, window)  # (w*w, w*w) into the table
        else:
            self.register_parameter("relative_position_bias_table", None)
            index = None
        self.register_buffer("relative_position_index", index, persistent=False)
        self.register_buffer("attn_mask", shift_mask(grid, window, self.shift), persistent=False)

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's ``relative_position_bias_table``)."""
        return set() if self.relative_position_bias_table is None else {"relative_position_bias_table"}

    def _bias(self, batch: int) -> Tensor | None:  # broadcastable to (B*nW, heads, w*w, w*w)
        bias = None
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table[self.relative_position_index]  # (w*w, w*w, heads)
            bias = table.permute(2, 0, 1).unsqueeze(0)  # (1, heads, w*w, w*w)
        if self.attn_mask is not None:
            bias = self.attn_mask if bias is None else bias + self.attn_mask  # (nW, heads or 1, w*w, w*w)
            bias = bias.expand(batch, *bias.shape).flatten(0, 1)  # (B*nW, heads or 1, w*w, w*w)
        return bias

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = partition(x, self.window)  # (B*nW, w*w, C)
        qkv = self.qkv(windows).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B*nW, w*w, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nW, heads, w*w, d)
        y = attend(q, k, v, bias=self._bias(x.shape[0]), drop=self.attn_drop, fused=self.fused)
        # An explicit copy, not a view: torch.onnx.export (torch 2.14) swaps SDPA-with-bias for a kernel whose
        # output strides differ from the traced ones, and a view there fails (timm's fused Swin fails the same way).
        y = y.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B*nW, w*w, heads, d)
        y = self.proj_drop(self.proj(y.flatten(2)))  # (B*nW, w*w, C')
        y = merge(y, self.grid, self.window)  # (B, H, W, C')
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=(1, 2))
        return y


def window_attention_shape(spec: WindowAttentionSpec, x: TensorType,
                           out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="window_attention")
    require_no_prefix(x, op="window_attention")
    out = x if out_dim is None else x.with_channels(out_dim)
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, out.channels)
    if x.height % spec.window or x.width % spec.window:
        raise ShapeIssue("window", f"{spec.window} does not divide the {x.height}x{x.width} feature map")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_window_attention(spec: WindowAttentionSpec, r: Resolved) -> WindowAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return WindowAttention(x.channels, grid=x.grid, window=spec.window, shift=spec.shift, num_heads=num_heads,
                           head_dim=head_dim, rel_pos_bias=spec.rel_pos_bias, qkv_bias=spec.qkv_bias,
                           attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                           out_dim=r.out_type.channels)


def fold_window_attention(module: nn.Module) -> Folding | None:
    """Shifting and windowing move tokens, never channels (and nothing is padded): qkv reads the input, proj
    writes the output."""
    if isinstance(module, WindowAttention):
        return Folding(reads=(module.qkv,), writes=module.proj)
    return None


WINDOW_ATTENTION = OpDef(
    WindowAttentionSpec,
    infer=window_attention_shape,
    build=_build_window_attention,
    preserves_type=True,
    fold=fold_window_attention,
    cases=(
        Case({"window": 2}, TensorType("tokens", 32, 4, 6)),
        Case({"window": 2, "shift": True, "num_heads": 2, "fused": False}, TensorType("tokens", 16, 4, 6),
             id="shifted"),
        Case({"window": 2, "shift": True, "head_dim": 8}, TensorType("tokens", 16, 2, 4), id="shift-one-axis"),
        Case({"window": 2, "rel_pos_bias": False, "num_heads": 2}, TensorType("tokens", 16, 4, 4), id="twins-lsa"),
    ),
)
