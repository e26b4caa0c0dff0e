"""Slow reference of ``agent_attention``: the authors' ``AgentAttention`` written out window by window and head by
head, agents as explicit means over adaptive-pool cells, softmaxes spelled out; parameters read from the built
module (``qkv`` or ``q``/``kv``/``sr``/``norm``, ``dwc``, ``proj`` and the six biases)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "agent_attention"
SPEC = {"agents": 49, "num_heads": 2}
INPUT = TensorType("tokens", 64, 28, 28)


def _cells(size: int, out: int) -> list[tuple[int, int]]:
    """The [start, end) spans of nn.AdaptiveAvgPool's ``out`` cells over ``size``."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _agents(q: Tensor, grid: tuple[int, int], agents: int) -> Tensor:  # (N, C) -> (A, C)
    side = math.isqrt(agents)
    qmap = q.reshape(*grid, -1)
    return torch.stack([qmap[r0:r1, c0:c1].reshape(-1, q.shape[-1]).mean(0)
                        for r0, r1 in _cells(grid[0], side) for c0, c1 in _cells(grid[1], side)])


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | float) -> Tensor:
    logits = (q * q.shape[-1] ** -0.5) @ k.T + bias
    weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
    return weights @ v


def _one(m: nn.Module, x: Tensor) -> Tensor:  # one window (or the whole map) of one image: (h, w, C) -> (h, w, C')
    h, w, C = x.shape
    heads, d, A = m.num_heads, m.head_dim, m.agents
    tokens = x.reshape(h * w, C)
    if m.qkv is not None:
        q, k, v = m.qkv(tokens).chunk(3, dim=-1)
        kgrid = (h, w)
    else:
        small = m.sr(x.permute(2, 0, 1)[None])[0].permute(1, 2, 0)  # (kh, kw, C)
        small = m.norm(small)
        kgrid = small.shape[:2]
        q = m.q(tokens)
        k, v = m.kv(small.reshape(-1, C)).chunk(2, dim=-1)
    agents = _agents(q, (h, w), A)
    out = []
    for head in range(heads):
        part = slice(head * d, (head + 1) * d)
        if m.an_bias is not None:
            to_keys = F.interpolate(m.an_bias[head][None], size=kgrid, mode="bilinear")[0].reshape(A, -1) \
                + (m.ah_bias[0, head] + m.aw_bias[0, head]).reshape(A, -1)
            to_agents = F.interpolate(m.na_bias[head][None], size=(h, w), mode="bilinear")[0].reshape(A, -1).T \
                + (m.ha_bias[0, head] + m.wa_bias[0, head]).reshape(-1, A)
        else:
            to_keys = to_agents = 0.0
        agent_v = _softmax_attention(agents[:, part], k[:, part], v[:, part], to_keys)  # (A, d)
        out.append(_softmax_attention(q[:, part], agents[:, part], agent_v, to_agents))  # (N, d)
    y = torch.cat(out, dim=-1)  # (N, inner)
    if m.dwc is not None:
        values = v.T.reshape(1, -1, *kgrid)
        if tuple(kgrid) != (h, w):
            values = F.interpolate(values, size=(h, w), mode="bilinear")
        y = y + m.dwc(values)[0].reshape(y.shape[1], -1).T
    return m.proj(y).reshape(h, w, -1)


def reference(module: nn.Module, x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, H, W, C'), one image and one window at a time."""
    B, H, W, _ = x.shape
    side = module.window or H
    sidew = module.window or W
    rows = []
    for b in range(B):
        image = torch.zeros(H, W, module.proj.out_features)
        for i in range(0, H, side):
            for j in range(0, W, sidew):
                image[i:i + side, j:j + sidew] = _one(module, x[b, i:i + side, j:j + sidew])
        rows.append(image)
    return torch.stack(rows)
