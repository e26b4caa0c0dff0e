"""Multi-scale dilated attention (MSDA): DilateFormer (Jiao et al., "DilateFormer: Multi-Scale Dilated Transformer
for Visual Recognition", IEEE TMM 2023, arXiv 2302.01791).

The heads split evenly into one group per dilation rate. Each query attends to the ``kernel`` x ``kernel``
neighbourhood centred on it, sampled ``dilation`` tokens apart (a sliding window, not a partition): one softmax
over those ``kernel²`` keys. Near the border the neighbourhood reaches outside the grid; as in the authors'
``nn.Unfold`` (zero padding of the projected keys and values), those positions stay in the softmax as zero keys
(logit 0) with zero values. The groups' outputs are concatenated and projected.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, head_dim_field, resolve_heads
from metaformer_lab.ops.common import OddKernel, PosInt, Prob, require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class DilatedAttentionSpec(GridOpSpec):
    """Multi-scale dilated attention: each head group's queries attend to the ``kernel`` x ``kernel`` neighbourhood
    around them sampled at the group's dilation (DilateFormer's ``MultiDilatelocalAttention``).

    One 1x1-conv qkv (the authors' ``qkv``: [q | k | v], each split into dilation groups, then heads), one Linear
    ``proj``. Keys outside the grid are zero (zero padding, as the authors' ``nn.Unfold``) and stay in the softmax.
    """

    type: Literal["dilated_attention"] = "dilated_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC + "; a multiple of the number of dilations")
    head_dim: PosInt | None = head_dim_field(32)
    kernel: OddKernel = Field(3, description="side of each query's neighbourhood (odd: centred on the query)")
    dilations: list[PosInt] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, max_length=8,
        description="one dilation rate per head group (the heads split evenly, in order); the dilated "
                    "neighbourhood, dilation * (kernel - 1) + 1 tokens wide, must fit in H and W")
    qkv_bias: bool = Field(True, description="bias of the qkv conv (DilateFormer: true)")
    proj_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0


class DilatedAttention(nn.Module):
    """Parameter names follow the authors' ``MultiDilatelocalAttention`` (``qkv``: a 1x1 Conv2d, ``proj``: a Linear),
    so their state_dict loads as it is. Takes maps (B, C, H, W) or tokens (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, kernel: int, dilations: list[int], qkv_bias: bool,
                 proj_bias: bool, attn_drop: float, proj_drop: float, channels_last: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.kernel = num_heads, head_dim, kernel
        self.dilations = tuple(dilations)
        self.channels_last = channels_last
        self.scale = head_dim**-0.5
        inner = num_heads * head_dim
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, dilation: int) -> Tensor:
        """One group: q, k, v (B, heads*d, H, W) -> (B, heads*d, H*W), each query over its dilated neighbourhood."""
        B, width, H, W = q.shape
        kernel, d = self.kernel, self.head_dim
        pad, span = dilation * (kernel - 1) // 2, dilation * (kernel - 1) + 1

        def neighbours(t: Tensor) -> Tensor:  # (B, heads*d, H, W) -> a (B, heads, d, kernel, kernel, H, W) view
            t = F.pad(t, (pad, pad, pad, pad)).unflatten(1, (-1, d))  # zeros outside the grid
            windows = t.unfold(3, span, 1).unfold(4, span, 1)[..., ::dilation, ::dilation]  # (B, h, d, H, W, k, k)
            return windows.permute(0, 1, 2, 5, 6, 3, 4)

        keys, values = neighbours(k), neighbours(v)
        logits = (q.reshape(B, -1, d, 1, 1, H, W) * keys).sum(2, keepdim=True) * self.scale  # (B, h, 1, k, k, H, W)
        weights = self.attn_drop(logits.flatten(3, 4).softmax(dim=3)).unflatten(3, (kernel, kernel))
        return (weights * values).sum((3, 4)).reshape(B, width, H * W)  # (B, h, d, H, W) -> (B, h*d, N)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # the 1x1 conv as a Linear on (B, H, W, C), then contiguous maps for the unfolds
            H, W = x.shape[1:3]
            qkv = F.linear(x, self.qkv.weight.flatten(1), self.qkv.bias).permute(0, 3, 1, 2).contiguous()
        else:
            H, W = x.shape[2:]
            qkv = self.qkv(x)
        q, k, v = qkv.chunk(3, dim=1)  # 3 x (B, heads*d, H, W)
        group = q.shape[1] // len(self.dilations)
        y = torch.cat([self._attend(q[:, i * group:(i + 1) * group], k[:, i * group:(i + 1) * group],
                                    v[:, i * group:(i + 1) * group], dilation)
                       for i, dilation in enumerate(self.dilations)], dim=1)  # (B, heads*d, N)
        y = self.proj_drop(self.proj(y.transpose(1, 2)))  # (B, N, C)
        return y.unflatten(1, (H, W)) if self.channels_last else y.transpose(1, 2).unflatten(2, (H, W))


def dilated_attention_shape(spec: DilatedAttentionSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType,
                                                                                                       Settings]:
    require_layout(x, "maps", "tokens", op="dilated_attention")
    require_no_prefix(x, op="dilated_attention")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    groups = len(spec.dilations)
    if num_heads % groups:
        raise ShapeIssue("dilations", f"{groups} dilation groups do not split the {num_heads} heads evenly")
    for dilation in spec.dilations:
        span = dilation * (spec.kernel - 1) + 1
        if span > min(x.height, x.width):
            raise ShapeIssue("dilations", f"dilation {dilation} spreads the {spec.kernel}x{spec.kernel} neighbourhood "
                                          f"over {span} tokens, more than the {x.height}x{x.width} grid")
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build_dilated_attention(spec: DilatedAttentionSpec, r: Resolved) -> DilatedAttention:
    x = r.in_type
    return DilatedAttention(x.channels, num_heads=r["num_heads"], head_dim=r["head_dim"], kernel=spec.kernel,
                            dilations=spec.dilations, qkv_bias=spec.qkv_bias, proj_bias=spec.proj_bias,
                            attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, channels_last=x.layout == "tokens")


def fold_dilated_attention(module: nn.Module) -> Folding | None:
    """qkv reads the input (the zero padding comes after it), proj writes the output."""
    if isinstance(module, DilatedAttention):
        return Folding(reads=(module.qkv,), writes=module.proj)
    return None


DILATED_ATTENTION = around_prefix(OpDef(
    DilatedAttentionSpec,
    infer=dilated_attention_shape,
    build=_build_dilated_attention,
    preserves_type=True,
    fold=fold_dilated_attention,
    cases=(
        Case({"num_heads": 3}, TensorType("tokens", 24, 7, 8)),
        Case({"num_heads": 4, "dilations": [1, 2], "qkv_bias": False, "proj_bias": False, "attn_drop": 0.1},
             TensorType("maps", 16, 5, 6), id="maps-two-rates"),
        Case({"head_dim": 4, "kernel": 5, "dilations": [1]}, TensorType("tokens", 8, 6, 5), id="kernel5-one-rate"),
        Case({"num_heads": 2, "head_dim": 6, "dilations": [2, 1]}, TensorType("maps", 8, 5, 5), id="inner-width"),
        Case({"num_heads": 3, "prefix": "pass"}, TensorType("tokens", 12, 7, 7, prefix=1), id="prefix-pass"),
    ),
))
