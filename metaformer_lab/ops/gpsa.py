"""Gated positional self-attention (d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft
Convolutional Inductive Biases", ICML 2021): each head mixes content attention with a positional
attention computed from the relative offsets of the grid tokens, through a learned gate. Initialised
local (each head attends around its own offset), so a GPSA layer starts out as a soft convolution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import HeadsSpec, SequenceMixer, resolve_heads
from metaformer_lab.ops.common import inference_key, require_layout, require_no_prefix


class GpsaSpec(HeadsSpec):
    """GPSA over the token grid (timm ``convit.GPSA``): ``attn = (1 - sigmoid(g)) softmax(q kᵀ / sqrt(d))
    + sigmoid(g) softmax(pos_proj(r))``, renormalised over the keys, then ``attn @ v``; ``r`` holds the
    offsets (dx, dy, dx² + dy²) between grid tokens, ``g`` one gate per head."""

    type: Literal["gpsa"] = "gpsa"
    locality_strength: float = Field(1.0, gt=0.0, le=100.0,
                                      description="scale of the local init of pos_proj (how sharply heads attend "
                                                  "around their offsets)")


def relative_offsets(height: int, width: int) -> Tensor:
    """(1, N, N, 3) offsets from token n to token m of a row-major grid: (dx, dy, dx² + dy²) (timm
    ``GPSA.get_rel_indices``, generalised to non-square grids)."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                torch.arange(width, dtype=torch.float32), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,)
    dx = cols[None, :] - cols[:, None]  # (N, N)
    dy = rows[None, :] - rows[:, None]  # (N, N)
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1).unsqueeze(0)  # (1, N, N, 3)


class GatedPositionalSelfAttention(SequenceMixer):
    """Parameter names follow timm's ``GPSA`` (qk, v, proj, pos_proj, gating_param). ``rel_indices`` is a
    non-persistent buffer, as in timm (not in the state_dict)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: tuple[int, int], qkv_bias: bool,
                 proj_bias: bool, attn_drop: float, proj_drop: float, locality_strength: float, maps: bool) -> None:
        super().__init__(maps)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim**-0.5
        self.locality_strength = locality_strength
        inner = num_heads * head_dim
        self.qk = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("rel_indices", relative_offsets(*grid), persistent=False)
        self._position_cache: tuple[tuple[object, ...], tuple[Tensor, Tensor]] | None = None

    def init_weights(self) -> None:
        """timm's ``GPSA.local_init``: v starts as the identity, and head ``h1 + k*h2`` of the first k*k heads
        (k = floor(sqrt(heads))) prefers the offset (h1, h2) around the centre: logits -|r - offset|²."""
        with torch.no_grad():
            nn.init.eye_(self.v.weight)
            kernel = int(self.num_heads**0.5)
            center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
            for h1 in range(kernel):
                for h2 in range(kernel):
                    head = h1 + kernel * h2
                    self.pos_proj.weight[head, 2] = -1
                    self.pos_proj.weight[head, 1] = 2 * (h1 - center)
                    self.pos_proj.weight[head, 0] = 2 * (h2 - center)
            self.pos_proj.weight.mul_(self.locality_strength)

    def attention(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, heads, N, N)
        qk = self.qk(x).unflatten(-1, (2, self.num_heads, self.head_dim))  # (B, N, 2, heads, d)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, d)
        # timm scales the product after q kᵀ; the order matters for exact parity
        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
        content_share, gated_position = self.gated_position()
        attn = content_share * content + gated_position
        attn = attn / attn.sum(dim=-1, keepdim=True)
        return self.attn_drop(attn)

    def gated_position(self) -> tuple[Tensor, Tensor]:  # (1, heads, 1, 1), (1, heads, N, N)
        """``(1 - gate, gate * positional attention)``: what the block mixes into the content attention, which
        depends on no input. Without autograd (inference) it is kept until ``pos_proj`` or the gate changes
        (:func:`~metaformer_lab.ops.common.inference_key`): the positional softmax over N x N offsets, about a
        third of a ConViT block's time at 224x224, runs once instead of on every call."""
        key = inference_key(self.pos_proj.weight, self.pos_proj.bias, self.gating_param, self.rel_indices)
        if key is not None and self._position_cache is not None and self._position_cache[0] == key:
            return self._position_cache[1]
        position = self.pos_proj(self.rel_indices).permute(0, 3, 1, 2).softmax(dim=-1)  # (1, heads, N, N)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)  # (1, heads, 1, 1)
        mixed = (1.0 - gate, gate * position)
        self._position_cache = None if key is None else (key, mixed)
        return mixed

    def mix(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        v = self.v(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, d)
        y = (self.attention(x) @ v).transpose(1, 2).flatten(2)  # (B, heads, N, d) -> (B, N, heads*d)
        return self.proj_drop(self.proj(y))


def gpsa_shape(spec: GpsaSpec, x: TensorType, out_dim: int | None) -> tuple[TensorType, Settings]:
    require_layout(x, "maps", "tokens", op="gpsa")
    require_no_prefix(x, op="gpsa")
    num_heads, head_dim = resolve_heads(spec.num_heads, spec.head_dim, x.channels)
    return x, {"num_heads": num_heads, "head_dim": head_dim}


def _build_gpsa(spec: GpsaSpec, r: Resolved) -> GatedPositionalSelfAttention:
    x = r.in_type
    num_heads, head_dim = r["num_heads"], r["head_dim"]
    return GatedPositionalSelfAttention(x.channels, num_heads=num_heads, head_dim=head_dim, grid=x.grid,
                                        qkv_bias=spec.qkv_bias, proj_bias=spec.proj_bias, attn_drop=spec.attn_drop,
                                        proj_drop=spec.proj_drop, locality_strength=spec.locality_strength,
                                        maps=x.layout == "maps")


def fold_gpsa(module: nn.Module) -> Folding | None:
    """qk and v read the input, proj writes the output."""
    if isinstance(module, GatedPositionalSelfAttention):
        return Folding(reads=(module.qk, module.v), writes=module.proj)
    return None


GPSA = OpDef(
    GpsaSpec,
    infer=gpsa_shape,
    build=_build_gpsa,
    preserves_type=True,
    fold=fold_gpsa,
    cases=(
        Case({"num_heads": 4, "head_dim": None}, TensorType("tokens", 16, 4, 4), id="convit"),
        Case({"num_heads": 9, "head_dim": 4, "qkv_bias": True, "locality_strength": 2.0},
             TensorType("maps", 16, 3, 5), id="maps-rect"),
    ),
)
