"""Global query attention: GC-ViT's global self-attention (Hatamizadeh et al., "Global Context Vision
Transformers", 2022): window attention whose keys and values come from each window, and whose queries are one
window-sized map of global features, the same for every window of an image, made by a query generator
(residual fused-MBConv blocks and max pools that shrink the whole map to the window).

In GC-ViT the generator reads the stage's input once and its queries serve every global block of the stage:
``generator: stage`` gives the generator up to the stage (the compiler moves it there,
:func:`metaformer_lab.compile.compiler.hoist_stage_context`), which runs it once and hands its output to the op as
``context``; an op run alone, or with ``generator: block``, runs its own generator on its own input.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import PosInt, Prob, require_divides, require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix
from metaformer_lab.ops.window_attention import merge, partition

MAX_LEVELS = 8


class GlobalQueryAttentionSpec(GridOpSpec):
    """Window attention whose queries are a window-sized map of global features shared by all windows (GC-ViT's
    global self-attention: timm ``gcvit.WindowAttentionGlobal`` with the queries of its ``FeatureBlock``).

    Keys and values come from each window (``qkv``, a Linear to 2C); the queries are the generator's C channels
    split into heads, with no projection; a learned relative position bias is added as in Swin."""

    type: Literal["global_query_attention"] = "global_query_attention"
    window: PosInt = Field(7, description="tokens along a window's side; must divide H and W")
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    levels: int | None = Field(None, ge=0, le=MAX_LEVELS, description=(
        "max pools (3x3, stride 2) of the query generator, each after a residual fused-MBConv block (one block "
        "when 0); they must take the grid to the window; null: log2(min(H, W) / window), as GC-ViT"))
    rel_pos_bias: bool = Field(True, description="a learned ((2w-1)^2, heads) relative position bias table")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    generator: Literal["block", "stage"] = Field("block", description=(
        "block: the op's own query generator, on its own input; stage: one generator per stage, run once on the "
        "stage's input, its queries shared by the stage's ops with generator: stage (GC-ViT; a block's own token "
        "mixer: inside a composite the op keeps its own)"))

    def stage_shared_params(self, r: Resolved) -> int:
        """Parameter elements that the stage's blocks share (the generator, counted once per stage)."""
        if self.generator != "stage":
            return 0
        return generator_params(r.in_type.channels, r["levels"])

    def stage_context_key(self, r: Resolved) -> str | None:
        """What the stage's one generator must be for this op (the stage's ops must agree), None: no stage context."""
        if self.generator != "stage":
            return None
        return f"(a query generator of width {r.in_type.channels}, {r['levels']} levels)"

    def stage_shared_flops(self, r: Resolved) -> int:
        """FLOPs at batch 1 that the stage runs once for its blocks (the generator)."""
        if self.generator != "stage":
            return 0
        return generator_flops(r.in_type.channels, r.in_type.grid, r["levels"])


class MbConvResidual(nn.Module):
    """GC-ViT's fused-MBConv block, no norm: ``x + conv_pw(se(act(conv_dw(x))))`` with a bias-free depthwise 3x3,
    GELU, squeeze-excitation (ratio 1/4, bias-free) and a bias-free pointwise conv (timm ``gcvit.MbConvBlock``;
    the same names)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        from timm.layers import SEModule

        self.conv_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = SEModule(dim, rd_ratio=0.25, bias=False, act_layer=nn.GELU)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class QueryGenerator(nn.Module):
    """``max(1, levels)`` residual fused-MBConv blocks, each of the first ``levels`` followed by a 3x3 stride-2 max
    pool (timm ``gcvit.FeatureBlock``; its ``blocks.conv1``, ``blocks.pool1``, ... names)."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f"conv{i + 1}", MbConvResidual(dim))
            if i < levels:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, w*w, C)
        return self.blocks(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)


def _se_width(dim: int) -> int:
    from timm.layers import make_divisible

    return int(make_divisible(dim * 0.25, 8, round_limit=0.0))


def generator_params(dim: int, levels: int) -> int:
    """Parameter elements of a :class:`QueryGenerator` (each block: depthwise 3x3, SE, pointwise; no biases)."""
    return max(1, levels) * (9 * dim + 2 * dim * _se_width(dim) + dim * dim)


def generator_flops(dim: int, grid: tuple[int, int], levels: int) -> int:
    """FLOPs (a multiply-add counts 2) of a :class:`QueryGenerator` on one (H, W) map: each block's depthwise and
    pointwise convs at its grid, its SE on the pooled vector; pools and activations count 0."""
    flops = 0
    for i in range(max(1, levels)):
        area = pooled_size(grid[0], i) * pooled_size(grid[1], i)
        flops += 2 * (9 * dim + dim * dim) * area + 4 * dim * _se_width(dim)
    return flops


