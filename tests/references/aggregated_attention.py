"""Slow reference of ``aggregated_attention`` (TransNeXt's aggregated attention, Shi 2024): query by query and head
by head, each key written out (its neighbours inside the map, the pooled keys from explicit bin means), from the
built module's parameters (the authors' names)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "aggregated_attention"
SPEC = {"num_heads": 2, "window": 3, "pool_size": 7}
INPUT = TensorType("tokens", 64, 28, 28)


def _log_spaced(offset: float, extent: int) -> float:
    """The bias MLP's coordinate of a query - key offset on an axis of ``extent`` tokens."""
    r = offset / max(extent - 1, 1) * 8
    return math.copysign(math.log2(abs(r) + 1.0) / 3.0, r) if r else 0.0


def _bins(length: int, size: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's bins: [floor(i * L / S), ceil((i + 1) * L / S))."""
    return [(i * length // size, -(-(i + 1) * length // size)) for i in range(size)]


def _pooled(module: nn.Module, grid: Tensor) -> tuple[Tensor, list[tuple[float, float]]]:
    """(pooled tokens (P, C) after the 1x1 conv, GELU, bin means and LayerNorm, each key's bin centre)."""
    H, W, C = grid.shape
    conv = module.sr.weight[:, :, 0, 0]
    mapped = F.gelu(grid @ conv.t() + module.sr.bias)  # (H, W, C)
    tokens, centres = [], []
    for h0, h1 in _bins(H, module.pool_size):
        for w0, w1 in _bins(W, module.pool_size):
            tokens.append(mapped[h0:h1, w0:w1].mean(dim=(0, 1)))
            centres.append(((h0 + h1 - 1) / 2, (w0 + w1 - 1) / 2))
    pooled = torch.stack(tokens)
    return F.layer_norm(pooled, (C,), module.norm.weight, module.norm.bias, module.norm.eps), centres


def reference(module: nn.Module, x: Tensor) -> Tensor:
    """The op's output for (B, H, W, C) tokens: every query's keys gathered one by one, one softmax over them."""
    B, H, W, C = x.shape
    heads, d = module.num_heads, module.head_dim
    inner = heads * d
    temperature = F.softplus(module.temperature.view(heads))
    out = torch.zeros(B, H, W, inner)

    def biases(i: int, j: int, centres: list[tuple[float, float]]) -> Tensor:  # (keys, heads)
        c = torch.tensor([[_log_spaced(i - ch, H), _log_spaced(j - cw, W)] for ch, cw in centres])
        return module.cpb_fc2(torch.relu(module.cpb_fc1(c)))

    for b in range(B):
        grid = x[b]
        if module.pool_size is None:  # every token a key
            q_all, k_all, v_all = module.qkv(grid).split(inner, dim=-1)  # (H, W, inner) each
            k_keys, v_keys = k_all.reshape(H * W, inner), v_all.reshape(H * W, inner)
            centres = [(float(i), float(j)) for i in range(H) for j in range(W)]
        else:
            q_all = module.q(grid)
            k_all, v_all = module.kv(grid).split(inner, dim=-1)
            pooled, centres = _pooled(module, grid)
            k_keys, v_keys = module.kv(pooled).split(inner, dim=-1)  # (P, inner) each
        window = module.window or 0
        r = window // 2
        for i in range(H):
            for j in range(W):
                neighbours = [(a * window + c, i + a - r, j + c - r) for a in range(window) for c in range(window)]
                neighbours = [(slot, y, z) for slot, y, z in neighbours if 0 <= y < H and 0 <= z < W]
                seen = len(neighbours) + len(centres)
                key_bias = biases(i, j, centres)
                for h in range(heads):
                    part = slice(h * d, (h + 1) * d)
                    q_norm = F.normalize(q_all[i, j, part], dim=0)
                    q = (q_norm + module.query_embedding[h, 0]) * temperature[h] * math.log(seen)
                    logits, values, extra = [], [], []
                    for slot, y, z in neighbours:
                        logits.append(q @ F.normalize(k_all[y, z, part], dim=0)
                                      + module.relative_pos_bias_local[h, slot])
                        values.append(v_all[y, z, part])
                        extra.append(q_norm @ module.learnable_tokens[h, :, slot] + module.learnable_bias[h, 0, slot])
                    logits = torch.cat([torch.stack(logits) if logits else torch.zeros(0),
                                        F.normalize(k_keys[:, part], dim=-1) @ q + key_bias[:, h]])
                    weights = torch.softmax(logits, dim=0)
                    local = len(neighbours)
                    if local:
                        out[b, i, j, part] += (weights[:local] + torch.stack(extra)) @ torch.stack(values)
                    out[b, i, j, part] += weights[local:] @ v_keys[:, part]
    return module.proj(out)
