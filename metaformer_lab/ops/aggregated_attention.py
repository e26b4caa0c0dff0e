"""Aggregated attention (TransNeXt, Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
CVPR 2024): pixel-focused attention, each query attending with one softmax to its sliding-window neighbourhood and
to pooled keys of the whole map.

The authors' ``classification/attention_native.py`` (``AggregatedAttention``) and ``transnext.py`` (``Attention``,
the last stage's plain form). Queries and keys are L2-normalised; the queries gain a learned query embedding and are
scaled by ``softplus(temperature)`` (per head) times ``log(n)``, n the number of keys the query sees (its valid
neighbours plus the pooled keys); a small MLP (``cpb_fc1``, ``cpb_fc2``) turns log-spaced relative coordinates of
query and pooled key into a bias per head, a learned table (``relative_pos_bias_local``) biases the neighbours, and
the neighbours' weights after the softmax gain a query-dependent term (``q_norm @ learnable_tokens +
learnable_bias``). Parameter names are the authors', so their state_dict loads by renames (the ConvGLU's
``dwconv.dwconv`` is our ``glu``'s ``dwconv``). The relative coordinates are normalised by the op's own grid (the
authors' ``pretrain_size`` = ``img_size``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, head_dim_field, resolve_heads
from metaformer_lab.ops.common import (
    OddKernel,
    PosInt,
    Prob,
    inference_key,
    require_grid,
    require_layout,
    require_no_prefix,
    truncated_normal_,
)
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class AggregatedAttentionSpec(GridOpSpec):
    """Aggregated attention (TransNeXt): each query attends with one softmax to its window x window
    neighbourhood and to the map pooled to pool_size x pool_size, cosine similarity scaled by log(keys seen).

    ``window`` and ``pool_size`` null: plain global attention with the same query embedding, length scaling and
    relative position MLP (the authors' ``Attention``, TransNeXt's last stage); ``window`` null alone: the pooled
    keys only.
    """

    type: Literal["aggregated_attention"] = "aggregated_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    window: OddKernel | None = Field(3, description="side of each query's sliding-window neighbourhood (zero-padded "
                                                    "at the borders, padding masked out); null: no local keys")
    pool_size: PosInt | None = Field(7, description="side of the pooled key grid (1x1 conv, GELU, adaptive average "
                                                    "pool, LayerNorm); at most the grid's shorter side; null: every "
                                                    "token is a key (global attention, one qkv Linear)")
    qkv_bias: bool = True
    cpb_hidden: PosInt = Field(512, description="hidden width of the relative position bias MLP (cpb_fc1, cpb_fc2)")
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0


def relative_position_cpb(query: tuple[int, int], keys: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(index (N*M,) into the table, table (T, 2)) of the log-spaced relative coordinates of each query of the
    ``query`` grid and each key of the ``keys`` grid, a key at the centre of its adaptive-pooling bin (the
    authors' ``get_relative_position_cpb`` with ``pretrain_size`` = the query grid; a 1-wide axis is not scaled)."""
    axes = []
    for q_len, k_len in zip(query, keys, strict=True):
        axis_q = torch.arange(q_len, dtype=torch.float32, device="cpu")  # on the CPU under any default device
        axis_k = F.adaptive_avg_pool1d(axis_q.unsqueeze(0), k_len).squeeze(0)
        axes.append((axis_q, axis_k, max(q_len - 1, 1)))
    (qh, kh, sh), (qw, kw, sw) = axes
    qh, qw = (a.reshape(-1) for a in torch.meshgrid(qh, qw, indexing="ij"))
    kh, kw = (a.reshape(-1) for a in torch.meshgrid(kh, kw, indexing="ij"))
    rel_h = (qh[:, None] - kh[None, :]) / sh * 8
    rel_w = (qw[:, None] - kw[None, :]) / sw * 8
    table, index = torch.unique(torch.stack([rel_h, rel_w], dim=-1).view(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index, table


def local_lengths_and_mask(grid: tuple[int, int], window: int) -> tuple[Tensor, Tensor]:
    """(valid neighbours of each token (N, 1), padding mask (window², N): True where the neighbour is padding; the
    authors' mask transposed)."""
    ones = F.unfold(torch.ones(1, 1, *grid, device="cpu"), window, padding=window // 2)[0]  # (window², N)
    return ones.sum(0).unsqueeze(-1), ones == 0


class AggregatedAttention(nn.Module):
    """The authors' ``AggregatedAttention`` (``window`` and ``pool_size`` set), pooled-only attention (``window``
    None) or their plain ``Attention`` (both None), on (B, H, W, C) tokens."""

    seq_length_scale: Tensor
    padding_mask: Tensor | None
    relative_pos_index: Tensor
    relative_coords_table: Tensor
    _bias_cache: tuple[tuple[object, ...], Tensor] | None

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int, head_dim: int, window: int | None,
                 pool_size: int | None, qkv_bias: bool, cpb_hidden: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.window, self.pool_size = num_heads, head_dim, window, pool_size
        self._bias_cache = None
        inner = num_heads * head_dim
        n = grid[0] * grid[1]
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(truncated_normal_(torch.empty(num_heads, 1, head_dim), std=0.02))
        if pool_size is None:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
            keys = grid
        else:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            self.sr = nn.Conv2d(dim, dim, 1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
            keys = (pool_size, pool_size)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, cpb_hidden)
        self.cpb_act = nn.ReLU()
        self.cpb_fc2 = nn.Linear(cpb_hidden, num_heads)
        device = self.proj.weight.device  # the buffers are computed on the CPU (unique has no meta kernel)
        index, table = relative_position_cpb(grid, keys)
        self.register_buffer("relative_pos_index", index.to(device), persistent=False)
        self.register_buffer("relative_coords_table", table.to(device), persistent=False)
        seen = torch.full((n, 1), float(keys[0] * keys[1]), device="cpu")
        mask = None
        if window is not None:
            local = window * window
            self.relative_pos_bias_local = nn.Parameter(truncated_normal_(torch.empty(num_heads, local), std=4e-4))
            self.learnable_tokens = nn.Parameter(truncated_normal_(torch.empty(num_heads, head_dim, local), std=0.02))
            self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, local))
            lengths, mask = local_lengths_and_mask(grid, window)
            seen = seen + lengths
        self.register_buffer("seq_length_scale", seen.log().to(device), persistent=False)  # (N, 1)
        self.register_buffer("padding_mask", None if mask is None else mask.to(device), persistent=False)

    def init_weights(self) -> None:
        """The authors' init of the parameters the default scheme does not know (it overwrites them)."""
        with torch.no_grad():
            self.temperature.fill_(math.log(math.expm1(1 / 0.24)))  # softplus(temperature) = 1 / 0.24
            truncated_normal_(self.query_embedding, std=0.02)
            if self.window is not None:
                truncated_normal_(self.relative_pos_bias_local, std=4e-4)
                truncated_normal_(self.learnable_tokens, std=0.02)
                self.learnable_bias.zero_()

    def no_weight_decay(self) -> set[str]:
        """The authors' ``no_weight_decay_keywords``: query embedding, local bias table, bias MLP, temperature."""
        return {name for name, _ in self.named_parameters()
                if name.startswith(("query_embedding", "relative_pos_bias_local", "cpb_", "temperature"))}

    def position_bias(self) -> Tensor:  # (heads, N, M)
        """The relative position bias of every query and key, from the MLP on the table of distinct offsets.

        Without autograd (inference) the bias is kept until a parameter of the MLP changes (its version counter or
        storage), as it depends on nothing else: the MLP runs once, not on every call. Parameters made under
        ``torch.inference_mode`` have no version counter: their bias is computed on every call."""
        key = inference_key(self.cpb_fc1.weight, self.cpb_fc1.bias, self.cpb_fc2.weight, self.cpb_fc2.bias,
                            self.relative_coords_table)
        if key is not None and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        table = self.cpb_fc2(self.cpb_act(self.cpb_fc1(self.relative_coords_table)))  # (T, heads)
        bias = table.t()[:, self.relative_pos_index].view(self.num_heads, self.seq_length_scale.shape[0], -1)
        self._bias_cache = None if key is None else (key, bias)
        return bias

    def _heads(self, t: Tensor, parts: int = 1) -> Tensor:  # (B, N, parts * heads * d) -> (B, parts * heads, N, d)
        return t.unflatten(-1, (parts * self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        scale = F.softplus(self.temperature) * self.seq_length_scale  # (heads, N, 1)
        drop = self.attn_drop.p if self.training else 0.0
        if self.pool_size is None:  # the authors' Attention: every token a key
            q, k, v = self._heads(self.qkv(tokens), 3).chunk(3, dim=1)  # 3 x (B, heads, N, d)
            q = ((F.normalize(q, dim=-1) + self.query_embedding) * scale).to(v.dtype)  # fp32 scale under autocast
            y = F.scaled_dot_product_attention(q, F.normalize(k, dim=-1), v, attn_mask=self.position_bias().to(v.dtype),
                                               dropout_p=drop, scale=1.0)
            return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, H, W, -1)))
        q_norm = F.normalize(self._heads(self.q(tokens)), dim=-1)  # (B, heads, N, d)
        q = (q_norm + self.query_embedding) * scale
        pooled = self.pool(self.act(self.sr(x.permute(0, 3, 1, 2)))).flatten(2).transpose(1, 2)  # (B, P, C)
        k_pool, v_pool = self._heads(self.kv(self.norm(pooled)), 2).chunk(2, dim=1)  # 2 x (B, heads, P, d)
        k_pool = F.normalize(k_pool, dim=-1)
        if self.window is None:
            y = F.scaled_dot_product_attention(q.to(v_pool.dtype), k_pool, v_pool,
                                               attn_mask=self.position_bias().to(v_pool.dtype), dropout_p=drop,
                                               scale=1.0)
            return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, H, W, -1)))
        # Keys along dim 2, queries last: the unfolded neighbourhoods are used where they lie, without a copy.
        inner = self.num_heads * self.head_dim
        k, v = self.kv(tokens).split(inner, dim=-1)
        k = F.normalize(k.unflatten(-1, (self.num_heads, self.head_dim)), dim=-1).flatten(2)
        kv = torch.cat([k, v], dim=-1).transpose(1, 2).reshape(B, 2 * inner, H, W)
        local = self.window * self.window
        # every token's neighbourhood: 2 x (B, heads, d, window², N), zero outside the map
        k_local, v_local = F.unfold(kv, self.window, padding=self.window // 2).view(
            B, 2 * self.num_heads, self.head_dim, local, H * W).chunk(2, dim=1)
        q_t = q.transpose(-2, -1)  # (B, heads, d, N)
        attn_local = (q_t.unsqueeze(-2) * k_local).sum(2) + self.relative_pos_bias_local.unsqueeze(-1)
        attn_local = attn_local.masked_fill(self.padding_mask, float("-inf"))  # (B, heads, window², N)
        attn_pool = k_pool @ q_t + self.position_bias().transpose(-2, -1)  # (B, heads, P, N)
        attn = self.attn_drop(torch.cat([attn_local, attn_pool], dim=2).softmax(dim=2))
        attn_local, attn_pool = attn.split([local, attn_pool.shape[2]], dim=2)
        # the query-dependent local term, (q_norm @ learnable_tokens + learnable_bias) transposed
        attn_local = attn_local + self.learnable_tokens.transpose(-2, -1) @ q_norm.transpose(-2, -1) \
            + self.learnable_bias.transpose(-2, -1)
        y = (attn_local.unsqueeze(2) * v_local).sum(3) + v_pool.transpose(-2, -1) @ attn_pool  # (B, heads, d, N)
        return self.proj_drop(self.proj(y.reshape(B, inner, H * W).transpose(1, 2).reshape(B, H, W, inner)))


