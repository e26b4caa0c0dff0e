"""Global multi-head self-attention (Vaswani et al. 2017; ViT, Dosovitskiy et al. 2021; CAFormer's
attention, Yu et al. "MetaFormer Baselines for Vision", 2022).

Also home of what the other attention files share: the ``num_heads`` / ``head_dim`` fields and their
resolution, :func:`attend` (softmax attention, fused or explicit) and :class:`SequenceMixer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    OddKernel,
    OpSpec,
    PosInt,
    Prob,
    Ratio,
    conv_on_heads,
    require_layout,
    require_no_prefix,
)
from metaformer_lab.ops.folds import fold_parts

ScaleOrder = Literal["before", "after"]
QkvLayout = Literal["qkv_heads", "heads_qkv"]

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


def grid_attention_heads(spec: Any, x: TensorType, out_dim: int | None, op: str) -> tuple[TensorType, int, int]:
    """The output type and (num_heads, head_dim) of an attention op that sees the token grid alone (windows,
    neighbourhoods, agents): tokens without prefix tokens, ``out_dim`` wide if asked, heads from the spec's
    ``num_heads`` / ``head_dim``."""
    require_layout(x, "tokens", op=op)
    require_no_prefix(x, op=op)
    out = x if out_dim is None else x.with_channels(out_dim)
    return (out, *resolve_heads(spec.num_heads, spec.head_dim, out.channels))


def attend(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, drop: nn.Dropout, fused: bool,
           scale_order: ScaleOrder = "before", post: Callable[[Tensor], Tensor] | None = None,
           scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ / sqrt(d) + bias) v`` over (..., N, d) queries and (..., M, d) keys and values; ``scale``
    replaces ``1 / sqrt(d)`` (CvT scales by the width of all heads together).

    ``fused`` calls ``F.scaled_dot_product_attention``; otherwise the attention matrix is explicit, and
    ``scale_order`` says where the scale goes: timm's ViT scales q before ``q @ kᵀ``, timm's MetaFormer
    scales the product after. The two round differently; the order matters for exact parity. ``post``
    (explicit path only) transforms the attention weights after the softmax and dropout, before they meet v.
    """
    p = drop.p if drop.training else 0.0
    if bias is not None:
        bias = bias.to(q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    before = scale_order == "before"
    attn = (q * scale) @ k.transpose(-2, -1) if before else (q @ k.transpose(-2, -1)) * scale  # (..., N, M)
    if bias is not None:
        attn = attn + bias
    weights = drop(attn.softmax(dim=-1))
    if post is not None:
        weights = post(weights)
    return weights @ v  # (..., N, d)


class SequenceMixer(nn.Module):
    """Runs :meth:`mix` on a (B, N, C) sequence for maps (B, C, H, W) and tokens (B, H, W, C) or
    (B, P + H*W, C); the output comes back in the input's layout (its width may differ: ``out_dim``)."""

    def __init__(self, maps: bool) -> None:
        super().__init__()
        self.maps = maps

    def mix(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.maps:
            y = self.mix(x.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, H*W, C')
            return y.transpose(1, 2).unflatten(2, x.shape[2:])  # (B, H*W, C') -> (B, C', H, W)
        # (B, H, W, C) or (B, N, C) -> (B, N, C') -> back; unflatten, not reshape(*x.shape[:-1], -1): torch.fx cannot
        # unpack a traced shape
        return self.mix(x.flatten(1, -2)).unflatten(1, x.shape[1:-1])


class HeadsSpec(OpSpec):
    """The fields the softmax multi-head attention ops share; each op adds its ``type`` tag and the rest."""

    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    qkv_bias: bool = False
    proj_bias: bool = Field(True, description="bias of the output projection (timm's MetaFormer attention has none)")
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0


class AttentionSpec(HeadsSpec):
    """Multi-head self-attention over all tokens, prefix tokens included (timm ``layers.Attention``,
    timm ``metaformer.Attention``)."""

    type: Literal["attention"] = "attention"
    qk_norm: bool = Field(False, description="LayerNorm (eps 1e-6) over head_dim on q and k, as timm's ViT")
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    scale_order: ScaleOrder = Field(
        "before", description="explicit path only: scale q before q kᵀ (timm ViT) or the product after (MetaFormer)")
    attn_ratio: Ratio = Field(1.0, description="value width per head = int(attn_ratio * head_dim); q and k keep "
                                               "head_dim (LeViT, EfficientFormer: 4)")
    qkv_layout: QkvLayout = Field(
        "qkv_heads", description="channel order of the qkv projection: qkv_heads = [q | k | v], each split into "
                                 "heads (ViT); heads_qkv = per head [q | k | v] (LeViT, EfficientFormer)")
    attention_bias: bool = Field(
        False, description="learned bias per head and grid offset (|dy|, |dx|) added to the attention logits "
                           "(LeViT's attention_biases); ties the op to its grid size, no prefix tokens")
    local_conv: OddKernel | None = Field(
        None, description="kernel of a depthwise conv of the value map, added to the attention output (LePE: "
                          "BiFormer, Agent attention); no prefix tokens; null: none")
    local_conv_input: bool = Field(
        False, description="the local conv reads the op's input instead of the values (BiFormer's AttentionLePE, "
                           "its last stage); the values' width must be the input's")
    reattention: bool = Field(
        False, description="DeepViT's re-attention: the softmaxed maps mixed across heads by a learned 1x1 conv "
                           "(heads x heads, with bias), then a BatchNorm over the heads; needs fused: false")
    reattention_scale: bool = Field(
        False, description="re-attention's maps times head_dim^-0.5 after the BatchNorm (DeepViT's "
                           "transform_scale, on in its DeepViT-S and -L)")

    key_optional = frozenset({"local_conv", "local_conv_input", "reattention", "reattention_scale"})


def offset_index(grid: tuple[int, int]) -> Tensor:
    """(N, N) index of the offset (|dy|, |dx|) between every two of the N = H*W grid positions, as
    ``|dy| * W + |dx|`` (timm's LeViT / EfficientFormer ``attention_bias_idxs``)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows, cols]).flatten(1)  # (2, N)
    offset = (pos[:, :, None] - pos[:, None, :]).abs()  # (2, N, N)
    return offset[0] * grid[1] + offset[1]


class Attention(SequenceMixer):
    """Parameter names follow timm's ViT ``Attention`` (qkv, q_norm, k_norm, proj), for the learned
    bias timm's LeViT/EfficientFormer attention (``attention_biases`` table, ``attention_bias_idxs``
    index: a persistent buffer, as in timm's state_dict), and for re-attention DeepViT's ``ReAttention``
    (``reatten_matrix``, ``var_norm``); the value conv is ``local_conv``."""

    attention_biases: nn.Parameter | None
    attention_bias_idxs: Tensor | None
    reatten_matrix: nn.Conv2d | None

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool,
                 attn_drop: float, proj_drop: float, fused: bool, scale_order: ScaleOrder, maps: bool,
                 value_dim: int | None = None, qkv_layout: QkvLayout = "qkv_heads",
                 bias_grid: tuple[int, int] | None = None, local_conv: int | None = None,
                 grid: tuple[int, int] | None = None, out_dim: int | None = None,
                 reattention: bool = False, reattention_scale: float = 1.0, local_conv_input: bool = False) -> None:
        super().__init__(maps)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.fused, self.scale_order, self.qkv_layout = fused, scale_order, qkv_layout
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 2 * inner + num_heads * self.value_dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * self.value_dim, out_dim or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        values = num_heads * self.value_dim
        self.grid, self.local_conv_input = grid, local_conv_input
        self.local_conv = None if local_conv is None else nn.Conv2d(values, values, local_conv,
                                                                    padding=local_conv // 2, groups=values)
        if bias_grid is not None:
            self.attention_biases = nn.Parameter(torch.zeros(num_heads, bias_grid[0] * bias_grid[1]))
            self.register_buffer("attention_bias_idxs", offset_index(bias_grid), persistent=True)
        else:
            self.register_parameter("attention_biases", None)
            self.attention_bias_idxs = None
        # re-attention: (B, heads, N, N) maps as a heads-channel image, mixed by a 1x1 conv and batch-normalised
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1) if reattention else None
        self.var_norm = nn.BatchNorm2d(num_heads) if reattention else nn.Identity()
        self.reattention_scale = reattention_scale

    def init_weights(self) -> None:
        """DeepViT leaves ``reatten_matrix`` at PyTorch's default init (its ViT init touches Linear layers only)."""
        if self.reatten_matrix is not None:
            self.reatten_matrix.reset_parameters()

    def reattend(self, weights: Tensor) -> Tensor:  # (B, heads, N, N) -> (B, heads, N, N)
        weights = self.var_norm(self.reatten_matrix(weights))  # type: ignore[misc]
        return weights * self.reattention_scale if self.reattention_scale != 1.0 else weights

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay (timm's EfficientFormer: ``attention_biases``)."""
        return set() if self.attention_biases is None else {"attention_biases"}

    def split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, 2*heads*d + heads*dv) -> q, k (B, heads, N, d) and v (B, heads, N, dv)."""
        H, d, dv = self.num_heads, self.head_dim, self.value_dim
        if self.qkv_layout == "heads_qkv":
            qkv = qkv.unflatten(-1, (H, 2 * d + dv)).transpose(1, 2)  # (B, heads, N, 2d + dv)
            q, k, v = qkv.split([d, d, dv], dim=-1)
            return q, k, v
        if dv == d:
            q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, heads, d) -> 3 x
            return q, k, v
        q, k, v = (t.unflatten(-1, (H, -1)).transpose(1, 2) for t in qkv.split([H * d, H * d, H * dv], dim=-1))
        return q, k, v  # (B, N, heads*d) -> (B, heads, N, d), same for v with dv

    def mix(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        q, k, v = self.split_qkv(self.qkv(x))  # (B, heads, N, d), v: (B, heads, N, dv)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if self.attention_biases is not None:
            bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        post = self.reattend if self.reatten_matrix is not None else None
        y = attend(q, k, v, bias=bias, drop=self.attn_drop, fused=self.fused, scale_order=self.scale_order, post=post)
        if self.local_conv is not None and self.grid is not None and not self.local_conv_input:
            y = y + conv_on_heads(self.local_conv, v, self.grid)  # LePE: (B, heads, N, dv)
        y = y.transpose(1, 2).flatten(2)  # (B, heads, N, dv) -> (B, N, heads*dv)
        if self.local_conv is not None and self.grid is not None and self.local_conv_input:
            y = y + self.local_conv(x.transpose(1, 2).unflatten(2, self.grid)).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.proj_drop(self.proj(y))


def attention_shape(spec: AttentionSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", "tokens", op="attention")
    out = x if out_dim is None else x.with_channels(out_dim)
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, out.channels)
    if int(spec.attn_ratio * head_dim) < 1:
        raise ShapeIssue("attn_ratio", f"{spec.attn_ratio} times head_dim {head_dim} leaves no value channel")
    for field in ("attention_bias", "local_conv"):
        if getattr(spec, field) and x.prefix:
            raise ShapeIssue(field, f"needs the token grid only, but the input has {x.prefix} prefix token(s)")
    if spec.local_conv_input and spec.local_conv is None:
        raise ShapeIssue("local_conv_input", "says what the local conv reads; set local_conv")
    if spec.local_conv_input and num_heads * int(spec.attn_ratio * head_dim) != x.channels:
        raise ShapeIssue("local_conv_input", f"the conv of the {x.channels}-wide input is added to the "
                                             f"{num_heads * int(spec.attn_ratio * head_dim)}-wide values")
    if spec.reattention_scale and not spec.reattention:
        raise ShapeIssue("reattention_scale", "scales re-attention's maps; set reattention: true")
    if spec.reattention and spec.fused:
        raise ShapeIssue("reattention", "mixes the attention maps, which the fused kernel never forms; set "
                                        "fused: false")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_attention(spec: AttentionSpec, r: Resolved) -> Attention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return Attention(x.channels, num_heads=num_heads, head_dim=head_dim, qkv_bias=spec.qkv_bias,
                     proj_bias=spec.proj_bias, qk_norm=spec.qk_norm, attn_drop=spec.attn_drop,
                     proj_drop=spec.proj_drop, fused=spec.fused, scale_order=spec.scale_order,
                     maps=x.layout == "maps", value_dim=int(spec.attn_ratio * head_dim), qkv_layout=spec.qkv_layout,
                     bias_grid=x.grid if spec.attention_bias else None, local_conv=spec.local_conv, grid=x.grid,
                     out_dim=r.out_type.channels, reattention=spec.reattention,
                     reattention_scale=head_dim**-0.5 if spec.reattention_scale else 1.0,
                     local_conv_input=spec.local_conv_input)


def fold_attention(module: nn.Module) -> Folding | None:
    """Attention reads its input with qkv alone and writes with proj: a norm before it folds into qkv, a layer
    scale after it into proj; re-attention's BatchNorm folds into its head-mixing conv."""
    if not isinstance(module, Attention):
        return None
    if module.local_conv_input:  # the padded conv reads the input too
        return Folding(reads=(), writes=module.proj)
    if module.reatten_matrix is None:
        return Folding(reads=(module.qkv,), writes=module.proj)
    return Folding(reads=(module.qkv,), writes=module.proj,
                   deploy=lambda: fold_parts(module, ("reatten_matrix", "var_norm")))


ATTENTION = OpDef(
    AttentionSpec,
    infer=attention_shape,
    build=_build_attention,
    preserves_type=True,
    fold=fold_attention,
    cases=(
        Case({}, TensorType("tokens", 64, 4, 5)),
        Case({"num_heads": 4, "qkv_bias": True, "qk_norm": True}, TensorType("tokens", 16, 3, 3, prefix=1),
             id="vit-prefixed"),
        Case({"num_heads": 2, "head_dim": 4, "fused": False, "scale_order": "after", "proj_bias": False},
             TensorType("maps", 16, 4, 5), id="maps-unfused"),
        Case({"num_heads": 2, "head_dim": 4, "attn_ratio": 2.0, "qkv_layout": "heads_qkv", "attention_bias": True,
              "qkv_bias": True, "fused": False, "scale_order": "after"}, TensorType("tokens", 16, 3, 4),
             id="levit-bias"),
        Case({"num_heads": 2, "attn_ratio": 0.5, "attention_bias": True}, TensorType("maps", 16, 4, 3),
             id="narrow-values-fused"),
        Case({"num_heads": 2, "attn_ratio": 2.0, "local_conv": 3}, TensorType("maps", 16, 3, 4), id="lepe"),
        Case({"head_dim": 8, "local_conv": 5, "fused": False}, TensorType("tokens", 16, 4, 4), id="lepe-tokens"),
        Case({"num_heads": 2, "local_conv": 3, "local_conv_input": True, "fused": False},
             TensorType("tokens", 16, 3, 4), id="lepe-input"),
        Case({"head_dim": 8, "local_conv": 5, "local_conv_input": True}, TensorType("maps", 16, 4, 4),
             id="lepe-input-maps"),
        Case({"num_heads": 4, "reattention": True, "fused": False, "scale_order": "after", "attn_drop": 0.1},
             TensorType("tokens", 16, 3, 3, prefix=1), id="reattention"),
        Case({"head_dim": 4, "reattention": True, "reattention_scale": True, "fused": False},
             TensorType("maps", 8, 3, 4), id="reattention-maps"),
    ),
)
