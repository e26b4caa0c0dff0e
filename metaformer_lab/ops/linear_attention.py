"""Kernelised linear attention (Katharopoulos et al., "Transformers are RNNs", 2020): softmax replaced by
a feature map phi, so ``phi(q) (phi(k)ᵀ v) / (phi(q) · sum phi(k))`` costs O(N) instead of O(N²)."""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, SequenceMixer, head_dim_field, resolve_heads
from metaformer_lab.ops.common import Eps, OpSpec, PosInt, Prob, require_layout

FeatureMap = Literal["elu", "relu"]


class LinearAttentionSpec(OpSpec):
    """Linear attention over all tokens, prefix tokens included (the paper's elu + 1 feature map, or
    EfficientViT's ``LiteMLA`` relu; no softmax, no scale)."""

    type: Literal["linear_attention"] = "linear_attention"
    feature_map: FeatureMap = Field("elu", description="phi: elu(x) + 1 (Katharopoulos) or relu (EfficientViT)")
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    qkv_bias: bool = False
    eps: Eps = Field(1e-6, description="added to the normaliser phi(q) · sum phi(k)")
    proj_drop: Prob = 0.0


def _float32(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off where it exists, so the sums over N accumulate in float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LinearAttention(SequenceMixer):
    """Parameter names as :class:`~metaformer_lab.ops.attention.Attention` (qkv, proj)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, feature_map: FeatureMap, qkv_bias: bool,
                 eps: float, proj_drop: float, maps: bool) -> None:
        super().__init__(maps)
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.elu = feature_map == "elu"
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def phi(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0 if self.elu else F.relu(x)

    def mix(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)  # 3 x (B, heads, N, d), float32
        with _float32(x.device):
            q, k = self.phi(q), self.phi(k)
            kv = k.transpose(-2, -1) @ v  # (B, heads, d, d) = sum_n phi(k_n) v_nᵀ
            norm = q @ k.sum(dim=-2).unsqueeze(-1)  # (B, heads, N, 1) = phi(q_n) · sum_m phi(k_m)
            y = (q @ kv) / (norm + self.eps)  # (B, heads, N, d)
        y = y.to(x.dtype).transpose(1, 2).flatten(2)  # (B, heads, N, d) -> (B, N, heads*d)
        return self.proj_drop(self.proj(y))


def linear_attention_shape(spec: LinearAttentionSpec, x: TensorType,
                           out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", "tokens", op="linear_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build_linear_attention(spec: LinearAttentionSpec, r: Resolved) -> LinearAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return LinearAttention(x.channels, num_heads=num_heads, head_dim=head_dim, feature_map=spec.feature_map,
                           qkv_bias=spec.qkv_bias, eps=spec.eps, proj_drop=spec.proj_drop, maps=x.layout == "maps")


def fold_linear_attention(module: nn.Module) -> Folding | None:
    """qkv reads the input, proj writes the output."""
    if isinstance(module, LinearAttention):
        return Folding(reads=(module.qkv,), writes=module.proj)
    return None


LINEAR_ATTENTION = OpDef(
    LinearAttentionSpec,
    infer=linear_attention_shape,
    build=_build_linear_attention,
    preserves_type=True,
    fold=fold_linear_attention,
    cases=(
        Case({}, TensorType("tokens", 32, 4, 5)),
        Case({"feature_map": "relu", "num_heads": 4}, TensorType("maps", 16, 4, 4), id="relu-maps"),
        Case({"head_dim": 8, "qkv_bias": True}, TensorType("tokens", 16, 3, 4, prefix=2), id="prefixed"),
    ),
)
