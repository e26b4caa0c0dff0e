"""Bi-level routing attention written out region by region and head by head (BiFormer's
``BiLevelRoutingAttention``, the authors' ``ops/bra_legacy.py``, with ``kv_downsample_mode='identity'``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "routing_attention"
SPEC = {"regions": 7, "topk": 4, "num_heads": 2}  # BiFormer-T's stage 2 at 28x28: 4x4-token regions
INPUT = TensorType("tokens", 64, 28, 28)


def reference(module: nn.Module, x: Tensor) -> Tensor:
    """The op's output from ``module``'s parameters: every region's mean query against every region's mean key
    picks the top-k regions; each head of each query token of the region attends to the tokens of those regions
    (scaled, optionally weighted by the routing softmax); the depthwise conv of the value map is added, then wo."""
    maps = module.maps
    if maps:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    B, H, W, C = x.shape
    S, qk, heads = module.regions, module.qk_dim, module.num_heads
    Hp, Wp = -(-H // S) * S, -(-W // S) * S
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zeros at the bottom and right (auto_pad)
    h, w = Hp // S, Wp // S
    qkv = x @ module.qkv.weight.T + (module.qkv.bias if module.qkv.bias is not None else 0)  # (B, Hp, Wp, 2qk + C)
    q_all, k_all, v_all = qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:]
    out = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    cells = [(i, j) for i in range(S) for j in range(S)]  # region index row-major

    def tokens(t: Tensor, b: int, cell: tuple[int, int]) -> Tensor:  # the region's (h*w, c) tokens
        i, j = cell
        return t[b, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(h * w, -1)

    dq, dv = qk // heads, C // heads
    for b in range(B):
        q_win = torch.stack([tokens(q_all, b, c).mean(0) for c in cells])  # (S², qk)
        k_win = torch.stack([tokens(k_all, b, c).mean(0) for c in cells])
        if module.emb is not None:
            q_win, k_win = module.emb(q_win), module.emb(k_win)
        for r, cell in enumerate(cells):
            logits = torch.stack([(q_win[r] * module.scale) @ k_win[s] for s in range(S * S)])  # (S²,)
            top, chosen = torch.topk(logits, module.topk)
            weight = top.softmax(0)
            keys, values = [], []
            for n, s in enumerate(chosen.tolist()):
                factor = weight[n] if module.soft_routing else 1.0
                keys.append(tokens(k_all, b, cells[s]) * factor)
                values.append(tokens(v_all, b, cells[s]) * factor)
            k, v = torch.cat(keys), torch.cat(values)  # (topk*h*w, qk), (topk*h*w, C)
            q = tokens(q_all, b, cell)  # (h*w, qk)
            y = torch.cat([((q[:, m * dq:(m + 1) * dq] * module.scale) @ k[:, m * dq:(m + 1) * dq].T).softmax(-1)
                           @ v[:, m * dv:(m + 1) * dv] for m in range(heads)], dim=-1)  # (h*w, C), head-major
            i, j = cell
            out[b, i * h:(i + 1) * h, j * w:(j + 1) * w] = y.view(h, w, C)
    if module.lepe is not None:
        conv = module.lepe
        out = out + F.conv2d(v_all.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding,
                             groups=C).permute(0, 2, 3, 1)
    out = (out @ module.wo.weight.T + module.wo.bias)[:, :H, :W]
    return out.permute(0, 3, 1, 2) if maps else out
