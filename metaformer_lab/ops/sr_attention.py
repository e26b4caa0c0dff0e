"""Spatial-reduction attention: PVT (Wang et al., 2021) and PVTv2 (Wang et al., 2022), also Twins' global
sub-sampled attention. Queries come from every grid token, keys and values from a reduced grid."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import Groups, OpSpec, PosInt, Prob, require_groups, require_layout, require_no_prefix
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm


class SrAttentionSpec(OpSpec):
    """Attention with keys and values from a reduced grid (timm ``pvt_v2.Attention``; with ``reduction:
    conv`` also timm ``twins.GlobalSubSampleAttn``).

    ``conv``: a ``sr_ratio`` x ``sr_ratio`` strided conv then ``norm`` (no reduction when ``sr_ratio`` is 1).
    ``pool``: PVTv2-li's adaptive average pool to ``pool_size``, 1x1 conv, ``norm``, GELU, whatever
    ``sr_ratio`` says (timm ``linear_attn=True``).
    """

    type: Literal["sr_attention"] = "sr_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(64)
    sr_ratio: PosInt = Field(1, description="conv reduction: kernel and stride; must divide H and W")
    reduction: Literal["conv", "pool"] = Field("conv", description="pool: PVTv2-li, ignores sr_ratio")
    pool_size: PosInt = Field(7, description="pool reduction: side of the pooled grid")
    norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5, affine=True, bias=True),
                                  description="after the reduction conv; PVTv2 uses nn.LayerNorm (eps 1e-5)")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    groups: Groups = Field(1, description="groups of the reduction conv (1: a full conv); must divide the width")

    key_optional = frozenset({"groups"})


def reduced(spec: SrAttentionSpec, x: TensorType) -> TensorType | None:
    """The grid keys and values come from, or None when there is no reduction."""
    if spec.reduction == "pool":
        return x.with_grid(spec.pool_size, spec.pool_size)
    if spec.sr_ratio == 1:
        return None
    return x.with_grid(x.height // spec.sr_ratio, x.width // spec.sr_ratio)


class SrAttention(nn.Module):
    """Parameter names follow timm's PVTv2 ``Attention`` (q, kv, proj, sr, norm); ``kv`` holds k then v."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, sr_ratio: int, pool_size: int | None,
                 norm: nn.Module, qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool,
                 groups: int = 1, out_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        pool = pool_size is not None
        kernel = 1 if pool else sr_ratio
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool else nn.Identity()
        self.sr = nn.Conv2d(dim, dim, kernel, stride=kernel, groups=groups) if pool or sr_ratio > 1 else None
        self.norm = norm  # nn.Identity without a reduction or a norm spec
        self.act = nn.GELU() if pool else nn.Identity()

    def reduce(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, h, w, C)
        if self.sr is None:
            return x
        x = self.sr(self.pool(x.permute(0, 3, 1, 2)))  # (B, C, H, W) -> (B, C, h, w)
        return self.act(self.norm(x.permute(0, 2, 3, 1)))  # (B, h, w, C)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        q = self.q(x).flatten(1, 2).unflatten(-1, (self.num_heads, self.head_dim))  # (B, H*W, heads, d)
        kv = self.kv(self.reduce(x)).flatten(1, 2)  # (B, h, w, 2*inner) -> (B, h*w, 2*inner)
        kv = kv.unflatten(-1, (2, self.num_heads, self.head_dim))  # (B, h*w, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, h*w, d): k first, as timm
        y = attend(q.transpose(1, 2), k, v, bias=None, drop=self.attn_drop, fused=self.fused)  # (B, heads, H*W, d)
        y = y.transpose(1, 2).flatten(2).unflatten(1, x.shape[1:3])  # (B, heads, H*W, d) -> (B, H, W, inner)
        return self.proj_drop(self.proj(y))


def sr_attention_shape(spec: SrAttentionSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="sr_attention")
    require_no_prefix(x, op="sr_attention")
    out = x if out_dim is None else x.with_channels(out_dim)
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, out.channels)
    if spec.reduction == "conv" and (x.height % spec.sr_ratio or x.width % spec.sr_ratio):
        raise ShapeIssue("sr_ratio", f"{spec.sr_ratio} does not divide the {x.height}x{x.width} feature map")
    small = reduced(spec, x)
    if small is not None:
        require_groups(spec.groups, input=x.channels)
        check_norm(spec.norm, small, "norm")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_sr_attention(spec: SrAttentionSpec, r: Resolved) -> SrAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    small = reduced(spec, x)
    norm = build_norm(spec.norm, small) if small is not None else nn.Identity()
    return SrAttention(x.channels, num_heads=num_heads, head_dim=head_dim, sr_ratio=spec.sr_ratio,
                       pool_size=spec.pool_size if spec.reduction == "pool" else None, norm=norm,
                       qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                       groups=spec.groups, out_dim=r.out_type.channels)


def fold_sr_attention(module: nn.Module) -> Folding | None:
    """q reads the input, and so does kv or the reduction conv (kernel = stride, no padding: a shift folds
    exactly), but not through a pooling (PVTv2-li); the reduction's norm folds into kv where no activation
    comes between."""
    if not isinstance(module, SrAttention):
        return None
    reduce = module.kv if module.sr is None else module.sr if isinstance(module.pool, nn.Identity) else None
    return Folding(reads=(module.q, reduce) if reduce is not None else (), writes=module.proj,
                   deploy=lambda: fold_parts(module, ("norm", "act", "kv")))


SR_ATTENTION = OpDef(
    SrAttentionSpec,
    infer=sr_attention_shape,
    build=_build_sr_attention,
    preserves_type=True,
    fold=fold_sr_attention,
    cases=(
        Case({"sr_ratio": 2, "head_dim": 8}, TensorType("tokens", 16, 4, 6)),
        Case({}, TensorType("tokens", 64, 3, 3), id="no-reduction"),
        Case({"reduction": "pool", "pool_size": 2, "num_heads": 2, "fused": False}, TensorType("tokens", 16, 4, 4),
             id="pvt-li"),
        Case({"sr_ratio": 2, "num_heads": 1, "norm": None}, TensorType("tokens", 8, 4, 4), id="no-norm"),
        Case({"sr_ratio": 2, "head_dim": 8, "groups": 4}, TensorType("tokens", 16, 4, 4), id="grouped"),
    ),
)
