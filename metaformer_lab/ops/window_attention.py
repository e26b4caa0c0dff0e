"""(Shifted) window attention: Swin's W-MSA / SW-MSA (Liu et al., "Swin Transformer", 2021) and, without
relative position bias and shift, Twins' locally-grouped attention (Chu et al., "Twins", 2021).

Other token groupings: MaxViT's grid attention (Tu et al., "MaxViT", 2022), Shuffle Transformer's spatial
shuffle (Huang et al., 2021; the same grouping as the grid) and CrossFormer's long-distance attention (Wang et
al., "CrossFormer", 2022). Swin V2's scaled cosine attention and continuous position bias (Liu et al., "Swin
Transformer V2", 2022) and CrossFormer's dynamic position bias are options of the same op. CSWin's cross-shaped
windows (Dong et al., "CSWin Transformer", 2022) split the heads: half attend within vertical stripes, half within
horizontal ones, sharing one qkv and one projection.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, grid_attention_heads, head_dim_field
from metaformer_lab.ops.common import (
    OddKernel,
    PosInt,
    Prob,
    conv_on_heads,
    inference_key,
    require_divides,
)
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix

MASKED = -100.0
"""Bias between tokens of one shifted window that come from different regions (timm's value, not -inf)."""
MAX_LOGIT_SCALE = math.log(100.0)
"""Upper clamp of the log of Swin V2's learned logit scale (timm's ``log(1 / 0.01)``)."""
CPB_HIDDEN = 512
"""Hidden width of Swin V2's continuous position bias MLP (timm's ``cpb_mlp``)."""

Partition = Literal["window", "grid", "shuffle", "dilated", "cross"]
RelPosBias = bool | Literal["mlp", "dpb"]


class WindowAttentionSpec(GridOpSpec):
    """Multi-head self-attention inside non-overlapping windows, optionally shifted by half a window, or inside
    strided groups of tokens (timm ``swin_transformer.WindowAttention`` + ``SwinTransformerBlock._attn``; with
    ``rel_pos_bias: false`` and no shift, timm ``twins.LocallyGroupedAttn``).

    ``partition: grid`` is timm's ``maxxvit`` grid attention (``shuffle``, Shuffle Transformer's spatial shuffle,
    groups the tokens the same way; ``dilated`` is CrossFormer's long-distance attention). ``cosine: true``,
    ``rel_pos_bias: mlp`` and ``k_bias: false`` make timm's ``swin_transformer_v2.WindowAttention``;
    ``rel_pos_bias: dpb`` is CrossFormer's dynamic position bias; ``partition: cross`` with ``local_conv: 3`` is
    CSWin's cross-shaped window attention with LePE (``CSWinBlock`` with its two ``LePEAttention`` branches)."""

    type: Literal["window_attention"] = "window_attention"
    window: PosInt = Field(7, description="tokens along a window's (group's) side; must divide H and W")
    partition: Partition = Field("window", description=(
        "window: w x w adjacent tokens; grid: w x w tokens H/w (W/w) apart (MaxViT); shuffle: the same grouping "
        "as grid (Shuffle Transformer); dilated: w x w tokens `interval` apart (CrossFormer's LDA); cross: the first "
        "half of the heads within H x w stripes (full height), the second within w x W stripes (CSWin)"))
    interval: PosInt | None = Field(None, description=(
        "dilated: distance between a group's tokens, w * interval must divide H and W; null: H / w (as grid)"))
    shift: bool = Field(False, description="roll by window // 2 (SW-MSA); off along an axis no longer than the window")
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    rel_pos_bias: RelPosBias = Field(True, description=(
        "relative position bias: true: a learned ((2w-1)^2, heads) table; mlp: Swin V2's continuous bias "
        "(16 sigmoid(MLP) on log-spaced coordinates); dpb: CrossFormer's dynamic bias (MLP on coordinates); "
        "false: none"))
    table_layout: Literal["swin", "tf"] = Field("swin", description=(
        "the learned table of rel_pos_bias: true: swin: ((2w-1)^2, heads), read at the query - key offset; tf: "
        "(heads, 2w-1, 2w-1), read at the key - query offset (timm RelPosBiasTf: MaxViT's tf models)"))
    cosine: bool = Field(False, description="Swin V2's scaled cosine attention: cos(q, k) times a learned head scale")
    qkv_bias: bool = True
    k_bias: bool = Field(True, description="false: no key bias, q and v biases apart from qkv (Swin V2)")
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")
    local_conv: OddKernel | None = Field(None, description="kernel of a depthwise conv of each window's value map, "
                                                           "added to the attention output (LePE, CSWin); null: none")

    key_optional = frozenset({"partition", "interval", "cosine", "k_bias", "local_conv", "table_layout"})


def partition(x: Tensor, window: int | tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C): groups of w x w tokens ``dilation`` apart, in row-major order; a
    (wh, ww) window groups wh x ww tokens (CSWin's stripes).

    Dilation (1, 1) gives windows of adjacent tokens (timm ``window_partition``); (H/w, W/w) the strided grid
    (timm ``maxxvit.grid_partition``); in between, the map is cut into regions of w * dilation tokens,
    each split into dh x dw groups (CrossFormer's long-distance attention).
    """
    B, H, W, C = x.shape
    dh, dw = dilation
    wh, ww = (window, window) if isinstance(window, int) else window
    x = x.reshape(B, H // (wh * dh), wh, dh, W // (ww * dw), ww, dw, C)  # (B, Rh, w, dh, Rw, w, dw, C)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)  # (B, Rh, Rw, dh, dw, w, w, C)
    return x.reshape(-1, wh * ww, C)  # (B*nW, w*w, C)


def merge(windows: Tensor, grid: tuple[int, int], window: int | tuple[int, int],
          dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """Inverse of :func:`partition`: (B * nW, w*w, C) -> (B, H, W, C)."""
    H, W = grid
    dh, dw = dilation
    wh, ww = (window, window) if isinstance(window, int) else window
    C = windows.shape[-1]
    x = windows.reshape(-1, H // (wh * dh), W // (ww * dw), dh, dw, wh, ww, C)  # (B, Rh, Rw, dh, dw, w, w, C)
    return x.permute(0, 1, 5, 3, 2, 6, 4, 7).reshape(-1, H, W, C)  # (B, Rh, w, dh, Rw, w, dw, C) -> (B, H, W, C)


def dilation_of(spec: WindowAttentionSpec, grid: tuple[int, int]) -> tuple[int, int]:
    """The distance between the tokens of one group along each axis, by the spec's partition."""
    if spec.partition in ("window", "cross"):
        return 1, 1
    if spec.partition == "dilated" and spec.interval is not None:
        return spec.interval, spec.interval
    return grid[0] // spec.window, grid[1] // spec.window  # grid, shuffle, dilated without interval


def _regions(size: int, window: int, shift: int) -> Tensor:  # (size,)
    """Region label along one axis after the roll: the last window mixes two regions when shifted."""
    label = torch.zeros(size, dtype=torch.long)
    if shift:
        label[size - window:] = 1
        label[size - shift:] = 2
    return label


def shift_mask(grid: tuple[int, int], window: int, shift: tuple[int, int]) -> Tensor | None:
    """(nW, 1, w*w, w*w) additive mask keeping a shifted window's regions apart, None without shift."""
    if not any(shift):
        return None
    rows, cols = _regions(grid[0], window, shift[0]), _regions(grid[1], window, shift[1])
    region = rows[:, None] * 3 + cols[None, :]  # (H, W)
    region = partition(region[None, :, :, None], window).squeeze(-1)  # (1, H, W, 1) -> (nW, w*w)
    apart = region[:, None, :] != region[:, :, None]  # (nW, w*w, w*w)
    return torch.zeros(apart.shape).masked_fill(apart, MASKED).unsqueeze(1)  # (nW, 1, w*w, w*w)


def shift_sizes(grid: tuple[int, int], window: int, shift: bool) -> tuple[int, int]:
    """window // 2 along each axis, but 0 along an axis the window already covers (as timm's Swin)."""
    rows, cols = (window // 2 if shift and size > window else 0 for size in grid)
    return rows, cols


def relative_coords(window: int, log_spaced: bool) -> Tensor:  # ((2w-1)^2, 2)
    """(dy, dx) of every relative position inside a window, in the order of the bias table; ``log_spaced``:
    rescaled to [-8, 8], then sign(t) log2(|t| + 1) / 3 (Swin V2)."""
    offsets = torch.arange(1 - window, window, dtype=torch.float32)  # (2w-1,)
    coords = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).flatten(0, 1)  # ((2w-1)^2, 2)
    if log_spaced:
        coords = coords / max(window - 1, 1) * 8
        coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return coords


class DynamicPosBias(nn.Module):
    """CrossFormer's dynamic position bias: relative coordinates -> Linear -> 3 x (LayerNorm, ReLU, Linear) ->
    one bias per head (parameter names as theirs: pos_proj, pos1, pos2, pos3)."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, hidden)
        self.pos1, self.pos2, self.pos3 = (nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out))
                                           for out in (hidden, hidden, num_heads))

    def forward(self, coords: Tensor) -> Tensor:  # (R, 2) -> (R, heads)
        return self.pos3(self.pos2(self.pos1(self.pos_proj(coords))))


class WindowAttention(nn.Module):
    """Parameter names follow timm's Swin ``WindowAttention`` (qkv, proj, relative_position_bias_table), its
    Swin V2 one (logit_scale, cpb_mlp, q_bias, v_bias) and CrossFormer's ``Attention`` (pos); the value conv is
    ``local_conv``, zero-padded at each window's border as CSWin's ``get_lepe``. ``cross``: CSWin's two branches
    (``attns.0`` on the first half of the channels of qkv, local_conv and proj's input, ``attns.1`` on the second)."""

    relative_position_bias_table: nn.Parameter | None
    cpb_mlp: nn.Sequential | None
    pos: DynamicPosBias | None
    logit_scale: nn.Parameter | None
    q_bias: nn.Parameter | None
    v_bias: nn.Parameter | None
    relative_position_index: Tensor | None
    relative_coords_table: Tensor | None
    k_bias: Tensor | None
    attn_mask: Tensor | None

    def __init__(self, dim: int, grid: tuple[int, int], window: int, dilation: tuple[int, int], shift: bool,
                 num_heads: int, head_dim: int, rel_pos_bias: RelPosBias, cosine: bool, qkv_bias: bool, k_bias: bool,
                 attn_drop: float, proj_drop: float, fused: bool, local_conv: int | None = None,
                 out_dim: int | None = None, table_layout: Literal["swin", "tf"] = "swin", cross: bool = False) -> None:
        super().__init__()
        self.grid, self.window, self.dilation, self.fused, self.cross = grid, window, dilation, fused, cross
        self.num_heads, self.head_dim = num_heads, head_dim
        self.shift = shift_sizes(grid, window, shift)
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias and k_bias)
        separate = qkv_bias and not k_bias  # timm's Swin V2: q and v biases, none for k
        self.q_bias = nn.Parameter(torch.zeros(inner)) if separate else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if separate else None
        self.register_buffer("k_bias", torch.zeros(inner) if separate else None, persistent=False)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if cosine else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.local_conv = None if local_conv is None else nn.Conv2d(inner, inner, local_conv, padding=local_conv // 2,
                                                                    groups=inner)
        self.relative_position_bias_table, self.cpb_mlp, self.pos = None, None, None
        self.table_layout = table_layout
        if rel_pos_bias is True:
            from timm.layers import trunc_normal_
            span = 2 * window - 1
            shape = (span**2, num_heads) if table_layout == "swin" else (num_heads, span, span)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(shape))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        elif rel_pos_bias == "mlp":
            self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(),
                                         nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        elif rel_pos_bias == "dpb":  # CrossFormer: DynamicPosBias(dim // 4), which divides by 4 again
            self.pos = DynamicPosBias(max(dim // 16, 1), num_heads)
        coords = relative_coords(window, log_spaced=rel_pos_bias == "mlp") if rel_pos_bias in ("mlp", "dpb") else None
        self.register_buffer("relative_coords_table", coords, persistent=False)
        index = None
        if rel_pos_bias:
            from timm.models.swin_transformer import get_relative_position_index
            index = get_relative_position_index(window, window)  # (w*w, w*w) into the table
            if table_layout == "tf":  # the key - query offset: the flattened table read backwards
                index = (2 * window - 1) ** 2 - 1 - index
        self.register_buffer("relative_position_index", index, persistent=False)
        self.register_buffer("attn_mask", shift_mask(grid, window, self.shift), persistent=False)
        self._bias_cache: tuple[tuple[object, ...], Tensor | None] | None = None

    def no_weight_decay(self) -> set[str]:
        """Local parameter names kept out of weight decay: the relative position table or MLP, the logit scale
        (the Swin V2 authors' ``no_weight_decay_keywords``)."""
        names = {name for name, _ in self.named_parameters()}
        return {n for n in names if n.startswith(("relative_position_bias_table", "cpb_mlp.", "logit_scale"))}

    def _table(self) -> Tensor | None:  # ((2w-1)^2, heads)
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table
            return table if self.table_layout == "swin" else table.flatten(1).t()  # tf: (heads, 2w-1, 2w-1)
        if self.cpb_mlp is not None:
            return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table))
        if self.pos is not None:
            return self.pos(self.relative_coords_table)
        return None

    def _bias(self, batch: int) -> Tensor | None:  # broadcastable to (B*nW, heads, w*w, w*w)
        """The position bias and shifted-window mask of every window. They depend on no input: without autograd
        (inference) they are kept until the table, its MLP or the mask changes
        (:func:`~metaformer_lab.ops.common.inference_key`), and only the expansion over the batch runs per call."""
        sources = [self.relative_position_bias_table, *(self.cpb_mlp.parameters() if self.cpb_mlp else ()),
                   *(self.pos.parameters() if self.pos else ()), self.relative_coords_table,
                   self.relative_position_index, self.attn_mask]
        key = inference_key(*(t for t in sources if t is not None))
        if key is not None and self._bias_cache is not None and self._bias_cache[0] == key:
            bias = self._bias_cache[1]
        else:
            bias = self._window_bias()
            self._bias_cache = None if key is None else (key, bias)
        if bias is not None and self.attn_mask is not None:
            bias = bias.expand(batch, *bias.shape).flatten(0, 1)  # (B*nW, heads or 1, w*w, w*w)
        return bias

    def _window_bias(self) -> Tensor | None:  # (heads, w*w, w*w), (1, heads, w*w, w*w) or (nW, heads or 1, ...)
        bias = None
        table = self._table()
        if table is not None:
            bias = table[self.relative_position_index].permute(2, 0, 1)  # (heads, w*w, w*w)
            # timm's Swin hands SDPA a (1, heads, N, N) mask, its RelPosBiasTf a (heads, N, N) one; SDPA's CPU
            # kernels round the two differently, so each layout keeps its reference's shape for exact parity.
            bias = bias.unsqueeze(0) if self.table_layout == "swin" or self.attn_mask is not None else bias
        if self.attn_mask is not None:
            bias = self.attn_mask if bias is None else bias + self.attn_mask  # (nW, heads or 1, w*w, w*w)
        return bias

    def _attend_cosine(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, logit_scale: Tensor) -> Tensor:
        """``softmax(cos(q, k) * exp(min(logit_scale, log 100)) + bias) v`` (timm's Swin V2 order when explicit)."""
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        scale = torch.clamp(logit_scale, max=MAX_LOGIT_SCALE).exp()  # (heads, 1, 1)
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.fused:
            p = self.attn_drop.p if self.attn_drop.training else 0.0
            return F.scaled_dot_product_attention(q * scale, k, v, attn_mask=bias, dropout_p=p, scale=1.0)
        attn = (q @ k.transpose(-2, -1)) * scale  # (B*nW, heads, w*w, w*w)
        if bias is not None:
            attn = attn + bias
        return self.attn_drop(attn.softmax(dim=-1)) @ v  # (B*nW, heads, w*w, d)

    def _qkv(self, x: Tensor) -> Tensor:  # (..., C) -> (..., 3, heads, d)
        if self.q_bias is None:
            qkv = self.qkv(x)  # (..., 3 * heads * d)
        else:  # timm's Swin V2: one F.linear with the q, zero k and v biases (plus a bias a norm folded into)
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            bias = bias if self.qkv.bias is None else bias + self.qkv.bias
            qkv = F.linear(x, self.qkv.weight, bias)  # (..., 3 * heads * d)
        return qkv.unflatten(-1, (3, self.num_heads, self.head_dim))  # (..., 3, heads, d)

    def _forward_cross(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        """CSWin: the first half of the heads attends within H x w stripes, the second within w x W ones; each
        half's LePE is its half of ``local_conv``; the halves' outputs, concatenated, share ``proj``."""
        H, W = self.grid
        qkv = self._qkv(x)  # (B, H, W, 3, heads, d)
        half = self.num_heads // 2
        outs = []
        for branch, stripe in enumerate(((H, self.window), (self.window, W))):  # two branches, not a loop over stripes
            heads = qkv[..., branch * half:(branch + 1) * half, :].flatten(-3)  # (B, H, W, 3 * half * d)
            windows = partition(heads, stripe).unflatten(-1, (3, half, self.head_dim))  # (B*nS, h*w, 3, half, d)
            q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nS, half, h*w, d)
            y = attend(q, k, v, bias=None, drop=self.attn_drop, fused=self.fused)  # (B*nS, half, h*w, d)
            if self.local_conv is not None:
                conv = self.local_conv
                width = half * self.head_dim
                part = slice(branch * width, (branch + 1) * width)
                bias = None if conv.bias is None else conv.bias[part]
                lepe = partial(F.conv2d, weight=conv.weight[part], bias=bias, padding=conv.padding, groups=width)
                y = y + conv_on_heads(lepe, v, stripe)  # (B*nS, half, h*w, d)
            y = y.transpose(1, 2).flatten(2)  # (B*nS, h*w, half * d)
            outs.append(merge(y, self.grid, stripe))  # (B, H, W, half * d)
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))  # (B, H, W, C')

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        if self.cross:
            return self._forward_cross(x)
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = partition(x, self.window, self.dilation)  # (B*nW, w*w, C)
        qkv = self._qkv(windows)  # (B*nW, w*w, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nW, heads, w*w, d)
        bias = self._bias(x.shape[0])
        if self.logit_scale is not None:
            y = self._attend_cosine(q, k, v, bias, self.logit_scale)
        else:
            y = attend(q, k, v, bias=bias, drop=self.attn_drop, fused=self.fused)
        if self.local_conv is not None:
            y = y + conv_on_heads(self.local_conv, v, (self.window, self.window))  # LePE: (B*nW, heads, w*w, d)
        # An explicit copy, not a view: torch.onnx.export (torch 2.14) swaps SDPA-with-bias for a kernel whose
        # output strides differ from the traced ones, and a view there fails (timm's fused Swin fails the same way).
        y = y.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B*nW, w*w, heads, d)
        y = self.proj_drop(self.proj(y.flatten(2)))  # (B*nW, w*w, C')
        y = merge(y, self.grid, self.window, self.dilation)  # (B, H, W, C')
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=(1, 2))
        return y


