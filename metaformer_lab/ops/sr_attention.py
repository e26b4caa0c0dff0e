"""Spatial-reduction attention: PVT (Wang et al., 2021) and PVTv2 (Wang et al., 2022), also Twins' global
sub-sampled attention. Queries come from every grid token, keys and values from a reduced grid.

The reduction is also a depthwise conv (CMT, Guo et al. 2022; CvT's ``dw_bn`` projections, Wu et al. 2021, with
``q_conv``) or a bare average pool (LITv2's Lo-Fi, Pan et al. 2022); ``local_conv`` adds a depthwise conv of the
values (LePE: CSWin, Dong et al. 2022; Shunted, Ren et al. 2022); ``pos_bias`` adds a learned (heads, N, M) bias to
the logits of the N queries and M keys (CMT's ``relative_pos``, one table per stage). ``sr_ratios`` splits the
heads into groups, each with keys and values from its own reduction (Shunted self-attention, Ren et al. 2022).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, head_dim_field, resolve_heads
from metaformer_lab.ops.common import (
    Groups,
    OddKernel,
    OpSpec,
    PosInt,
    Prob,
    conv_on_heads,
    join_prefix,
    require_divides,
    require_grid,
    require_groups,
    require_layout,
    split_prefix,
)
from metaformer_lab.ops.folds import fold_parts
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm

Reduction = Literal["conv", "pool", "dwconv", "avgpool"]
LocalConvAdd = Literal["output", "value"]
ScaleWidth = Literal["head", "inner"]
PosBias = Literal["block", "stage"]


class SrAttentionSpec(OpSpec):
    """Attention with keys and values from a reduced grid (timm ``pvt_v2.Attention``; with ``reduction:
    conv`` also timm ``twins.GlobalSubSampleAttn``).

    ``conv``: a ``sr_ratio`` x ``sr_ratio`` strided conv then ``norm`` (no reduction when ``sr_ratio`` is 1).
    ``pool``: PVTv2-li's adaptive average pool to ``pool_size``, 1x1 conv, ``norm``, GELU, whatever
    ``sr_ratio`` says (timm ``linear_attn=True``).
    ``dwconv``: a depthwise conv of stride ``sr_ratio`` then ``norm`` (CMT: kernel = stride, BatchNorm; CvT's
    ``dw_bn``: 3x3, padding 1, BatchNorm, no bias, with ``q_conv`` and ``split_kv``).
    ``avgpool``: a ``sr_ratio`` x ``sr_ratio`` average pool of stride ``sr_ratio``, no conv, norm or activation
    (LITv2's Lo-Fi).
    Prefix tokens bypass the reduction and the convs, and join queries, keys and values (CvT's class token).
    ``sr_ratios``: Shunted's multi-scale heads, one conv reduction per head group (no prefix tokens).
    """

    type: Literal["sr_attention"] = "sr_attention"
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(64)
    sr_ratio: PosInt = Field(1, description="conv, avgpool: kernel and stride; dwconv: stride; must divide H and W")
    reduction: Reduction = Field("conv", description="pool: PVTv2-li, ignores sr_ratio; dwconv: CMT, CvT; "
                                                     "avgpool: LITv2's Lo-Fi")
    pool_size: PosInt = Field(7, description="pool reduction: side of the pooled grid")
    norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5, affine=True, bias=True),
                                  description="after the reduction conv and CvT's q and v convs (none after avgpool); "
                                              "PVTv2 uses nn.LayerNorm (eps 1e-5)")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    groups: Groups = Field(1, description="groups of the reduction conv (1: a full conv); must divide the width")
    kernel: OddKernel | None = Field(None, description="dwconv reduction: kernel, padding kernel // 2 (CvT: 3); "
                                                       "null: sr_ratio, no padding (CMT)")
    sr_bias: bool = Field(True, description="bias of the reduction conv (and of CvT's q and v convs); CvT's dw_bn has "
                                            "none")
    q_conv: bool = Field(False, description="dwconv reduction: q from its own depthwise conv (kernel, stride 1) "
                                            "and norm (CvT's conv_proj_q)")
    split_kv: bool = Field(False, description="dwconv reduction: k and v each from their own conv and norm (CvT's "
                                              "conv_proj_k, conv_proj_v); false: one reduction for both (CMT)")
    local_conv: OddKernel | None = Field(None, description="kernel of a depthwise conv of the value map (LePE, "
                                                           "Shunted's local_conv); null: none")
    local_conv_add: LocalConvAdd = Field(
        "output", description="local conv added to the attention output (CSWin, Shunted at sr_ratio 1; values "
                              "on the query grid) or to the values before attention (Shunted with a reduction)")
    scale_width: ScaleWidth = Field(
        "head", description="softmax scale 1/sqrt(width): of one head (timm), or of all heads together, "
                            "num_heads * head_dim (CvT's dim_out ** -0.5)")
    pos_bias: PosBias | None = Field(
        None, description="a learned (heads, H*W, h*w) bias added to the logits (CMT's relative_pos); block: one "
                          "table per block; stage: one table shared by the stage's blocks (CMT); null: none")
    sr_ratios: list[PosInt] | None = Field(
        None, min_length=2, max_length=4,
        description="multi-scale heads (Shunted): the heads split evenly into one group per entry, each group's "
                    "keys and values from its own conv reduction (kernel = stride = entry; 1 still gets its 1x1 "
                    "conv), norm, kv Linear and local conv; one q and proj; replaces sr_ratio; null: one scale")
    sr_act: bool | None = Field(None, description="GELU after the reduction's norm (Shunted); null: only after the "
                                                  "pool reduction's (PVTv2-li)")

    key_optional = frozenset({"groups", "kernel", "sr_bias", "q_conv", "split_kv", "local_conv", "local_conv_add",
                              "scale_width", "pos_bias", "sr_ratios", "sr_act"})

    def stage_shared_params(self, r: Resolved) -> int:
        """Parameter elements that the stage's blocks share (counted once per stage, not per block)."""
        if self.pos_bias != "stage":
            return 0
        small = reduced(self, r.in_type) or r.in_type
        return r["num_heads"] * r.in_type.height * r.in_type.width * small.height * small.width


def reduced(spec: SrAttentionSpec, x: TensorType) -> TensorType | None:
    """The grid keys and values come from, or None when there is no reduction (multi-scale: the first group's)."""
    if spec.sr_ratios is not None:
        return x.with_grid(x.height // spec.sr_ratios[0], x.width // spec.sr_ratios[0])
    if spec.reduction == "pool":
        return x.with_grid(spec.pool_size, spec.pool_size)
    if spec.sr_ratio == 1 and spec.reduction != "dwconv":
        return None
    return x.with_grid(x.height // spec.sr_ratio, x.width // spec.sr_ratio)


def _dwconv(dim: int, kernel: int, stride: int, bias: bool) -> nn.Conv2d:
    """Depthwise conv; an odd kernel pads kernel // 2, so a stride that divides the map divides its size."""
    return nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2 if kernel != stride else 0, groups=dim,
                     bias=bias)


class SrAttention(nn.Module):
    """Parameter names follow timm's PVTv2 ``Attention`` (q, kv, proj, sr, norm); ``kv`` holds k then v. CvT's
    q projection is ``q_sr`` and ``q_norm``, its own v projection ``v_sr`` and ``v_norm`` (``sr`` and ``norm`` then
    serve k alone); Shunted's value conv is ``local_conv``. With ``prefix`` tokens the input is (B, P + H*W, C)
    on a ``grid`` of H x W, else (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, sr_ratio: int, pool_size: int | None,
                 norm: nn.Module, qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool,
                 groups: int = 1, reduction: Reduction | None = None, kernel: int | None = None,
                 sr_bias: bool = True, q_norm: nn.Module | None = None, v_norm: nn.Module | None = None,
                 local_conv: int | None = None, local_conv_add: LocalConvAdd = "output", prefix: int = 0,
                 grid: tuple[int, int] = (0, 0), out_dim: int | None = None,
                 scale_width: ScaleWidth = "head", pos_bias: tuple[int, int] | None = None,
                 pos_bias_shared: bool = False, act: bool | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused
        self.prefix, self.grid = prefix, grid
        inner = num_heads * head_dim
        self.scale = inner**-0.5 if scale_width == "inner" else None  # None: attend's head_dim ** -0.5
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        pool = pool_size is not None
        reduction = reduction or ("pool" if pool else "conv")
        self.reduces = pool or sr_ratio > 1 or reduction == "dwconv"
        self.pool: nn.Module = nn.Identity()
        self.sr: nn.Conv2d | None = None
        if reduction == "pool":
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            self.sr = nn.Conv2d(dim, dim, 1, groups=groups, bias=sr_bias)
        elif reduction == "avgpool" and self.reduces:
            self.pool = nn.AvgPool2d(sr_ratio, stride=sr_ratio)
        elif reduction == "dwconv":
            self.sr = _dwconv(dim, kernel or sr_ratio, sr_ratio, sr_bias)
        elif self.reduces:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=groups, bias=sr_bias)
        self.norm = norm if reduction != "avgpool" else nn.Identity()  # nn.Identity without a reduction or a norm
        self.act = nn.GELU() if (pool if act is None else act) and self.reduces else nn.Identity()
        self.q_sr = _dwconv(dim, kernel or 1, 1, sr_bias) if q_norm is not None else None
        self.q_norm = q_norm
        self.v_sr = _dwconv(dim, kernel or sr_ratio, sr_ratio, sr_bias) if v_norm is not None else None
        self.v_norm = v_norm
        self.local_conv = _dwconv(inner, local_conv, 1, True) if local_conv is not None else None
        self.local_conv_to_values = local_conv_add == "value"
        # (heads, N, M) logit bias for N = H*W queries and M = h*w keys; shared_in_stage: the compiler ties it
        self.pos_bias = nn.Parameter(torch.zeros(num_heads, *pos_bias)) if pos_bias is not None else None
        self.shared_in_stage = ("pos_bias",) if pos_bias is not None and pos_bias_shared else ()

    def init_weights(self) -> None:
        """CMT's ``torch.randn`` for the position bias table."""
        if self.pos_bias is not None:
            nn.init.normal_(self.pos_bias)

    def reduce(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, h, w, C)
        if not self.reduces:
            return x
        x = self.pool(x.permute(0, 3, 1, 2))  # (B, C, H, W) -> (B, C, h, w)
        if self.sr is not None:
            x = self.sr(x)
        return self.act(self.norm(x.permute(0, 2, 3, 1)))  # (B, h, w, C)

    def project_q(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        if self.q_sr is None or self.q_norm is None:
            return x
        return self.q_norm(self.q_sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # through (B, C, H, W)

    def keys_values(self, x: Tensor, prefix: Tensor | None) -> tuple[Tensor, tuple[int, int]]:
        """(B, H, W, C) grid and (B, P, C) prefix tokens -> (B, P + h*w, 2*inner) keys then values, and (h, w)."""
        small = self.reduce(x)  # (B, h, w, C)
        grid = (small.shape[1], small.shape[2])
        if self.v_sr is None or self.v_norm is None:
            return self.kv(join_prefix(prefix, small).flatten(1, -2)), grid  # (B, P + h*w, C) in
        v_small = self.v_norm(self.v_sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # through (B, C, h, w)
        w_k, w_v = self.kv.weight.chunk(2)  # kv holds k then v: CvT's proj_k, proj_v
        b_k, b_v = (None, None) if self.kv.bias is None else self.kv.bias.chunk(2)
        k = F.linear(join_prefix(prefix, small).flatten(1, -2), w_k, b_k)  # (B, P + h*w, inner)
        v = F.linear(join_prefix(prefix, v_small).flatten(1, -2), w_v, b_v)
        return torch.cat([k, v], dim=-1), grid

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C'), or (B, P + H*W, C) -> (B, P + H*W, C')
        prefix, grid_x = split_prefix(x, self.prefix, self.grid)  # (B, P, C) or None, (B, H, W, C)
        q = self.q(join_prefix(prefix, self.project_q(grid_x)).flatten(1, -2))  # (B, P + H*W, inner)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, P + H*W, d)
        kv, grid = self.keys_values(grid_x, prefix)  # (B, P + h*w, 2*inner)
        kv = kv.unflatten(-1, (2, self.num_heads, self.head_dim))  # (B, P + h*w, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, P + h*w, d): k first, as timm
        local = None
        if self.local_conv is not None:  # on the grid's values; prefix tokens get zeros
            local = F.pad(conv_on_heads(self.local_conv, v[:, :, self.prefix:], grid), (0, 0, self.prefix, 0))
        if local is not None and self.local_conv_to_values:
            v, local = v + local, None  # Shunted: the values themselves get the local conv
        # CMT: (q kᵀ) * scale + bias
        y = attend(q, k, v, bias=self.pos_bias, drop=self.attn_drop, fused=self.fused, scale=self.scale,
                   scale_order="after" if self.pos_bias is not None else "before")  # (B, heads, P + H*W, d)
        if local is not None:
            y = y + local  # LePE: added to the attention output
        y = y.transpose(1, 2).flatten(2).unflatten(1, x.shape[1:-1])  # (B, heads, N, d) -> x's shape with inner
        return self.proj_drop(self.proj(y))


class KeyValueScale(nn.Module):
    """One head group's keys and values in multi-scale attention: a ``ratio`` x ``ratio`` conv of stride ``ratio``,
    ``norm``, activation, the group's ``kv`` Linear (k then v) and the local conv of its values."""

    def __init__(self, dim: int, inner: int, ratio: int, norm: nn.Module, act: bool, qkv_bias: bool, groups: int,
                 sr_bias: bool, local_conv: int | None) -> None:
        super().__init__()
        self.sr = nn.Conv2d(dim, dim, ratio, stride=ratio, groups=groups, bias=sr_bias)
        self.norm = norm
        self.act = nn.GELU() if act else nn.Identity()
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.local_conv = _dwconv(inner, local_conv, 1, True) if local_conv is not None else None

    def forward(self, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, H, W, C) -> k, v (B, heads, h*w, d) and the local conv of v (or None)."""
        small = self.act(self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))  # (B, h, w, C)
        kv = self.kv(small.flatten(1, 2)).unflatten(-1, (2, heads, -1))  # (B, h*w, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        local = None if self.local_conv is None else conv_on_heads(self.local_conv, v, small.shape[1:3])
        return k, v, local


class MultiScaleSrAttention(nn.Module):
    """Shunted self-attention (the authors' ``SSA.Attention`` with ``sr_ratio > 1``): one ``q`` and ``proj``;
    the heads split evenly into ``scales`` groups, group ``i`` attends to keys and values of ``scales.i`` (the
    authors' ``sr{i+1}``, ``norm{i+1}``, ``kv{i+1}``, ``local_conv{i+1}``); the groups' outputs are concatenated
    in order. The input is (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ratios: list[int], norms: list[nn.Module],
                 act: bool, qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool, groups: int,
                 sr_bias: bool, local_conv: int | None, local_conv_add: LocalConvAdd, out_dim: int | None,
                 scale_width: ScaleWidth) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused
        self.group_heads = num_heads // len(ratios)
        inner = num_heads * head_dim
        self.scale = inner**-0.5 if scale_width == "inner" else None
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.scales = nn.ModuleList(
            KeyValueScale(dim, self.group_heads * head_dim, ratio, norm, act, qkv_bias, groups, sr_bias, local_conv)
            for ratio, norm in zip(ratios, norms, strict=True))
        self.local_conv_to_values = local_conv_add == "value"
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        q = self.q(x.flatten(1, 2)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, d)
        ys = []
        for i, scale in enumerate(self.scales):
            k, v, local = scale(x, self.group_heads)  # (B, heads/g, h*w, d)
            if local is not None and self.local_conv_to_values:
                v, local = v + local, None
            q_i = q[:, i * self.group_heads:(i + 1) * self.group_heads]
            y = attend(q_i, k, v, bias=None, drop=self.attn_drop, fused=self.fused, scale=self.scale)
            ys.append(y if local is None else y + local)  # (B, heads/g, N, d)
        y = torch.cat(ys, dim=1).transpose(1, 2).flatten(2).unflatten(1, x.shape[1:-1])  # (B, H, W, inner)
        return self.proj_drop(self.proj(y))


def sr_attention_shape(spec: SrAttentionSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "tokens", op="sr_attention")
    require_grid(x, op="sr_attention")
    out = x if out_dim is None else x.with_channels(out_dim)
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, out.channels)
    if spec.reduction != "pool":
        require_divides("sr_ratio", spec.sr_ratio, x)
    if spec.sr_ratios is not None:
        _check_scales(spec, x, num_heads)
    if spec.kernel is not None and spec.reduction != "dwconv":
        raise ShapeIssue("kernel", f"sets the dwconv reduction's kernel, but the reduction is {spec.reduction}")
    if spec.kernel is None and spec.reduction == "dwconv" and spec.q_conv:
        raise ShapeIssue("kernel", "q_conv needs an odd kernel (the q conv has stride 1; CvT: 3)")
    for field in ("q_conv", "split_kv"):
        if getattr(spec, field) and spec.reduction != "dwconv":
            raise ShapeIssue(field, f"needs reduction dwconv, but the reduction is {spec.reduction}")
    if spec.reduction == "dwconv" and spec.groups != 1:
        raise ShapeIssue("groups", f"{spec.groups} sets the groups of a full reduction conv; dwconv is depthwise")
    small = reduced(spec, x.with_prefix(0))  # the convs and norms see the grid alone
    if spec.pos_bias is not None and x.prefix:
        raise ShapeIssue("pos_bias", f"covers the grid's tokens, but the input has {x.prefix} prefix tokens")
    if spec.local_conv is not None and spec.local_conv_add == "output" and small is not None and small.grid != x.grid:
        raise ShapeIssue("local_conv_add", f"output needs values on the {x.height}x{x.width} query grid, but the "
                                           f"reduction gives {small.height}x{small.width}; use value")
    if small is not None:
        require_groups(spec.groups, input=x.channels)
        check_norm(spec.norm, small, "norm")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _check_scales(spec: SrAttentionSpec, x: TensorType, num_heads: int) -> None:
    """Multi-scale heads: even head groups, a conv reduction per group, no prefix tokens or CvT/CMT options."""
    ratios = spec.sr_ratios or []
    if num_heads % len(ratios):
        raise ShapeIssue("sr_ratios", f"{len(ratios)} scales do not split {num_heads} heads evenly")
    for ratio in ratios:
        require_divides("sr_ratios", ratio, x)
    if x.prefix:
        raise ShapeIssue("sr_ratios", f"multi-scale heads see the grid alone, but the input has {x.prefix} prefix "
                                      "tokens")
    for field, value, default in (("reduction", spec.reduction, "conv"), ("q_conv", spec.q_conv, False),
                                  ("split_kv", spec.split_kv, False), ("pos_bias", spec.pos_bias, None)):
        if value != default:
            raise ShapeIssue(field, f"multi-scale heads (sr_ratios) take {field} {default}, got {value}")
    if spec.local_conv is not None and spec.local_conv_add == "output" and any(r != 1 for r in ratios):
        raise ShapeIssue("local_conv_add", "output needs every group's values on the query grid; use value")
    for ratio in ratios:
        require_groups(spec.groups, input=x.channels)
        check_norm(spec.norm, x.with_grid(x.height // ratio, x.width // ratio), "norm")


def _build_sr_attention(spec: SrAttentionSpec, r: Resolved) -> SrAttention | MultiScaleSrAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    if spec.sr_ratios is not None:
        norms = [build_norm(spec.norm, x.with_grid(x.height // s, x.width // s)) for s in spec.sr_ratios]
        return MultiScaleSrAttention(
            x.channels, num_heads=num_heads, head_dim=head_dim, ratios=spec.sr_ratios, norms=norms,
            act=bool(spec.sr_act), qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop,
            fused=spec.fused, groups=spec.groups, sr_bias=spec.sr_bias, local_conv=spec.local_conv,
            local_conv_add=spec.local_conv_add, out_dim=r.out_type.channels, scale_width=spec.scale_width)
    small = reduced(spec, x.with_prefix(0))  # the convs and norms see the grid alone
    norm = build_norm(spec.norm, small) if small is not None else nn.Identity()
    q_norm = build_norm(spec.norm, x.with_prefix(0)) if spec.q_conv else None
    v_norm = build_norm(spec.norm, small) if spec.split_kv and small is not None else None
    keys = small or x  # the grid the keys come from
    return SrAttention(x.channels, num_heads=num_heads, head_dim=head_dim, sr_ratio=spec.sr_ratio,
                       pool_size=spec.pool_size if spec.reduction == "pool" else None, norm=norm,
                       qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop, proj_drop=spec.proj_drop, fused=spec.fused,
                       groups=spec.groups, reduction=spec.reduction, kernel=spec.kernel, sr_bias=spec.sr_bias,
                       q_norm=q_norm, v_norm=v_norm, local_conv=spec.local_conv, local_conv_add=spec.local_conv_add,
                       prefix=x.prefix, grid=x.grid, out_dim=r.out_type.channels, scale_width=spec.scale_width,
                       pos_bias=None if spec.pos_bias is None else (x.height * x.width, keys.height * keys.width),
                       pos_bias_shared=spec.pos_bias == "stage", act=spec.sr_act)


def fold_sr_attention(module: nn.Module) -> Folding | None:
    """q (or CvT's q conv) reads the input, and so does kv or the reduction conv (and CvT's v conv; without
    padding a shift folds exactly, the fold itself refuses a padded one), but not through a pooling (PVTv2-li,
    LITv2); the reduction's norm folds into kv where no activation comes between, the q conv's norm into q, CvT's
    separate k and v norms into their convs."""
    if isinstance(module, MultiScaleSrAttention):
        return _fold_multiscale(module)
    if not isinstance(module, SrAttention):
        return None
    reduce = module.kv if not module.reduces else module.sr if isinstance(module.pool, nn.Identity) else None
    q = module.q if module.q_sr is None else module.q_sr
    v = () if module.v_sr is None else (module.v_sr,)
    # prefix tokens reach q and kv straight from the input, the grid through the convs and their norms: neither
    # an affine on the input nor a norm's affine folds into q or kv then
    bypass = module.prefix > 0
    exact = reduce is not None and not (bypass and (module.reduces or module.q_sr is not None))

    def deploy() -> nn.Module:
        if module.q_sr is not None:
            fold_parts(module, ("q_sr", "q_norm") if bypass else ("q_sr", "q_norm", "q"))
        if module.v_sr is not None:
            fold_parts(module, ("v_sr", "v_norm"))
            return fold_parts(module, ("sr", "norm"))
        if bypass:
            return fold_parts(module, ("sr", "norm", "act")) if module.sr is not None else module
        return fold_parts(module, ("norm", "act", "kv"))

    return Folding(reads=(q, reduce, *v) if exact else (), writes=module.proj, deploy=deploy)


def _fold_multiscale(module: MultiScaleSrAttention) -> Folding:
    """q and every group's reduction conv (kernel = stride, no padding) read the input; a group's norm folds
    into its kv where no GELU comes between (fold_chain leaves it otherwise)."""

    def deploy() -> nn.Module:
        for scale in module.scales:
            fold_parts(scale, ("norm", "act", "kv"))
        return module

    return Folding(reads=(module.q, *(scale.sr for scale in module.scales)), writes=module.proj, deploy=deploy)


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
        Case({"reduction": "dwconv", "sr_ratio": 2, "num_heads": 2, "norm": {"type": "batchnorm"}},
             TensorType("tokens", 16, 4, 6), id="cmt"),
        Case({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True, "sr_bias": False,
              "num_heads": 2, "qkv_bias": False, "norm": {"type": "batchnorm"}}, TensorType("tokens", 16, 6, 4),
             id="cvt"),
        Case({"reduction": "dwconv", "sr_ratio": 1, "kernel": 3, "split_kv": True, "head_dim": 8},
             TensorType("tokens", 16, 3, 3), id="split-kv-layernorm"),
        Case({"reduction": "avgpool", "sr_ratio": 2, "num_heads": 2, "qkv_bias": False, "fused": False},
             TensorType("tokens", 16, 4, 4), id="lofi"),
        Case({"num_heads": 2, "local_conv": 3}, TensorType("tokens", 16, 3, 4), id="lepe"),
        Case({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True, "num_heads": 2,
              "norm": {"type": "batchnorm"}, "local_conv": 3, "local_conv_add": "value"},
             TensorType("tokens", 16, 4, 2, prefix=1), id="cvt-class-token"),
        Case({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True, "num_heads": 2,
              "norm": {"type": "batchnorm"}, "sr_bias": False, "scale_width": "inner", "fused": False},
             TensorType("tokens", 16, 4, 4, prefix=1), id="cvt-scale-inner"),
        Case({"sr_ratio": 2, "num_heads": 2, "local_conv": 3, "local_conv_add": "value"},
             TensorType("tokens", 16, 4, 4, prefix=2), id="prefixed"),
        Case({"num_heads": 2, "local_conv": 3}, TensorType("tokens", 16, 2, 3, prefix=1), id="prefixed-lepe"),
        Case({"sr_ratio": 2, "num_heads": 2, "local_conv": 3, "local_conv_add": "value"},
             TensorType("tokens", 16, 4, 4), id="shunted"),
        Case({"sr_ratios": [4, 2], "sr_act": True, "num_heads": 2, "local_conv": 3, "local_conv_add": "value",
              "fused": False}, TensorType("tokens", 16, 4, 4), id="shunted-multi-scale"),
        Case({"sr_ratios": [2, 1], "head_dim": 4, "qkv_bias": False}, TensorType("tokens", 16, 2, 4),
             id="multi-scale-1x1"),
        Case({"sr_ratio": 2, "sr_act": True, "num_heads": 2}, TensorType("tokens", 16, 4, 4), id="sr-act"),
        Case({"reduction": "dwconv", "sr_ratio": 2, "num_heads": 2, "norm": {"type": "batchnorm"}, "pos_bias": "stage",
              "fused": False}, TensorType("tokens", 16, 4, 6), id="cmt-pos-bias"),
        Case({"sr_ratio": 1, "num_heads": 2, "pos_bias": "block"}, TensorType("tokens", 16, 3, 3), id="pos-bias"),
    ),
)
