"""Class attention (Touvron et al., "Going deeper with Image Transformers", ICCV 2021): the prefix (class)
tokens attend to every token, and only they come out. Used with the ``class_attention`` block template,
which adds the result back into the prefix tokens and leaves the grid tokens alone."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import HeadsSpec, attend, resolve_heads
from metaformer_lab.ops.common import require_layout


class ClassAttentionSpec(HeadsSpec):
    """Queries from the prefix tokens only, keys and values from all tokens, separate q/k/v Linears
    (timm ``cait.ClassAttn``). Output: the prefix tokens alone, a tokens type with an empty grid."""

    type: Literal["class_attention"] = "class_attention"
    fused: bool = Field(True, description="F.scaled_dot_product_attention (timm's default); false: explicit, "
                        "q scaled before q kᵀ")


class ClassAttention(nn.Module):
    """(B, P + N, C) -> (B, P, C). Parameter names follow timm's ``ClassAttn`` (q, k, v, proj)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, prefix: int, qkv_bias: bool, proj_bias: bool,
                 attn_drop: float, proj_drop: float, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.prefix, self.fused = num_heads, head_dim, prefix, fused
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.k = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def heads(self, x: Tensor) -> Tensor:  # (B, N, heads*d) -> (B, heads, N, d)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:  # (B, P + N, C) -> (B, P, C)
        q = self.heads(self.q(x[:, : self.prefix]))  # (B, heads, P, d)
        k, v = self.heads(self.k(x)), self.heads(self.v(x))  # (B, heads, P + N, d)
        y = attend(q, k, v, bias=None, drop=self.attn_drop, fused=self.fused, scale_order="before")
        y = y.transpose(1, 2).flatten(2)  # (B, heads, P, d) -> (B, P, heads*d)
        return self.proj_drop(self.proj(y))


def class_attention_shape(spec: ClassAttentionSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="class_attention")
    if not x.prefix:
        raise ShapeIssue("type", "class_attention needs prefix (class) tokens to attend from; the input has none "
                                 "(add prefix_tokens to the stage)")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return x.with_grid(0, 0), {"num_heads": num_heads, "head_dim": head_dim}  # the prefix tokens alone: (B, P, C)


def _build_class_attention(spec: ClassAttentionSpec, r: Resolved) -> ClassAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return ClassAttention(x.channels, num_heads=num_heads, head_dim=head_dim, prefix=x.prefix, qkv_bias=spec.qkv_bias,
                          proj_bias=spec.proj_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop,
                          fused=spec.fused)


def fold_class_attention(module: nn.Module) -> Folding | None:
    """q, k and v all read the input (q its prefix tokens), proj writes the output."""
    if isinstance(module, ClassAttention):
        return Folding(reads=(module.q, module.k, module.v), writes=module.proj)
    return None


CLASS_ATTENTION = OpDef(
    ClassAttentionSpec,
    infer=class_attention_shape,
    build=_build_class_attention,
    fold=fold_class_attention,
    cases=(
        Case({"num_heads": 4, "head_dim": None, "qkv_bias": True}, TensorType("tokens", 16, 4, 5, prefix=1), id="cait"),
        Case({"head_dim": 8, "fused": False, "attn_drop": 0.1}, TensorType("tokens", 16, 3, 3, prefix=2),
             id="two-prefix-explicit"),
    ),
)
