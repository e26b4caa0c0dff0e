"""Bi-level routing attention (BiFormer, Zhu et al., CVPR 2023, arXiv 2303.08810; the authors'
``ops/bra_legacy.py``, ``BiLevelRoutingAttention`` with ``kv_downsample_mode='identity'``).

The token grid is cut into ``regions`` x ``regions`` regions. Region-level queries and keys (the mean of the
region's queries and keys) give a region affinity matrix; every region keeps its ``topk`` most affine regions, and
each of its tokens attends to the tokens of those regions alone (gathered per region, one batched attention). A
depthwise conv of the value map (LCE, the authors' ``lepe``) is added to the output before the projection.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, head_dim_field, resolve_heads
from metaformer_lab.ops.common import OddKernel, PosInt, require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix
from metaformer_lab.ops.sr_attention import ScaleWidth


class RoutingAttentionSpec(GridOpSpec):
    """Bi-level routing attention: each of S x S regions attends to the tokens of its top-k regions, routed by
    region-mean queries and keys, plus a depthwise conv of the values (BiFormer's ``BiLevelRoutingAttention``).

    The routing is hard (the chosen regions' keys and values as they are) and carries no gradient unless
    ``soft_routing`` scales the gathered keys and values by the routing softmax (``diff_routing``: with gradient
    into q and k; ``param_routing``: a Linear on the region queries and keys first). Keys and values are not
    down-sampled (the authors' ``kv_downsample_mode: identity``, the one their models use).
    """

    type: Literal["routing_attention"] = "routing_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC + " (of the q/k width)")
    head_dim: PosInt | None = head_dim_field(32)
    regions: PosInt = Field(7, description="regions per side (the authors' n_win): S x S regions; S must divide H "
                                           "and W (or auto_pad)")
    topk: PosInt = Field(4, description="regions each region attends to, at most S²")
    qk_dim: PosInt | None = Field(None, description="width of q and k (the authors' qk_dim); null: the input width")
    qkv_bias: bool = True
    local_conv: OddKernel | None = Field(5, description="kernel of the depthwise conv of the value map added to the "
                                                        "output (the authors' side_dwconv, LCE); null: none")
    scale_width: ScaleWidth = Field(
        "inner", description="softmax scale 1/sqrt(width), for routing and attention alike: of all heads' q "
                             "width together, qk_dim (the authors' code), or of one head")
    soft_routing: bool = Field(False, description="scale the gathered keys and values by the softmax of their "
                                                  "region logits")
    diff_routing: bool = Field(False, description="soft routing with gradient into the region queries and keys "
                                                  "(false: detached, as the authors' default)")
    param_routing: bool = Field(False, description="a Linear (qk_dim -> qk_dim) on the region queries and keys "
                                                   "(the authors' router.emb); needs diff_routing and soft_routing")
    auto_pad: bool = Field(False, description="zero-pad the grid at the bottom and right to a multiple of S, crop "
                                              "the output (the authors' auto_pad)")
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


def _padded(size: int, regions: int) -> int:
    return -(-size // regions) * regions


def routing_attention_shape(spec: RoutingAttentionSpec, x: TensorType,
                            out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", "maps", op="routing_attention")
    require_no_prefix(x, op="routing_attention")
    if out_dim is not None and out_dim != x.channels:
        raise ShapeIssue("type", f"keeps its width {x.channels}; it cannot give {out_dim}")
    qk_dim = spec.qk_dim or x.channels
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, qk_dim)
    if num_heads * head_dim != qk_dim:
        raise ShapeIssue("head_dim", f"{num_heads} heads of {head_dim} do not make qk_dim {qk_dim}")
    if x.channels % num_heads:
        raise ShapeIssue("num_heads", f"{num_heads} heads do not divide the value width {x.channels}")
    S = spec.regions
    if not spec.auto_pad and (x.height % S or x.width % S):
        raise ShapeIssue("regions", f"{S} does not divide the {x.height}x{x.width} feature map (or set auto_pad)")
    if x.height < S or x.width < S:
        raise ShapeIssue("regions", f"{S} regions per side are more than the {x.height}x{x.width} feature map has "
                                    "rows or columns")
    if spec.topk > S * S:
        raise ShapeIssue("topk", f"{spec.topk} is more than the {S * S} regions")
    if spec.diff_routing and not spec.soft_routing:
        raise ShapeIssue("diff_routing", "only hard routing without gradient exists; set soft_routing: true")
    if spec.param_routing and not spec.diff_routing:
        raise ShapeIssue("param_routing", "its Linear learns through the routing weights; set diff_routing: true")
    return x, {"num_heads": num_heads, "head_dim": head_dim}


class RoutingAttention(nn.Module):
    """Parameter names follow the authors' ``BiLevelRoutingAttention``: ``qkv`` (their ``qkv.qkv``: q, then k,
    then v), ``lepe``, ``wo``, ``emb`` (their ``router.emb``). Input (B, H, W, C), or (B, C, H, W) with ``maps``."""

    def __init__(self, dim: int, qk_dim: int, num_heads: int, regions: int, topk: int, qkv_bias: bool,
                 local_conv: int | None, scale: float, soft_routing: bool, diff_routing: bool,
                 param_routing: bool, auto_pad: bool, fused: bool, maps: bool) -> None:
        super().__init__()
        self.dim, self.qk_dim, self.num_heads = dim, qk_dim, num_heads
        self.regions, self.topk, self.scale = regions, topk, scale
        self.soft_routing, self.diff_routing, self.auto_pad = soft_routing, diff_routing, auto_pad
        self.fused, self.maps = fused, maps
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias)
        self.lepe = None if local_conv is None else nn.Conv2d(dim, dim, local_conv, padding=local_conv // 2,
                                                              groups=dim)
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else None
        self.wo = nn.Linear(dim, dim)

    def route(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S², n, qk) queries and keys -> (B, S², topk) region indices and their routing softmax."""
        q_win, k_win = q.mean(2), k.mean(2)  # (B, S², qk)
        if not self.diff_routing:
            q_win, k_win = q_win.detach(), k_win.detach()
        if self.emb is not None:
            q_win, k_win = self.emb(q_win), self.emb(k_win)
        logits = (q_win * self.scale) @ k_win.transpose(-2, -1)  # (B, S², S²)
        top, index = torch.topk(logits, k=self.topk, dim=-1)  # (B, S², topk)
        return index, top.softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if self.maps:
            x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        B, H, W, _ = x.shape
        S = self.regions
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, _padded(W, S) - W, 0, _padded(H, S) - H))
        Hp, Wp = x.shape[1], x.shape[2]
        h, w = Hp // S, Wp // S
        m, R, n, qk = self.num_heads, S * S, h * w, self.qk_dim
        w_qkv, b_qkv = self.qkv.weight, self.qkv.bias  # q rows, then k and v: two contiguous outputs
        q = F.linear(x, w_qkv[:qk], None if b_qkv is None else b_qkv[:qk])  # (B, Hp, Wp, qk)
        kv = F.linear(x, w_qkv[qk:], None if b_qkv is None else b_qkv[qk:])  # (B, Hp, Wp, qk + C)
        values = kv[..., qk:]
        # regions: (B, S, h, S, w, c) -> (B*S², h*w, c), region index row-major as the authors' (j i)
        q, kv = (t.view(B, S, h, S, w, -1).transpose(2, 3).reshape(B * R, n, -1) for t in (q, kv))
        index, weight = self.route(q.view(B, R, n, -1), kv[..., :qk].view(B, R, n, -1))
        index = (index + torch.arange(B, device=x.device).view(B, 1, 1) * R).flatten()  # rows of kv
        kv = kv.index_select(0, index)  # (B*S²*topk, h*w, qk + C): each region's chosen regions
        if self.soft_routing:
            kv = kv * weight.reshape(-1, 1, 1)
        kv = kv.view(B * R, self.topk * n, -1)  # (B*S², topk*h*w, qk + C)
        q = q.unflatten(-1, (m, -1)).transpose(1, 2)  # (B*S², m, h*w, dqk)
        k = kv[..., :qk].unflatten(-1, (m, -1)).transpose(1, 2)  # (B*S², m, topk*h*w, dqk)
        v = kv[..., qk:].unflatten(-1, (m, -1)).transpose(1, 2)  # (B*S², m, topk*h*w, dv)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            y = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # (B*S², m, h*w, dv)
        y = y.transpose(1, 2).reshape(B, S, S, h, w, self.dim)  # channels head-major
        y = y.transpose(2, 3).reshape(B, Hp, Wp, self.dim)
        if self.lepe is not None:
            y = y + self.lepe(values.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # through (B, C, Hp, Wp)
        y = self.wo(y)
        if Hp != H or Wp != W:
            y = y[:, :H, :W].contiguous()
        return y.permute(0, 3, 1, 2) if self.maps else y


def _build_routing_attention(spec: RoutingAttentionSpec, r: Resolved) -> RoutingAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    qk_dim = num_heads * head_dim
    return RoutingAttention(x.channels, qk_dim=qk_dim, num_heads=num_heads, regions=spec.regions, topk=spec.topk,
                            qkv_bias=spec.qkv_bias, local_conv=spec.local_conv,
                            scale=(qk_dim if spec.scale_width == "inner" else head_dim) ** -0.5,
                            soft_routing=spec.soft_routing, diff_routing=spec.diff_routing,
                            param_routing=spec.param_routing, auto_pad=spec.auto_pad, fused=spec.fused,
                            maps=x.layout == "maps")


def fold_routing_attention(module: nn.Module) -> Folding | None:
    """Regions move tokens, never channels: qkv reads the input (the routing and the value conv read its output),
    wo writes the output. With auto_pad the padded zeros would not stay zero under a folded norm: no reads."""
    if isinstance(module, RoutingAttention):
        return Folding(reads=() if module.auto_pad else (module.qkv,), writes=module.wo)
    return None


ROUTING_ATTENTION = around_prefix(OpDef(
    RoutingAttentionSpec,
    infer=routing_attention_shape,
    build=_build_routing_attention,
    preserves_type=True,
    fold=fold_routing_attention,
    cases=(
        Case({"regions": 2, "topk": 2, "head_dim": 8}, TensorType("tokens", 16, 4, 6)),
        Case({"regions": 2, "topk": 1, "num_heads": 2, "local_conv": 3, "fused": False},
             TensorType("maps", 16, 4, 4), id="maps-explicit"),
        Case({"regions": 3, "topk": 4, "num_heads": 2, "qk_dim": 8, "local_conv": None, "qkv_bias": False,
              "scale_width": "head"}, TensorType("tokens", 16, 6, 3), id="narrow-qk"),
        Case({"regions": 2, "topk": 3, "num_heads": 2, "soft_routing": True, "diff_routing": True,
              "param_routing": True}, TensorType("tokens", 16, 4, 4), id="soft-param-routing"),
        Case({"regions": 2, "topk": 2, "num_heads": 2, "auto_pad": True}, TensorType("tokens", 16, 5, 3),
             id="auto-pad"),
        Case({"regions": 2, "topk": 2, "head_dim": 8, "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
             id="prefix-pass"),
    ),
))
