"""Slow reference of ``pooling_attention`` (MViT's multi-head pooling attention), written out head by head and
token by token from the built module's parameters: each head's q, k and v pooled on the grid output pixel by output
pixel (a depthwise kernel over the zero-padded, or for max -inf-padded, window), the prefix tokens kept, the norm,
then one query at a time against all keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaformer_lab.core.types import TensorType

OP = "pooling_attention"
SPEC = {"num_heads": 2, "q_stride": 2, "kv_stride": 2, "kernel": 3}
INPUT = TensorType("tokens", 96, 28, 28, prefix=1)


def _pool(module, t: Tensor, pool, norm) -> Tensor:
    """(heads, P + H*W, d) of one image -> (heads, P + h*w, d)."""
    if pool is None:
        return t
    P, (H, W) = module.prefix, module.grid
    heads, _, d = t.shape
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    k, s, p = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0]), (p if isinstance(p, int)
                                                                                        else p[0])
    h, w = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out = torch.zeros(heads, h * w, d)
    for head in range(heads):
        grid = t[head, P:].reshape(H, W, d)
        for i in range(h):
            for j in range(w):
                values, taps = [], []
                for a in range(k):
                    for b in range(k):
                        y, x = i * s - p + a, j * s - p + b
                        inside = 0 <= y < H and 0 <= x < W
                        values.append(grid[y, x] if inside else None)
                        taps.append((a, b))
                if isinstance(pool, torch.nn.Conv2d):
                    acc = torch.zeros(d)
                    for value, (a, b) in zip(values, taps, strict=True):
                        if value is not None:
                            acc = acc + pool.weight[:, 0, a, b] * value
                elif isinstance(pool, torch.nn.MaxPool2d):
                    acc = torch.stack([v for v in values if v is not None]).amax(0)
                else:  # AvgPool2d, count_include_pad: the zero padding counts
                    acc = sum((v for v in values if v is not None), torch.zeros(d)) / (k * k)
                out[head, i * w + j] = acc
    t = torch.cat([t[:, :P], out], dim=1)
    if norm is not None:
        t = F.layer_norm(t, (d,), norm.weight, norm.bias, norm.eps)
    return t


def _rel_pos(module, q: Tensor, n: int, m: int, q_grid: tuple[int, int], k_grid: tuple[int, int]) -> Tensor:
    """MViTv2's relative position term of query n and key m (one head's q: (d,)); zero for a prefix token."""
    P = module.prefix
    if module.rel_pos_h is None or n < P or m < P:
        return torch.zeros(())
    (i, j), (a, b) = divmod(n - P, q_grid[1]), divmod(m - P, k_grid[1])
    rows = []
    for qi, ki, qs, ks in ((i, a, q_grid[0], k_grid[0]), (j, b, q_grid[1], k_grid[1])):
        q_ratio, k_ratio = max(ks / qs, 1.0), max(qs / ks, 1.0)
        rows.append(int(qi * q_ratio - ki * k_ratio + (ks - 1) * k_ratio))
    return q @ module.rel_pos_h[rows[0]] + q @ module.rel_pos_w[rows[1]]


def reference(module, x: Tensor) -> Tensor:
    """The op's output for ``x`` ((B, P + H*W, C), or (B, H, W, C) without prefix tokens)."""
    P, heads, d = module.prefix, module.num_heads, module.head_dim
    tokens = x if P else x.flatten(1, 2)
    outs = []
    for image in tokens:
        qkv = image @ module.qkv.weight.T + (module.qkv.bias if module.qkv.bias is not None else 0)
        q, k, v = (qkv[:, n * heads * d:(n + 1) * heads * d].reshape(-1, heads, d).transpose(0, 1) for n in range(3))
        q = _pool(module, q, module.pool_q, module.norm_q)
        k = _pool(module, k, module.pool_k, module.norm_k)
        v = _pool(module, v, module.pool_v, module.norm_v)
        H, W = module.grid
        q_grid = (H // module.q_stride, W // module.q_stride)
        side = round(((k.shape[1] - P) * H / W) ** 0.5)  # the pooled key grid keeps the input's aspect
        k_grid = (side, (k.shape[1] - P) // side)
        rows = []
        for n in range(q.shape[1]):
            per_head = []
            for head in range(heads):
                logits = [q[head, n] @ k[head, m] * d**-0.5 + _rel_pos(module, q[head, n], n, m, q_grid, k_grid)
                          for m in range(k.shape[1])]
                weights = torch.softmax(torch.stack(logits), dim=0)
                y = (weights[:, None] * v[head]).sum(0)
                if module.residual_pooling and n >= P:
                    y = y + q[head, n]
                per_head.append(y)
            rows.append(torch.cat(per_head))
        outs.append(torch.stack(rows) @ module.proj.weight.T + module.proj.bias)
    y = torch.stack(outs)
    if P:
        return y
    H, W = module.grid
    return y.unflatten(1, (H // module.q_stride, W // module.q_stride))