class GlobalQueryAttention(nn.Module):
    """Parameter names follow timm's GC-ViT: ``global_block`` (its stage's ``FeatureBlock``), ``qkv`` (keys and
    values), ``relative_position_bias_table`` (timm's ``rel_pos.relative_position_bias_table``) and ``proj``.

    ``forward(x, context)``: ``context`` (B, w*w, C) are the queries the stage's generator made (``generator:
    stage``, named by ``stage_context``: the compiler moves ``global_block`` to the stage); None: the op's own
    generator on ``x``."""

    global_block: QueryGenerator | None
    relative_position_bias_table: nn.Parameter | None
    relative_position_index: Tensor | None

    def __init__(self, dim: int, grid: tuple[int, int], window: int, num_heads: int, head_dim: int, levels: int,
                 rel_pos_bias: bool, qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool,
                 out_dim: int | None = None, stage_generator: bool = False) -> None:
        super().__init__()
        self.grid, self.window, self.fused = grid, window, fused
        self.stage_context = "global_block" if stage_generator else None
        self.num_heads, self.head_dim = num_heads, head_dim
        self.global_block = QueryGenerator(dim, levels)
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table, index = None, None
        if rel_pos_bias:
            from timm.layers import trunc_normal_
            from timm.models.swin_transformer import get_relative_position_index

            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
            index = get_relative_position_index(window, window)  # (w*w, w*w) into the table
        self.register_buffer("relative_position_index", index, persistent=False)

    def no_weight_decay(self) -> set[str]:
        """The relative position table (timm's ``no_weight_decay``)."""
        return {"relative_position_bias_table"} if self.relative_position_bias_table is not None else set()

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        B, H, W, _ = x.shape
        windows = partition(x, self.window)  # (B*nW, w*w, C), image-major
        kv = self.qkv(windows).unflatten(-1, (2, self.num_heads, self.head_dim))  # (B*nW, w*w, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B*nW, heads, w*w, d)
        if context is None:
            if self.global_block is None:
                raise RuntimeError("the query generator went to the stage: call with its queries as context")
            context = self.global_block(x)  # (B, w*w, C)
        q = context.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, w*w, d)
        n_windows = k.shape[0] // B
        q = q.unsqueeze(1).expand(B, n_windows, *q.shape[1:]).flatten(0, 1)  # (B*nW, heads, w*w, d): each image's
        bias = None
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table[self.relative_position_index]  # (w*w, w*w, heads)
            bias = table.permute(2, 0, 1).unsqueeze(0)  # (1, heads, w*w, w*w)
        y = attend(q, k, v, bias=bias, drop=self.attn_drop, fused=self.fused)  # (B*nW, heads, w*w, d)
        y = y.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B*nW, w*w, heads, d); see WindowAttention
        y = self.proj_drop(self.proj(y.flatten(2)))  # (B*nW, w*w, C')
        return merge(y, self.grid, self.window)  # (B, H, W, C')


def pooled_size(size: int, levels: int) -> int:
    """A side after ``levels`` 3x3 stride-2 max pools with padding 1."""
    for _ in range(levels):
        size = (size - 1) // 2 + 1
    return size


def default_levels(grid: tuple[int, int], window: int) -> int:
    """GC-ViT's generator depth: ``int(log2(min(H, W) / window))`` (0 when the grid is the window or smaller)."""
    return max(0, int(math.log2(min(grid) / window)))


def global_query_attention_shape(spec: GlobalQueryAttentionSpec, x: TensorType,
                                 out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="global_query_attention")
    require_no_prefix(x, op="global_query_attention")
    out = x if out_dim is None else x.with_channels(out_dim)
    if spec.generator == "stage" and spec.prefix is not None:
        raise ShapeIssue("generator", "stage reads the stage's grid; with prefix tokens routed around the op "
                                      "(prefix), use generator: block")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    if num_heads * head_dim != x.channels:
        raise ShapeIssue("head_dim", f"the queries are the input's {x.channels} channels split into heads; "
                                     f"num_heads * head_dim = {num_heads * head_dim} must equal them")
    require_divides("window", spec.window, x)
    levels = default_levels(x.grid, spec.window) if spec.levels is None else spec.levels
    pooled = (pooled_size(x.height, levels), pooled_size(x.width, levels))
    if pooled != (spec.window, spec.window):
        which = f"null: {levels}" if spec.levels is None else str(levels)
        raise ShapeIssue("levels", f"{which} max pools take the {x.height}x{x.width} map to {pooled[0]}x{pooled[1]}, "
                                   f"but the queries must be one {spec.window}x{spec.window} window")
    return out, {"num_heads": num_heads, "head_dim": head_dim, "levels": levels}


def _build_global_query_attention(spec: GlobalQueryAttentionSpec, r: Resolved) -> GlobalQueryAttention:
    x = r.in_type
    return GlobalQueryAttention(x.channels, grid=x.grid, window=spec.window, num_heads=r["num_heads"],
                                head_dim=r["head_dim"], levels=r["levels"], rel_pos_bias=spec.rel_pos_bias,
                                qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop,
                                fused=spec.fused, out_dim=r.out_type.channels,
                                stage_generator=spec.generator == "stage")


def fold_global_query_attention(module: nn.Module) -> Folding | None:
    """proj writes the output; nothing declares reads (the query generator may read the input too, through its
    convs' activations and max pools)."""
    if isinstance(module, GlobalQueryAttention):
        return Folding(writes=module.proj)
    return None


GLOBAL_QUERY_ATTENTION = around_prefix(OpDef(
    GlobalQueryAttentionSpec,
    infer=global_query_attention_shape,
    build=_build_global_query_attention,
    preserves_type=True,
    fold=fold_global_query_attention,
    cases=(
        Case({"window": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 4), id="one-level"),
        Case({"window": 2, "head_dim": 8, "fused": False}, TensorType("tokens", 16, 8, 8), id="two-levels-explicit"),
        Case({"window": 4, "num_heads": 2, "rel_pos_bias": False, "qkv_bias": False}, TensorType("tokens", 16, 4, 4),
             id="no-pool-no-bias"),
        Case({"window": 2, "num_heads": 2, "generator": "stage"}, TensorType("tokens", 16, 4, 4),
             id="stage-generator-alone"),
        Case({"window": 2, "head_dim": 8, "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
             id="prefix-pass"),
    ),
))