def window_attention_shape(spec: WindowAttentionSpec, x: TensorType,
                           out_dim: int | None) -> tuple[TensorType, Settings]:
    out, num_heads, head_dim = grid_attention_heads(spec, x, out_dim, op="window_attention")
    if spec.shift and spec.partition != "window":
        raise ShapeIssue("shift", f"only with partition: window; {spec.partition} groups are not shifted")
    if spec.table_layout != "swin" and spec.rel_pos_bias is not True:
        raise ShapeIssue("table_layout", f"lays out the learned table of rel_pos_bias: true, not {spec.rel_pos_bias}")
    if spec.partition == "cross" and num_heads % 2:
        raise ShapeIssue("num_heads", f"partition: cross splits the heads in two halves; {num_heads} is odd")
    if spec.partition == "cross" and (spec.rel_pos_bias is not False or spec.cosine):
        raise ShapeIssue("partition", "cross has no relative position bias or cosine attention (rel_pos_bias: "
                                      "false, cosine: false)")
    if spec.interval is not None and spec.partition != "dilated":
        raise ShapeIssue("interval", f"only with partition: dilated, not {spec.partition}")
    require_divides("window", spec.window, x)
    span = spec.window * (spec.interval or 1)
    require_divides("interval", span, x, what=f"window * interval = {span}")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_window_attention(spec: WindowAttentionSpec, r: Resolved) -> WindowAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return WindowAttention(x.channels, grid=x.grid, window=spec.window, dilation=dilation_of(spec, x.grid),
                           shift=spec.shift, num_heads=num_heads, head_dim=head_dim, rel_pos_bias=spec.rel_pos_bias,
                           cosine=spec.cosine, qkv_bias=spec.qkv_bias, k_bias=spec.k_bias, attn_drop=spec.attn_drop,
                           proj_drop=spec.proj_drop, fused=spec.fused, local_conv=spec.local_conv,
                           out_dim=r.out_type.channels, table_layout=spec.table_layout,
                           cross=spec.partition == "cross")


