"""Talking-heads attention (Shazeer et al., "Talking-Heads Attention", 2020), CaiT's self-attention
(Touvron et al., "Going deeper with Image Transformers", ICCV 2021): learned projections across the
heads of the attention logits (before the softmax) and of the attention weights (after it)."""

from __future__ import annotations

from typing import Literal

from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import HeadsSpec, SequenceMixer, resolve_heads
from metaformer_lab.ops.common import require_layout


class TalkingHeadsAttentionSpec(HeadsSpec):
    """Multi-head self-attention over all tokens whose heads are mixed by a Linear over the head axis
    before and after the softmax (timm ``cait.TalkingHeadAttn``). Always explicit: the attention
    matrix is needed, so there is no fused path."""

    type: Literal["talking_heads_attention"] = "talking_heads_attention"


class TalkingHeadsAttention(SequenceMixer):
    """Parameter names follow timm's ``TalkingHeadAttn`` (qkv, proj_l, proj_w, proj)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool, proj_bias: bool, attn_drop: float,
                 proj_drop: float, maps: bool) -> None:
        super().__init__(maps)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim**-0.5
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def mix_heads(self, attn: Tensor, linear: nn.Linear) -> Tensor:  # (B, heads, N, N) -> (B, heads, N, N)
        return linear(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # heads last for the Linear, then back

    def mix(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, d)
        # timm scales q before q kᵀ; the order matters for exact parity
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = self.mix_heads(attn, self.proj_l).softmax(dim=-1)
        attn = self.attn_drop(self.mix_heads(attn, self.proj_w))
        y = (attn @ v).transpose(1, 2).flatten(2)  # (B, heads, N, d) -> (B, N, heads*d)
        return self.proj_drop(self.proj(y))


def talking_heads_shape(spec: TalkingHeadsAttentionSpec, x: TensorType,
                        out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", "tokens", op="talking_heads_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build_talking_heads(spec: TalkingHeadsAttentionSpec, r: Resolved) -> TalkingHeadsAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return TalkingHeadsAttention(x.channels, num_heads=num_heads, head_dim=head_dim, qkv_bias=spec.qkv_bias,
                                 proj_bias=spec.proj_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop,
                                 maps=x.layout == "maps")


def fold_talking_heads(module: nn.Module) -> Folding | None:
    """qkv reads the input, proj writes the output (the head-mixing linears act on heads, not channels)."""
    if isinstance(module, TalkingHeadsAttention):
        return Folding(reads=(module.qkv,), writes=module.proj)
    return None


TALKING_HEADS_ATTENTION = OpDef(
    TalkingHeadsAttentionSpec,
    infer=talking_heads_shape,
    build=_build_talking_heads,
    preserves_type=True,
    fold=fold_talking_heads,
    cases=(
        Case({"num_heads": 4, "head_dim": None, "qkv_bias": True}, TensorType("tokens", 16, 4, 5), id="cait"),
        Case({"head_dim": 8, "attn_drop": 0.1}, TensorType("tokens", 16, 3, 3, prefix=1), id="prefixed"),
        Case({"num_heads": 2, "head_dim": 4, "proj_bias": False}, TensorType("maps", 16, 4, 5), id="maps-inner"),
    ),
)
