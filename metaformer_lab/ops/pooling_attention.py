"""Multi-head pooling attention: MViT (Fan et al., "Multiscale Vision Transformers", ICCV 2021) and MViTv2 (Li et
al., 2022). Queries, keys and values are each pooled on the token grid, per head, by a depthwise conv shared by
the heads (or an average / max pool) and a norm over the head width; prefix (class) tokens ride along unpooled
and go through the norm. Pooling the queries with a stride shrinks the block's output grid (a stage transition:
the block's shortcut pools the same way, ``pool`` downsampler with ``mode: max``, ``prefix: pass``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import OddKernel, OpSpec, PosInt, Prob, require_grid, require_layout
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm

PoolMode = Literal["conv", "avg", "max"]


class PoolingAttentionSpec(OpSpec):
    """Multi-head pooling attention: q, k and v pooled per head on the token grid, pooled queries attending to
    pooled keys and values; a query stride shrinks the output grid (SlowFast ``MultiScaleAttention``: MViT, MViTv2).

    Each pooling is a depthwise conv over one head's width, shared by the heads, then a norm over the head width
    (``mode: conv``), or an average / max pool; prefix tokens are not pooled but go through the norm. q is pooled
    only when ``q_stride`` > 1 (MViT's ``POOL_Q_STRIDE`` blocks); k and v are pooled unless ``kernel`` and
    ``kv_stride`` are both 1 (then this is plain attention). Every pooling has kernel ``kernel``, padding
    ``kernel // 2``.
    """

    type: Literal["pooling_attention"] = "pooling_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(64)
    kernel: OddKernel = Field(3, description="kernel of the q, k and v poolings (POOL_KVQ_KERNEL), padding "
                                             "kernel // 2")
    q_stride: PosInt = Field(1, description="stride of the query pooling, which the output grid is divided by; "
                                            "1: q is not pooled; must divide H and W")
    kv_stride: PosInt = Field(1, description="stride of the key and value poolings (POOL_KV_STRIDE); must divide "
                                             "H and W")
    mode: PoolMode = Field("conv", description="conv: depthwise conv (no bias) over each head's channels, shared "
                                               "by the heads, then norm; avg, max: a pooling, no norm")
    norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-6),
                                  description="over the head width after each conv pooling, prefix tokens "
                                              "included (MViT: LayerNorm eps 1e-6); conv mode only")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    residual_pooling: bool = Field(False, description="add the pooled queries to the attention output of the grid "
                                                      "tokens (MViTv2's residual pooling connection)")
    rel_pos: bool = Field(False, description="MViTv2's decomposed relative positions: q · rel_pos_h[dy] + q · "
                                             "rel_pos_w[dx] added to the logits between grid tokens (tables of "
                                             "2 max(q, kv side) - 1 rows per axis, head width columns)")
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


def _pool(mode: PoolMode, head_dim: int, kernel: int, stride: int) -> nn.Module:
    if mode == "conv":
        return nn.Conv2d(head_dim, head_dim, kernel, stride=stride, padding=kernel // 2, groups=head_dim, bias=False)
    if mode == "avg":
        return nn.AvgPool2d(kernel, stride, kernel // 2)
    return nn.MaxPool2d(kernel, stride, kernel // 2)


class PoolingAttention(nn.Module):
    """Parameter names follow SlowFast's ``MultiScaleAttention`` (``qkv``, ``proj``, ``pool_q``, ``norm_q``,
    ``pool_k``, ``norm_k``, ``pool_v``, ``norm_v``; its Conv3d pooling kernels (d, 1, 1, k, k) are our Conv2d's
    (d, 1, k, k)). With ``prefix`` tokens the input is (B, P + H*W, C) on a ``grid`` of H x W, else (B, H, W, C);
    the output likewise on the pooled query grid."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, kernel: int, q_stride: int, kv_stride: int,
                 mode: PoolMode, norms: tuple[nn.Module, nn.Module, nn.Module] | None, qkv_bias: bool, attn_drop: float,
                 proj_drop: float, residual_pooling: bool, fused: bool, prefix: int, grid: tuple[int, int],
                 rel_pos: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused
        self.prefix, self.grid, self.q_stride = prefix, grid, q_stride
        self.residual_pooling = residual_pooling
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        pools_q, pools_kv = q_stride > 1, kernel > 1 or kv_stride > 1
        norm_q, norm_k, norm_v = norms if norms is not None else (None, None, None)
        self.pool_q = _pool(mode, head_dim, kernel, q_stride) if pools_q else None
        self.norm_q = norm_q if pools_q else None
        self.pool_k = _pool(mode, head_dim, kernel, kv_stride) if pools_kv else None
        self.norm_k = norm_k if pools_kv else None
        self.pool_v = _pool(mode, head_dim, kernel, kv_stride) if pools_kv else None
        self.norm_v = norm_v if pools_kv else None
        self.rel_pos_h: nn.Parameter | None = None
        self.rel_pos_w: nn.Parameter | None = None
        if rel_pos:
            q_grid = (grid[0] // q_stride, grid[1] // q_stride)
            kv_grid = (grid[0] // kv_stride, grid[1] // kv_stride)
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * max(q_grid[0], kv_grid[0]) - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * max(q_grid[1], kv_grid[1]) - 1, head_dim))
            self.register_buffer("dist_h", _distances(q_grid[0], kv_grid[0]), persistent=False)
            self.register_buffer("dist_w", _distances(q_grid[1], kv_grid[1]), persistent=False)

    def init_weights(self) -> None:
        """MViTv2's truncated normal (std .02) relative position tables."""
        for table in (self.rel_pos_h, self.rel_pos_w):
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02)

    def rel_pos_bias(self, q: Tensor, kv_tokens: int) -> Tensor:
        """(B, heads, P + h*w, P + h'*w') logit bias of MViTv2's decomposed relative positions: for grid query
        (i, j) and grid key (i', j'), q · rel_pos_h[dist_h[i, i']] + q · rel_pos_w[dist_w[j, j']]; zero where a
        prefix token is involved."""
        assert self.rel_pos_h is not None and self.rel_pos_w is not None
        P, (qh, kh), (qw, kw) = self.prefix, self.dist_h.shape, self.dist_w.shape
        r_q = q[:, :, P:].unflatten(2, (qh, qw))  # (B, heads, qh, qw, d)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, self.rel_pos_h[self.dist_h])  # (B, heads, qh, qw, kh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, self.rel_pos_w[self.dist_w])  # (B, heads, qh, qw, kw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(4).flatten(2, 3)  # (B, heads, qh*qw, kh*kw)
        return F.pad(bias, (kv_tokens - kh * kw, 0, P, 0)) if P else bias

    def pool(self, t: Tensor, pool: nn.Module | None, norm: nn.Module | None) -> Tensor:
        """(B, heads, P + H*W, d) -> (B, heads, P + h*w, d): the grid tokens pooled, the heads batched (one
        depthwise conv over d channels serves them all), the prefix tokens kept, then the norm over d."""
        if pool is None:
            return t
        B, heads, _, d = t.shape
        grid = t[:, :, self.prefix:].reshape(B * heads, *self.grid, d).permute(0, 3, 1, 2)  # (B*heads, d, H, W)
        pooled = pool(grid).flatten(2).transpose(1, 2).reshape(B, heads, -1, d)  # (B, heads, h*w, d)
        t = torch.cat([t[:, :, : self.prefix], pooled], dim=2) if self.prefix else pooled
        return norm(t) if norm is not None else t

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, h, w, C), or (B, P + H*W, C) -> (B, P + h*w, C)
        tokens = x if self.prefix else x.flatten(1, 2)  # (B, N, C)
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, d)
        q = self.pool(q, self.pool_q, self.norm_q)  # (B, heads, P + h*w, d)
        k = self.pool(k, self.pool_k, self.norm_k)  # (B, heads, P + h'*w', d)
        v = self.pool(v, self.pool_v, self.norm_v)
        bias = self.rel_pos_bias(q, k.shape[2]) if self.rel_pos_h is not None else None
        y = attend(q, k, v, bias=bias, drop=self.attn_drop, fused=self.fused)  # (B, heads, P + h*w, d)
        if self.residual_pooling:  # MViTv2: the pooled queries added to the grid tokens' output
            y = y + (F.pad(q[:, :, self.prefix:], (0, 0, self.prefix, 0)) if self.prefix else q)
        y = self.proj_drop(self.proj(y.transpose(1, 2).flatten(2)))  # (B, P + h*w, C)
        if self.prefix:
            return y
        return y.unflatten(1, (self.grid[0] // self.q_stride, self.grid[1] // self.q_stride))


def _distances(q_size: int, k_size: int) -> Tensor:
    """(q_size, k_size) rows of the relative position table for each query and key position along one axis, the
    coarser grid's positions scaled to the finer's (SlowFast's ``cal_rel_pos_spatial``)."""
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio
    return (dist + (k_size - 1) * k_ratio).long()


def pooling_attention_shape(spec: PoolingAttentionSpec, x: TensorType,
                            out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="pooling_attention")
    require_grid(x, op="pooling_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    for field, stride in (("q_stride", spec.q_stride), ("kv_stride", spec.kv_stride)):
        if x.height % stride or x.width % stride:
            raise ShapeIssue(field, f"{stride} does not divide the {x.height}x{x.width} token grid")
    if spec.mode != "conv" and spec.norm is not None:
        raise ShapeIssue("norm", f"mode {spec.mode} pools without a norm (SlowFast's avg and max modes); set norm: "
                                 "null")
    check_norm(spec.norm, TensorType("tokens", head_dim, x.height, x.width, prefix=x.prefix), "norm")
    out = x.with_grid(x.height // spec.q_stride, x.width // spec.q_stride)
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_pooling_attention(spec: PoolingAttentionSpec, r: Resolved) -> PoolingAttention:
    x, head_dim = r.in_type, r["head_dim"]
    norms = None
    if spec.norm is not None:
        q_type = TensorType("tokens", head_dim, r.out_type.height, r.out_type.width, prefix=x.prefix)
        kv_type = q_type.with_grid(x.height // spec.kv_stride, x.width // spec.kv_stride)
        norms = (build_norm(spec.norm, q_type), build_norm(spec.norm, kv_type), build_norm(spec.norm, kv_type))
    return PoolingAttention(x.channels, num_heads=r["num_heads"], head_dim=head_dim, kernel=spec.kernel,
                            q_stride=spec.q_stride, kv_stride=spec.kv_stride, mode=spec.mode, norms=norms,
                            qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop,
                            residual_pooling=spec.residual_pooling, fused=spec.fused, prefix=x.prefix,
                            grid=x.grid, rel_pos=spec.rel_pos)


def fold_pooling_attention(module: nn.Module) -> Folding | None:
    """qkv alone reads the input (prefix tokens included); proj writes the output."""
    if not isinstance(module, PoolingAttention):
        return None
    return Folding(reads=(module.qkv,), writes=module.proj)


POOLING_ATTENTION = OpDef(
    PoolingAttentionSpec,
    infer=pooling_attention_shape,
    build=_build_pooling_attention,
    fold=fold_pooling_attention,
    cases=(
        Case({"num_heads": 2, "kv_stride": 2}, TensorType("tokens", 16, 4, 4)),
        Case({"num_heads": 2, "q_stride": 2, "kv_stride": 2}, TensorType("tokens", 16, 4, 6, prefix=1),
             id="mvit-transition"),
        Case({"num_heads": 1, "kv_stride": 4, "qkv_bias": True}, TensorType("tokens", 8, 4, 4, prefix=1),
             id="mvit-first"),
        Case({"head_dim": 4, "kernel": 1, "q_stride": 2, "mode": "max", "norm": None, "fused": False},
             TensorType("tokens", 16, 4, 4), id="max"),
        Case({"num_heads": 2, "q_stride": 2, "mode": "avg", "norm": None}, TensorType("tokens", 16, 4, 4, prefix=2),
             id="avg-two-prefix"),
        Case({"num_heads": 2, "q_stride": 2, "kv_stride": 2, "residual_pooling": True},
             TensorType("tokens", 16, 4, 4, prefix=1), id="residual-pooling"),
        Case({"num_heads": 2, "kernel": 1}, TensorType("tokens", 16, 3, 3), id="no-pooling"),
        Case({"num_heads": 2, "q_stride": 2, "kv_stride": 4, "residual_pooling": True, "rel_pos": True},
             TensorType("tokens", 16, 4, 8, prefix=1), id="mvitv2"),
        Case({"num_heads": 2, "kv_stride": 2, "rel_pos": True, "fused": False}, TensorType("tokens", 16, 4, 2),
             id="rel-pos"),
    ),
)
