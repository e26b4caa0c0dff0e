"""Global multi-head self-attention (Vaswani et al. 2017; ViT, Dosovitskiy et al. 2021; CAFormer's
attention, Yu et al. "MetaFormer Baselines for Vision", 2022).

Also home of what the other attention files share: the ``num_heads`` / ``head_dim`` fields and their
resolution, :func:`attend` (softmax attention, fused or explicit) and :class:`SequenceMixer`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import OpSpec, PosInt, Prob, require_layout

ScaleOrder = Literal["before", "after"]

NUM_HEADS_DOC = "number of heads; null: dim // head_dim"


def head_dim_field(default: int) -> Any:
    """The ``head_dim`` field: ``default`` when ``num_heads`` is left out (MetaFormer style, heads follow
    the width), null when ``num_heads`` is given (ViT style, ``dim // num_heads``).

    Giving both sets the inner width to ``num_heads * head_dim`` (timm's ``attn_head_dim``). The default
    depends on ``num_heads`` through a factory, so every dump mode (full, unset, non-default) round-trips.
    """
    return Field(
        default_factory=lambda data: None if data.get("num_heads") else default,
        description=f"width of one head; default {default} without num_heads, null (dim // num_heads) with it",
    )


def resolve_heads(num_heads: int | None, head_dim: int | None, dim: int) -> tuple[int, int]:
    """(heads, head width) for a ``dim``-wide input; raises ShapeIssue when they do not fit."""
    if num_heads is not None and head_dim is not None:
        return num_heads, head_dim  # inner width num_heads * head_dim, free of dim
    if num_heads is not None:
        if dim % num_heads:
            raise ShapeIssue("num_heads", f"{num_heads} does not divide dim {dim}")
        return num_heads, dim // num_heads
    if head_dim is not None:
        if dim % head_dim:
            raise ShapeIssue("head_dim", f"{head_dim} does not divide dim {dim}")
        return dim // head_dim, head_dim
    raise ShapeIssue("head_dim", "null needs num_heads; set num_heads, head_dim or both")


def attend(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, drop: nn.Dropout, fused: bool,
           scale_order: ScaleOrder = "before") -> Tensor:
    """``softmax(q kᵀ / sqrt(d) + bias) v`` over (..., N, d) queries and (..., M, d) keys and values.

    ``fused`` calls ``F.scaled_dot_product_attention``; otherwise the attention matrix is explicit, and
    ``scale_order`` says where the scale goes: timm's ViT scales q before ``q @ kᵀ``, timm's MetaFormer
    scales the product after. The two round differently; the order matters for exact parity.
    """
    p = drop.p if drop.training else 0.0
    if bias is not None:
        bias = bias.to(q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    scale = q.shape[-1] ** -0.5
    before = scale_order == "before"
    attn = (q * scale) @ k.transpose(-2, -1) if before else (q @ k.transpose(-2, -1)) * scale  # (..., N, M)
    if bias is not None:
        attn = attn + bias
    return drop(attn.softmax(dim=-1)) @ v  # (..., N, d)


class SequenceMixer(nn.Module):
    """Runs :meth:`mix` on a (B, N, C) sequence for maps (B, C, H, W) and tokens (B, H, W, C) or
    (B, P + H*W, C); the output comes back in the input's layout."""

    def __init__(self, maps: bool) -> None:
        super().__init__()
        self.maps = maps

    def mix(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.maps:
            y = self.mix(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, H*W, C)
            return y.transpose(1, 2).reshape(x.shape)  # (B, H*W, C) -> (B, C, H, W)
        return self.mix(x.flatten(1, -2)).reshape(x.shape)  # (B, H, W, C) or (B, N, C) -> (B, N, C) -> back


class AttentionSpec(OpSpec):
    """Multi-head self-attention over all tokens, prefix tokens included (timm ``layers.Attention``,
    timm ``metaformer.Attention``)."""

    type: Literal["attention"] = "attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    qkv_bias: bool = False
    proj_bias: bool = Field(True, description="timm's MetaFormer attention has none")
    qk_norm: bool = Field(False, description="LayerNorm (eps 1e-6) over head_dim on q and k, as timm's ViT")
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    scale_order: ScaleOrder = Field(
        "before", description="explicit path only: scale q before q kᵀ (timm ViT) or the product after (MetaFormer)")


class Attention(SequenceMixer):
    """Parameter names follow timm's ViT ``Attention`` (qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool,
                 attn_drop: float, proj_drop: float, fused: bool, scale_order: ScaleOrder, maps: bool) -> None:
        super().__init__(maps)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.fused, self.scale_order = fused, scale_order
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def mix(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        y = attend(q, k, v, bias=None, drop=self.attn_drop, fused=self.fused, scale_order=self.scale_order)
        y = y.transpose(1, 2).flatten(2)  # (B, heads, N, d) -> (B, N, heads*d)
        return self.proj_drop(self.proj(y))


def attention_shape(spec: AttentionSpec, x: TensorType) -> TensorType:
    require_layout(x, "maps", "tokens", op="attention")
    resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return x


def _build_attention(spec: AttentionSpec, x: TensorType) -> Attention:
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return Attention(x.channels, num_heads=num_heads, head_dim=head_dim, qkv_bias=spec.qkv_bias,
                     proj_bias=spec.proj_bias, qk_norm=spec.qk_norm, attn_drop=spec.attn_drop,
                     proj_drop=spec.proj_drop, fused=spec.fused, scale_order=spec.scale_order,
                     maps=x.layout == "maps")


ATTENTION = OpDef(
    AttentionSpec,
    infer=attention_shape,
    build=_build_attention,
    preserves_type=True,
    cases=(
        Case({}, TensorType("tokens", 64, 4, 5)),
        Case({"num_heads": 4, "qkv_bias": True, "qk_norm": True}, TensorType("tokens", 16, 3, 3, prefix=1),
             id="vit-prefixed"),
        Case({"num_heads": 2, "head_dim": 4, "fused": False, "scale_order": "after", "proj_bias": False},
             TensorType("maps", 16, 4, 5), id="maps-unfused"),
    ),
)
