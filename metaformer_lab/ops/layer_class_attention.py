"""Layer-wise class-token attention (Yuan et al., "Incorporating Convolution Designs into Visual Transformers",
CeiT, ICCV 2021): a head that sees the class token of every block of the last stage (a stage with
``collect_prefix``), adds a learned per-layer embedding, runs one class-attention block whose query is the last
block's token (keys and values: all of them), then a norm and the classifier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import HeadsSpec, resolve_heads
from metaformer_lab.ops.class_attention import ClassAttention
from metaformer_lab.ops.common import Act, Prob, Ratio, act_layer, require_layout
from metaformer_lab.ops.heads import Head
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm

_COLLECTED = TensorType("tokens", 16, 3, 4, prefix=6)


class LayerClassAttentionSpec(HeadsSpec):
    """The input's prefix tokens (a collecting stage's: one per block) plus a learned per-token embedding; the
    last one attends to all of them (``x = last + attn(norm(tokens))``, ``x = x + mlp(norm(x))``, no drop path),
    then a norm, dropout and a Linear classifier (CeiT's ``lca`` block, ``norm`` and ``head``). The grid tokens
    are not read."""

    type: Literal["layer_class_attention"] = "layer_class_attention"
    qkv_bias: bool = True
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit, q scaled before q kᵀ")
    mlp_ratio: Ratio = 4.0
    act: Act = "gelu"
    norm: NormSpec = Field(default_factory=LayerNormSpec, description="the block's two norms and the final one")
    layer_embed: bool = Field(True, description="a learned embedding added to each prefix token (zeros at init)")
    drop: Prob = Field(0.0, description="dropout before the classifier")
    bias: bool = True


class LayerClassAttentionHead(Head):
    """(B, T + N, C) -> (B, num_classes): reads the T prefix tokens only."""

    def __init__(self, tokens: int, dim: int, layer_embed: bool, norms: tuple[nn.Module, nn.Module, nn.Module],
                 attn: ClassAttention, mlp: nn.Module, drop: float, fc: nn.Module) -> None:
        super().__init__()
        self.tokens = tokens
        self.layer_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if layer_embed else None
        self.norm1, self.attn = norms[0], attn
        self.norm2, self.mlp = norms[1], mlp
        self.norm, self.drop, self.fc = norms[2], nn.Dropout(drop), fc
        self.fc_bias = self._has_bias(fc)

    @property
    def classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        return self.fc

    def no_weight_decay(self) -> set[str]:
        return {"layer_embed"}

    def pre_logits(self, x: Tensor) -> Tensor:
        t = x[:, : self.tokens]  # (B, T, C)
        if self.layer_embed is not None:
            t = t + self.layer_embed
        last = t[:, -1:]  # (B, 1, C): the query
        # class attention reads its query from the front; keys and values are all T tokens (order does not matter)
        y = last + self.attn(self.norm1(torch.cat([last, t[:, :-1]], dim=1)))
        y = y + self.mlp(self.norm2(y))
        return self.drop(self.norm(y[:, 0]))

    def reset(self, num_classes: int, global_pool: str | None = None, *, in_features: int,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"a layer_class_attention head reads its prefix tokens: global_pool must be 'token' or "
                             f"None, not {global_pool!r}")
        self.fc = self._linear(in_features, num_classes, self.fc_bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, T + N, C) -> (B, num_classes)
        return self.fc(self.pre_logits(x))


def _shape(spec: LayerClassAttentionSpec, x: TensorType, num_classes: int) -> TensorType:
    require_layout(x, "tokens", op="layer_class_attention")
    if not x.prefix:
        raise ShapeIssue("type", "layer_class_attention reads prefix tokens (a stage with collect_prefix: every "
                                 "block's class token); the input has none")
    resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    check_norm(spec.norm, x.with_grid(0, 0), "norm")
    return TensorType("vector", num_classes or x.channels)


def _build(spec: LayerClassAttentionSpec, r: Resolved) -> nn.Module:
    from timm.layers import Mlp

    x, num_classes = r.in_type, r.out_dim
    dim = x.channels
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, dim)
    tokens = x.with_grid(0, 0)
    norms = (build_norm(spec.norm, tokens), build_norm(spec.norm, tokens.with_prefix(1)),
             build_norm(spec.norm, TensorType("vector", dim)))
    attn = ClassAttention(dim, num_heads, head_dim, 1, spec.qkv_bias, spec.proj_bias, spec.attn_drop, spec.proj_drop,
                          spec.fused)
    mlp = Mlp(dim, int(dim * spec.mlp_ratio), act_layer=act_layer(spec.act))
    fc = nn.Linear(dim, num_classes, bias=spec.bias) if num_classes else nn.Identity()
    return LayerClassAttentionHead(x.prefix, dim, spec.layer_embed, norms, attn, mlp, spec.drop, fc)


LAYER_CLASS_ATTENTION = OpDef(LayerClassAttentionSpec, _shape, _build,
                              cases=(Case({"num_heads": 2, "head_dim": None}, _COLLECTED, 10),
                                     Case({"layer_embed": False, "fused": False, "qkv_bias": False, "head_dim": 8},
                                          _COLLECTED, 0, id="features")))
