"""Focal self-attention (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision Transformers",
NeurIPS 2021, arXiv 2107.00641; the authors' ``classification/focal_transformer.py``, ``WindowAttention`` with the
sub-window pooling of ``FocalTransformerBlock``).

The map is cut into w x w query windows. Level 0 gives each window its own tokens and, with ``expand`` e > 0, the
fine tokens of the four rolled windows the authors take (k and v rolled by (±e, ±e), each keeping the tokens
outside the window: a ring of width e, cyclic at the map's border, with the tokens where two corners overlap
twice, as theirs). Level k >= 1 pools the map (centre-cropped to whole sub-windows) in sub-windows of
``w // 2^(k-1)`` tokens and gives each window the pooled tokens around it (their unfold: ``focal_window`` pooled
tokens across at level 1, ``focal_window + 2^(k-1) - 1`` further out), zero outside the map and masked there with
-100 as theirs. One softmax runs over all the keys, with a learned relative position bias per level.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, grid_attention_heads, head_dim_field
from metaformer_lab.ops.common import (
    NonNegInt,
    OddKernel,
    PosInt,
    Prob,
    require_divides,
)
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix

MASKED = -100.0
"""Bias on a pooled key outside the map (the authors' value, not -inf)."""
MAX_FOCAL_LEVEL = 6

FocalPool = Literal["fc", "mean", "max", "conv"]


class FocalAttentionSpec(GridOpSpec):
    """Focal self-attention: each query window attends to its own tokens, a ring of fine tokens around it and
    pooled sub-windows further out (Focal Transformer; the authors' ``WindowAttention`` with the pooling of
    ``FocalTransformerBlock``, no shift)."""

    type: Literal["focal_attention"] = "focal_attention"
    window: PosInt = Field(7, description="query window side w; must divide H and W")
    expand: NonNegInt = Field(3, description=(
        "expand_size e: the ring of fine keys around each window (the authors' four rolled windows, cyclic at the "
        "map's border); 0: the window alone; less than the window, and 0 where the window spans the map's height "
        "or width"))
    focal_level: int = Field(2, ge=1, le=MAX_FOCAL_LEVEL, description=(
        "levels, the fine one included: level k >= 1 adds the pooled sub-windows (side w // 2^(k-1)) around each "
        "window"))
    focal_window: OddKernel = Field(3, description=(
        "pooled sub-windows across that each window sees at level 1 (focal_window + 2^(k-1) - 1 at level k)"))
    pool: FocalPool = Field("fc", description=(
        "sub-window pooling: fc: a learned Linear(s*s, 1) over each sub-window's tokens (pool_layers); mean; "
        "max; conv: a depthwise s x s conv of stride s"))
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


def sub_window(window: int, level: int) -> int:
    """Side of the sub-windows pooled at focal level ``level`` >= 1: ``floor(w / 2^(level-1))``."""
    return window // 2 ** (level - 1)


def region(focal_window: int, level: int) -> int:
    """Pooled tokens across that each window sees at focal level ``level`` >= 1."""
    return focal_window + 2 ** (level - 1) - 1


def ring_offsets(window: int, expand: int) -> Tensor:  # (4 * (w^2 - (w-e)^2), 2)
    """(dy, dx) of the level-0 ring keys from a window's top-left token, in the authors' order: the windows of k
    rolled by (-e, -e), (-e, e), (e, -e), (e, e), each keeping the tokens outside the window (``valid_ind_rolled``)."""
    w, e = window, expand
    offsets = [(a + sy, b + sx)
               for sy, sx in ((e, e), (e, -e), (-e, e), (-e, -e))  # the four corners
               for a in range(w) for b in range(w)
               if ((a >= w - e) if sy > 0 else (a < e)) or ((b >= w - e) if sx > 0 else (b < e))]
    return torch.tensor(offsets, dtype=torch.long)


def ring_index(grid: tuple[int, int], window: int, expand: int) -> Tensor:  # (nW, w*w + ring) flat token indices
    """For each window (row-major), the flat indices into the H x W map of its own tokens then its ring keys,
    the ring wrapping around the map's border (the authors' ``torch.roll``)."""
    H, W = grid
    a, b = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    offsets = torch.stack((a.flatten(), b.flatten()), dim=-1)  # (w*w, 2)
    if expand:
        offsets = torch.cat((offsets, ring_offsets(window, expand)))
    r, c = torch.meshgrid(torch.arange(H // window), torch.arange(W // window), indexing="ij")
    rows = (r.reshape(-1, 1) * window + offsets[:, 0]) % H  # (nW, N0)
    cols = (c.reshape(-1, 1) * window + offsets[:, 1]) % W
    return rows * W + cols


def pooled_grid(grid: tuple[int, int], window: int, level: int) -> tuple[int, int]:
    """Pooled tokens along each axis at ``level``: 2^(level-1) per window."""
    return grid[0] // window * 2 ** (level - 1), grid[1] // window * 2 ** (level - 1)


def pooled_index(grid: tuple[int, int], window: int, focal_window: int, level: int) -> tuple[Tensor, Tensor]:
    """(nW, r*r) flat indices into the level's pooled map (its size, ``nh * nw``, where the key falls outside the
    map) and whether each key is inside: the authors' unfold (kernel K, stride s = 2^(level-1), padding K // 2)
    keeping the last r x r of each K x K patch (``valid_ind_unfold``)."""
    nh, nw = pooled_grid(grid, window, level)
    s = 2 ** (level - 1)
    kernel = 2 * (focal_window // 2) + 2 * s - 1
    span = torch.arange(s - 1, kernel) - kernel // 2  # (r,) offsets kept from each patch
    r, c = torch.meshgrid(torch.arange(grid[0] // window), torch.arange(grid[1] // window), indexing="ij")
    rows = r.reshape(-1, 1, 1) * s + span.view(1, -1, 1)  # (nW, r, 1)
    cols = c.reshape(-1, 1, 1) * s + span.view(1, 1, -1)  # (nW, 1, r)
    inside = ((rows >= 0) & (rows < nh) & (cols >= 0) & (cols < nw)).flatten(1)  # (nW, r*r)
    index = (rows.clamp(0, nh - 1) * nw + cols.clamp(0, nw - 1)).flatten(1)
    return torch.where(inside, index, nh * nw), inside


def relative_index(window: int, keys: int) -> Tensor:  # (w*w, keys*keys) into a ((w + keys - 1)^2,) table
    """The authors' ``get_relative_position_index((w, w), (keys, keys))``: query (i, j) against key (m, n) reads
    ``(i - m + keys - 1) * (w + keys - 1) + (j - n + keys - 1)``."""
    q = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)  # (2, w*w)
    k = torch.stack(torch.meshgrid(torch.arange(keys), torch.arange(keys), indexing="ij")).flatten(1)  # (2, keys^2)
    rel = q[:, :, None] - k[:, None, :] + keys - 1  # (2, w*w, keys^2)
    return rel[0] * (window + keys - 1) + rel[1]


def centre_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W, C) centre-cropped to ``size`` (the odd row or column off the bottom, right), as the authors trim
    the map to whole sub-windows (``floor(w / 2^k) * 2^k <= w``: never larger than the map, so never padded)."""
    for dim, want in ((1, size[0]), (2, size[1])):
        have = x.shape[dim]
        if have > want:
            x = x.narrow(dim, (have - want) // 2, want)
    return x


class FocalAttention(nn.Module):
    """Parameter names follow the authors' ``WindowAttention`` (``qkv``, ``proj``, ``relative_position_bias_table``,
    ``relative_position_bias_table_to_neighbors``, ``relative_position_bias_table_to_windows``) and their block's
    ``pool_layers`` (fc: ``Linear(s*s, 1)``; conv: a depthwise conv), so their state_dict maps by renames."""

    relative_position_bias_table_to_neighbors: nn.Parameter | None
    relative_position_index: Tensor

    def __init__(self, dim: int, grid: tuple[int, int], window: int, expand: int, focal_level: int,
                 focal_window: int, pool: FocalPool, num_heads: int, head_dim: int, qkv_bias: bool, attn_drop: float,
                 proj_drop: float, fused: bool, out_dim: int | None = None) -> None:
        from timm.layers import trunc_normal_
        from timm.models.swin_transformer import get_relative_position_index
        super().__init__()
        self.grid, self.window, self.expand, self.focal_level, self.pool = grid, window, expand, focal_level, pool
        self.focal_window = focal_window
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        area = window * window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", get_relative_position_index(window, window), persistent=False)
        fine = ring_index(grid, window, expand)  # (nW, w*w + ring)
        self.relative_position_bias_table_to_neighbors = None
        if expand:
            ring = fine.shape[1] - area
            self.relative_position_bias_table_to_neighbors = nn.Parameter(torch.zeros(1, num_heads, area, ring))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
        self.relative_position_bias_table_to_windows = nn.ParameterList()
        self.pool_layers = nn.ModuleList()
        masks, indices, start = [], [fine], grid[0] * grid[1]
        for level in range(1, focal_level):  # the spec's few focal levels
            s, keys = sub_window(window, level), region(focal_window, level)
            table = nn.Parameter(torch.zeros(num_heads, (window + keys - 1) ** 2))
            trunc_normal_(table, std=0.02)
            self.relative_position_bias_table_to_windows.append(table)
            self.register_buffer(f"relative_position_index_{level - 1}", relative_index(window, keys), persistent=False)
            index, inside = pooled_index(grid, window, focal_window, level)
            indices.append(torch.where(inside, index + start, -1))  # -1: the zero row after every level's map
            start += pooled_grid(grid, window, level)[0] * pooled_grid(grid, window, level)[1]
            masks.append(torch.zeros(inside.shape).masked_fill(~inside, MASKED))
            if pool == "fc":
                self.pool_layers.append(nn.Linear(s * s, 1))
                nn.init.constant_(self.pool_layers[-1].weight, 1.0 / (s * s))
                nn.init.zeros_(self.pool_layers[-1].bias)
            elif pool == "conv":
                self.pool_layers.append(nn.Conv2d(dim, dim, kernel_size=s, stride=s, groups=dim))
        self.register_buffer("key_index", torch.cat(indices, dim=1) % (start + 1), persistent=False)  # (nW, keys)
        outside = focal_level > 1 and focal_window > 1  # a pooled key falls outside the map: the unfold pads
        mask = torch.cat([torch.zeros(fine.shape), *masks], dim=1) if outside else None  # (nW, keys)
        self.register_buffer("attn_mask", None if mask is None else mask[:, None, None, :], persistent=False)

    def _pooled(self, x: Tensor, level: int) -> Tensor:  # (B, H, W, C) -> (B, nh, nw, C)
        s = sub_window(self.window, level)
        nh, nw = pooled_grid(self.grid, self.window, level)
        x = centre_crop(x, (nh * s, nw * s))
        if self.pool == "conv":
            return self.pool_layers[level - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        windows = x.unflatten(2, (nw, s)).unflatten(1, (nh, s)).transpose(2, 3).flatten(3, 4)  # (B, nh, nw, s*s, C)
        if self.pool == "fc":
            return self.pool_layers[level - 1](windows.transpose(-1, -2)).squeeze(-1)
        return windows.mean(3) if self.pool == "mean" else windows.amax(3)

    def _bias(self, batch: int) -> Tensor:  # (B*nW or 1, heads, w*w, keys)
        area = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index]  # (w*w, w*w, heads)
        parts = [table.permute(2, 0, 1)]
        if self.relative_position_bias_table_to_neighbors is not None:
            parts.append(self.relative_position_bias_table_to_neighbors[0])
        for k, table_k in enumerate(self.relative_position_bias_table_to_windows):
            index = getattr(self, f"relative_position_index_{k}")  # (w*w, r*r)
            parts.append(table_k[:, index.flatten()].view(self.num_heads, area, -1))
        bias = torch.cat(parts, dim=-1).unsqueeze(0)  # (1, heads, w*w, keys)
        if self.attn_mask is not None:
            bias = bias + self.attn_mask  # (nW, heads, w*w, keys)
            bias = bias.expand(batch, *bias.shape).flatten(0, 1)  # (B*nW, heads, w*w, keys)
        return bias

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        B, H, W, C = x.shape
        w, heads, d = self.window, self.num_heads, self.head_dim
        inner = heads * d
        qkv = self.qkv(x)  # (B, H, W, 3 * inner)
        q = qkv[..., :inner].unflatten(2, (W // w, w)).unflatten(1, (H // w, w))  # (B, nh, w, nw, w, inner)
        q = q.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, heads, d).transpose(1, 2)  # (B*nW, heads, w*w, d)
        kv = [qkv[..., inner:].flatten(1, 2)]  # (B, H*W, 2 * inner)
        for level in range(1, self.focal_level):  # the spec's few focal levels
            pooled = self._pooled(x, level).flatten(1, 2)  # (B, nh*nw, C)
            bias = None if self.qkv.bias is None else self.qkv.bias[inner:]
            kv.append(F.linear(pooled, self.qkv.weight[inner:], bias))  # k and v only (theirs computes q too)
        kv.append(qkv.new_zeros(B, 1, 2 * inner))  # the zero key and value of pooled places outside the map
        index = self.key_index  # (nW, keys); index_select copies whole rows: far faster than advanced indexing
        kv_all = torch.cat(kv, dim=1).index_select(1, index.flatten()).unflatten(1, index.shape)  # (B, nW, keys, 2i)
        kv_all = kv_all.flatten(0, 1).unflatten(-1, (2, heads, d))  # (B*nW, keys, 2, heads, d)
        k, v = kv_all.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B*nW, heads, N, d)
        y = attend(q, k, v, bias=self._bias(B), drop=self.attn_drop, fused=self.fused)  # (B*nW, heads, w*w, d)
        y = y.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B*nW, w*w, heads, d): WindowAttention's
        y = self.proj_drop(self.proj(y.flatten(2)))  # (B*nW, w*w, C')
        y = y.view(B, H // w, W // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)  # (B, nh, w, nw, w, C')
        return y.reshape(B, H, W, -1)


def focal_attention_shape(spec: FocalAttentionSpec, x: TensorType,
                          out_dim: int | None) -> tuple[TensorType, Settings]:
    out, num_heads, head_dim = grid_attention_heads(spec, x, out_dim, op="focal_attention")
    require_divides("window", spec.window, x)
    if spec.expand >= spec.window:
        raise ShapeIssue("expand", f"{spec.expand} must be less than the window ({spec.window})")
    if spec.expand and spec.window in (x.height, x.width):
        side = "height" if spec.window == x.height else "width"
        raise ShapeIssue("expand", f"the window spans the {x.height}x{x.width} map's whole {side}, so the ring would "
                                   "wrap around onto the window's own tokens; set expand: 0 (as the authors do there)")
    if spec.window < 2 ** (spec.focal_level - 2):
        raise ShapeIssue("focal_level", f"level {spec.focal_level} pools sub-windows of window // "
                                        f"{2 ** (spec.focal_level - 2)} tokens, less than one in a {spec.window}-wide "
                                        "window")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_focal_attention(spec: FocalAttentionSpec, r: Resolved) -> FocalAttention:
    x = r.in_type
    return FocalAttention(x.channels, grid=x.grid, window=spec.window, expand=spec.expand,
                          focal_level=spec.focal_level, focal_window=spec.focal_window, pool=spec.pool,
                          num_heads=r["num_heads"], head_dim=r["head_dim"], qkv_bias=spec.qkv_bias,
                          attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                          out_dim=r.out_type.channels)


def fold_focal_attention(module: nn.Module) -> Folding | None:
    """proj writes the output; qkv also reads the pooled (and zero-padded) map, so a norm before the op does not
    fold into it."""
    if isinstance(module, FocalAttention):
        return Folding(writes=module.proj)
    return None


FOCAL_ATTENTION = around_prefix(OpDef(
    FocalAttentionSpec,
    infer=focal_attention_shape,
    build=_build_focal_attention,
    preserves_type=True,
    fold=fold_focal_attention,
    cases=(
        Case({"window": 2, "expand": 1, "focal_window": 3, "num_heads": 2}, TensorType("tokens", 16, 4, 6)),
        Case({"window": 4, "expand": 2, "focal_level": 3, "focal_window": 1, "num_heads": 2, "fused": False},
             TensorType("tokens", 16, 8, 8), id="three-levels-explicit"),
        Case({"window": 3, "expand": 0, "focal_level": 3, "focal_window": 3, "pool": "mean", "head_dim": 8},
             TensorType("tokens", 16, 6, 9), id="mean-crop"),
        Case({"window": 2, "expand": 1, "pool": "conv", "num_heads": 2}, TensorType("tokens", 16, 4, 4), id="conv"),
        Case({"window": 4, "expand": 0, "focal_level": 2, "focal_window": 1, "pool": "max", "num_heads": 2},
             TensorType("tokens", 16, 4, 4), id="last-stage-max"),
        Case({"window": 2, "expand": 1, "focal_level": 1, "head_dim": 8}, TensorType("tokens", 16, 4, 4),
             id="fine-only"),
        Case({"window": 2, "expand": 1, "head_dim": 8, "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
             id="prefix-pass"),
    ),
))
