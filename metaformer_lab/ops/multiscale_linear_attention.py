"""Multi-scale linear attention (Cai et al., "EfficientViT: Multi-Scale Linear Attention for High-Resolution
Dense Prediction", ICCV 2023): ReLU linear attention whose q, k, v come at several scales, the 1x1 qkv
output plus depthwise-kxk + grouped-1x1 aggregations of it, each scale attending on its own heads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, head_dim_field, resolve_heads
from metaformer_lab.ops.common import Eps, OddKernel, OpSpec, PosInt, require_layout
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.linear_attention import FeatureMap, _float32
from metaformer_lab.ops.norms import BatchNormSpec, NormSpec, build_norm, check_norm


class MultiScaleLinearAttentionSpec(OpSpec):
    """EfficientViT's lightweight multi-scale linear attention on maps (timm ``efficientvit_mit.LiteMLA``):
    ``phi(q) (phi(k)ᵀ [v, 1])``, normalised by its last column, for the qkv of every scale; the scales'
    outputs are concatenated and projected back (1x1 conv + norm)."""

    type: Literal["multiscale_linear_attention"] = "multiscale_linear_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(8)
    scales: list[OddKernel] = Field(default_factory=lambda: [5], max_length=4,
                                    description="kernels of the depthwise aggregations; each adds a scale")
    feature_map: FeatureMap = Field("relu", description="phi: relu (EfficientViT) or elu(x) + 1")
    qkv_bias: bool = Field(False, description="bias of the qkv conv and the aggregation convs")
    proj_bias: bool = False
    norm: NormSpec | None = Field(default_factory=BatchNormSpec, description="norm after the projection")
    eps: Eps = Field(1e-5, description="added to the normaliser (timm's LiteMLA: 1e-5)")


class ScaleAggregation(nn.Module):
    """Depthwise kxk then a 1x1 conv grouped by head (q, k and v of each head stay apart)."""

    def __init__(self, channels: int, kernel: int, groups: int, bias: bool) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)
        self.pw = nn.Conv2d(channels, channels, 1, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3*inner, H, W) -> same
        return self.pw(self.dw(x))


class MultiScaleLinearAttention(nn.Module):
    """(B, C, H, W) -> (B, C, H, W). Parameter names: qkv, aggregate.i.{dw,pw}, proj, norm."""

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, scales: list[int], feature_map: FeatureMap,
                 qkv_bias: bool, proj_bias: bool, norm: nn.Module, eps: float) -> None:
        super().__init__()
        self.head_dim, self.eps, self.elu = head_dim, eps, feature_map == "elu"
        inner = num_heads * head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=qkv_bias)
        self.aggregate = nn.ModuleList([ScaleAggregation(3 * inner, k, 3 * num_heads, qkv_bias) for k in scales])
        self.proj = nn.Conv2d(inner * (1 + len(scales)), dim, 1, bias=proj_bias)
        self.norm = norm

    def phi(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0 if self.elu else F.relu(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(..., N, d) -> (..., N, d) in float32, in timm's order: ``q (kᵀ [v, 1])``, then the last column
        (``phi(q) · sum phi(k)``) divides the rest."""
        dtype = v.dtype
        q, k = self.phi(q), self.phi(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)  # (..., N, d + 1)
        with _float32(v.device):
            q, k, v = q.float(), k.float(), v.float()
            y = q @ (k.transpose(-1, -2) @ v)  # (..., d, d + 1) -> (..., N, d + 1)
            y = y[..., :-1] / (y[..., -1:] + self.eps)  # (..., N, d)
        return y.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)  # (B, 3*inner, H, W)
        qkv = torch.cat([qkv, *(agg(qkv) for agg in self.aggregate)], dim=1)  # (B, S*3*inner, H, W)
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W).transpose(-1, -2)  # (B, S*heads, N, 3d)
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, S*heads, N, d)
        y = self.attend(q, k, v)  # (B, S*heads, N, d)
        y = y.transpose(-1, -2).reshape(B, -1, H, W)  # (B, S*heads, d, N) -> (B, S*inner, H, W)
        return self.norm(self.proj(y))


def multiscale_linear_attention_shape(spec: MultiScaleLinearAttentionSpec, x: TensorType,
                                      out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", op="multiscale_linear_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    check_norm(spec.norm, x, "norm")
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build(spec: MultiScaleLinearAttentionSpec, r: Resolved) -> MultiScaleLinearAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return MultiScaleLinearAttention(dim=x.channels, num_heads=num_heads, head_dim=head_dim, scales=list(spec.scales),
                                     feature_map=spec.feature_map, qkv_bias=spec.qkv_bias, proj_bias=spec.proj_bias,
                                     norm=build_norm(spec.norm, x), eps=spec.eps)


def fold_multiscale_linear_attention(module: nn.Module) -> Folding | None:
    """qkv reads the input; the BatchNorm after proj folds into it, which then writes the output."""
    if isinstance(module, MultiScaleLinearAttention):
        writes = module.proj if isinstance(module.norm, nn.Identity) else None
        return Folding(reads=(module.qkv,), writes=writes, deploy=lambda: fold_parts(module, ("proj", "norm")))
    return None


MULTISCALE_LINEAR_ATTENTION = OpDef(
    MultiScaleLinearAttentionSpec,
    infer=multiscale_linear_attention_shape,
    build=_build,
    preserves_type=True,
    fold=fold_multiscale_linear_attention,
    cases=(
        Case({}, TensorType("maps", 16, 5, 6)),
        Case({"head_dim": 4, "scales": [3, 5], "qkv_bias": True, "proj_bias": True, "norm": None},
             TensorType("maps", 16, 4, 4), id="two-scales"),
        Case({"num_heads": 2, "scales": [], "feature_map": "elu"}, TensorType("maps", 16, 3, 5), id="single-scale"),
    ),
)
