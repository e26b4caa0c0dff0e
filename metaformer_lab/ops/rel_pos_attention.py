"""Global multi-head self-attention on a feature map with a learned 2-D relative position bias over the
whole map (Dai et al., "CoAtNet: Marrying Convolution and Attention for All Data Sizes", NeurIPS 2021).

With ``stride`` the map is average-pooled first and with ``out_dim`` the projection changes the width:
the attention branch of CoAtNet's downsampling transformer block (its shortcut is the block's ``pool``
shortcut).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, ScaleOrder, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import KernelInt, OpSpec, PosInt, Prob, require_layout


class RelPosAttentionSpec(OpSpec):
    """MHSA over all positions of a map, 1x1-conv qkv and projection, plus a learned ((2H-1)(2W-1), heads)
    relative position bias table (timm ``maxxvit.Attention2d`` with ``RelPosBias`` sized to the map, and the
    ``Downsample2d`` pooling of ``TransformerBlock2d.norm1``)."""

    type: Literal["rel_pos_attention"] = "rel_pos_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    rel_pos_bias: bool = Field(True, description="learned ((2H-1)(2W-1), heads) relative position bias table")
    stride: KernelInt = Field(1, description="pool the map first (kernel = stride; a downsampling block)")
    pool: Literal["avg", "max"] = Field("avg", description="the pooling of stride > 1 (timm avg2 / max2)")
    out_dim: PosInt | None = Field(None, description="output width of the projection; null: the input width")
    expand_first: bool = Field(False, description="attention at out_dim (qkv widens, timm expand_first); false: "
                                                  "at the input width, the projection widens")
    head_first: bool = Field(True, description="qkv channels ordered (heads, q/k/v, head_dim) as timm's "
                                               "Attention2d; false: (q/k/v, heads, head_dim)")
    qkv_bias: bool = True
    proj_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention (timm's default); false: explicit, "
                                          "q scaled before q kᵀ")
    scale_order: ScaleOrder = Field(
        "before", description="explicit path only: scale q before q kᵀ, or the product after (Visformer)")

    key_optional = frozenset({"scale_order"})


def _attn_width(spec: RelPosAttentionSpec, x: TensorType) -> int:
    return (spec.out_dim or x.channels) if spec.expand_first else x.channels


def rel_pos_attention_shape(spec: RelPosAttentionSpec, x: TensorType,
                            out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", op="rel_pos_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, _attn_width(spec, x))
    h, w = x.height // spec.stride, x.width // spec.stride
    if h < 1 or w < 1:
        raise ShapeIssue("stride", f"{spec.stride} is larger than the {x.height}x{x.width} input")
    return x.with_channels(spec.out_dim or x.channels).with_grid(h, w), {"num_heads": num_heads, "head_dim": head_dim}


class RelPosAttention2d(nn.Module):
    """(B, C, H, W) -> (B, C_out, H/s, W/s). Parameter names: qkv, relative_position_bias_table, proj."""

    relative_position_bias_table: nn.Parameter | None
    relative_position_index: Tensor | None

    def __init__(self, *, dim: int, out_dim: int, grid: tuple[int, int], num_heads: int, head_dim: int,
                 pool: nn.Module, rel_pos_bias: bool, head_first: bool, qkv_bias: bool, proj_bias: bool,
                 attn_drop: float, proj_drop: float, fused: bool, scale_order: ScaleOrder = "before") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.head_first, self.fused = num_heads, head_dim, head_first, fused
        self.scale_order = scale_order
        self.pool = pool
        inner = num_heads * head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(inner, out_dim, 1, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            size = (2 * grid[0] - 1) * (2 * grid[1] - 1)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(size, num_heads))
            from timm.layers import gen_relative_position_index, trunc_normal_
            trunc_normal_(self.relative_position_bias_table, std=0.02)
            index = gen_relative_position_index(grid)  # (N, N) into the table
        else:
            self.register_parameter("relative_position_bias_table", None)
            index = None
        self.register_buffer("relative_position_index", index, persistent=False)

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's ``relative_position_bias_table``)."""
        return set() if self.relative_position_bias_table is None else {"relative_position_bias_table"}

    def _bias(self) -> Tensor | None:  # (1, heads, N, N)
        if self.relative_position_bias_table is None:
            return None
        table = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        return table.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, heads, N, N)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        B, _, H, W = x.shape
        qkv = self.qkv(x).flatten(2)  # (B, 3*heads*d, N)
        if self.head_first:
            q, k, v = qkv.view(B, self.num_heads, 3 * self.head_dim, -1).chunk(3, dim=2)  # 3 x (B, heads, d, N)
        else:
            q, k, v = qkv.view(B, 3, self.num_heads, self.head_dim, -1).unbind(1)  # 3 x (B, heads, d, N)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # 3 x (B, heads, N, d), views
        if self.fused:  # SDPA's CPU kernels want dense rows; the explicit path's matmuls take the views (no copies)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        y = attend(q, k, v, bias=self._bias(), drop=self.attn_drop, fused=self.fused,
                   scale_order=self.scale_order)  # (B, heads, N, d)
        y = y.transpose(-1, -2).reshape(B, -1, H, W)  # (B, heads, d, N) -> (B, heads*d, H, W)
        return self.proj_drop(self.proj(y))


def _build_rel_pos_attention(spec: RelPosAttentionSpec, r: Resolved) -> RelPosAttention2d:
    x = r.in_type
    out = r.out_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    pool: nn.Module = nn.Identity()
    if spec.stride > 1:
        pool_cls = nn.AvgPool2d if spec.pool == "avg" else nn.MaxPool2d
        pool = pool_cls(spec.stride, spec.stride)
    return RelPosAttention2d(dim=x.channels, out_dim=out.channels, grid=out.grid, num_heads=num_heads,
                             head_dim=head_dim, pool=pool, rel_pos_bias=spec.rel_pos_bias,
                             head_first=spec.head_first, qkv_bias=spec.qkv_bias, proj_bias=spec.proj_bias,
                             attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                             scale_order=spec.scale_order)


def fold_rel_pos_attention(module: nn.Module) -> Folding | None:
    """qkv reads the input unless a pooling comes first, proj writes the output."""
    if isinstance(module, RelPosAttention2d):
        reads = (module.qkv,) if isinstance(module.pool, nn.Identity) else ()
        return Folding(reads=reads, writes=module.proj)
    return None


REL_POS_ATTENTION = OpDef(
    RelPosAttentionSpec,
    infer=rel_pos_attention_shape,
    build=_build_rel_pos_attention,
    fold=fold_rel_pos_attention,
    cases=(
        Case({"head_dim": 8}, TensorType("maps", 16, 4, 5)),
        Case({"head_dim": 8, "stride": 2, "out_dim": 32}, TensorType("maps", 16, 6, 4), id="down"),
        Case({"num_heads": 2, "stride": 2, "pool": "max", "out_dim": 24, "expand_first": True, "head_first": False,
              "fused": False, "qkv_bias": False}, TensorType("maps", 16, 5, 5), id="expand-first-unfused"),
        Case({"num_heads": 4, "rel_pos_bias": False}, TensorType("maps", 16, 3, 3), id="no-bias"),
        Case({"num_heads": 2, "rel_pos_bias": False, "head_first": False, "qkv_bias": False, "proj_bias": False,
              "fused": False, "scale_order": "after"}, TensorType("maps", 16, 3, 3), id="visformer"),
    ),
)