def aggregated_attention_shape(spec: AggregatedAttentionSpec, x: TensorType,
                               out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="aggregated_attention")
    require_grid(x, op="aggregated_attention")
    require_no_prefix(x, op="aggregated_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    if spec.pool_size is None and spec.window is not None:
        raise ShapeIssue("window", f"{spec.window} adds local keys to pooled ones, but pool_size is null (every token "
                                   "a key already); set pool_size, or window null for global attention")
    if spec.pool_size is not None and spec.pool_size > min(x.height, x.width):
        raise ShapeIssue("pool_size", f"{spec.pool_size} is larger than the {x.height}x{x.width} feature map")
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build_aggregated_attention(spec: AggregatedAttentionSpec, r: Resolved) -> AggregatedAttention:
    x = r.in_type
    return AggregatedAttention(x.channels, x.grid, num_heads=r["num_heads"], head_dim=r["head_dim"],
                               window=spec.window, pool_size=spec.pool_size, qkv_bias=spec.qkv_bias,
                               cpb_hidden=spec.cpb_hidden, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop)


def fold_aggregated_attention(module: nn.Module) -> Folding | None:
    """proj writes the output; global attention's qkv reads the input alone (kv also reads the pooled map, so a
    norm before the op does not fold into it)."""
    if not isinstance(module, AggregatedAttention):
        return None
    return Folding(reads=(module.qkv,) if module.pool_size is None else (), writes=module.proj)


AGGREGATED_ATTENTION = around_prefix(OpDef(
    AggregatedAttentionSpec,
    infer=aggregated_attention_shape,
    build=_build_aggregated_attention,
    preserves_type=True,
    fold=fold_aggregated_attention,
    cases=(
        Case({"num_heads": 2, "pool_size": 2}, TensorType("tokens", 16, 4, 6)),
        Case({"head_dim": 8, "window": 5, "pool_size": 3, "qkv_bias": False, "cpb_hidden": 16},
             TensorType("tokens", 16, 3, 5), id="window-5"),
        Case({"num_heads": 2, "window": None, "pool_size": 2, "cpb_hidden": 16}, TensorType("tokens", 16, 4, 4),
             id="pooled-only"),
        Case({"num_heads": 2, "window": None, "pool_size": None, "cpb_hidden": 16}, TensorType("tokens", 16, 3, 3),
             id="global"),
        Case({"num_heads": 2, "pool_size": 2, "cpb_hidden": 16, "prefix": "pass"},
             TensorType("tokens", 16, 4, 4, prefix=1), id="prefix-pass"),
    ),
))