def fold_window_attention(module: nn.Module) -> Folding | None:
    """Shifting and windowing move tokens, never channels (and nothing is padded): qkv reads the input, proj
    writes the output."""
    if isinstance(module, WindowAttention):
        return Folding(reads=(module.qkv,), writes=module.proj)
    return None


WINDOW_ATTENTION = around_prefix(OpDef(
    WindowAttentionSpec,
    infer=window_attention_shape,
    build=_build_window_attention,
    preserves_type=True,
    fold=fold_window_attention,
    cases=(
        Case({"window": 2}, TensorType("tokens", 32, 4, 6)),
        Case({"window": 2, "shift": True, "num_heads": 2, "fused": False}, TensorType("tokens", 16, 4, 6),
             id="shifted"),
        Case({"window": 2, "shift": True, "head_dim": 8}, TensorType("tokens", 16, 2, 4), id="shift-one-axis"),
        Case({"window": 2, "rel_pos_bias": False, "num_heads": 2}, TensorType("tokens", 16, 4, 4), id="twins-lsa"),
        Case({"window": 2, "partition": "grid", "table_layout": "tf", "num_heads": 2}, TensorType("tokens", 16, 4, 4),
             id="maxvit-tf-table"),
        Case({"window": 3, "shift": True, "num_heads": 2, "local_conv": 3}, TensorType("tokens", 16, 6, 6),
             id="lepe"),
        Case({"window": 2, "partition": "grid", "num_heads": 2}, TensorType("tokens", 16, 4, 6), id="maxvit-grid"),
        Case({"window": 2, "partition": "cross", "rel_pos_bias": False, "num_heads": 4, "local_conv": 3},
             TensorType("tokens", 16, 4, 6), id="cswin-cross"),
        Case({"window": 1, "partition": "cross", "rel_pos_bias": False, "num_heads": 2, "fused": False},
             TensorType("tokens", 16, 2, 4), id="cswin-cross-explicit"),
        Case({"window": 2, "partition": "shuffle", "rel_pos_bias": False, "num_heads": 2, "fused": False},
             TensorType("tokens", 16, 4, 4), id="shuffle"),
        Case({"window": 2, "partition": "dilated", "interval": 2, "rel_pos_bias": "dpb", "num_heads": 2},
             TensorType("tokens", 32, 8, 4), id="crossformer-lda"),
        Case({"window": 2, "shift": True, "cosine": True, "rel_pos_bias": "mlp", "k_bias": False, "num_heads": 2},
             TensorType("tokens", 16, 4, 6), id="swin-v2"),
        Case({"window": 2, "cosine": True, "rel_pos_bias": "mlp", "num_heads": 2, "fused": False},
             TensorType("tokens", 16, 4, 4), id="swin-v2-explicit"),
        Case({"window": 2, "head_dim": 8, "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
             id="prefix-pass"),
    ),
))
