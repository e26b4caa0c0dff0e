"""Slow reference of ``dilated_attention`` (DilateFormer's multi-scale dilated attention), written out per head
and per query: head h belongs to group h // (heads / groups), whose dilation spaces the query's kernel x kernel
neighbourhood; neighbours outside the grid are zero keys and zero values that stay in the softmax (the authors'
``nn.Unfold`` zero padding)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "dilated_attention"
SPEC = {"num_heads": 6, "kernel": 3, "dilations": [1, 2, 3]}
INPUT = TensorType("tokens", 96, 28, 28)  # DilateFormer-T's stage 2 has 144 channels, 6 heads at 28x28


def reference(module: nn.Module, x: Tensor) -> Tensor:
    """``module`` (a built ``DilatedAttention``) applied to ``x`` (B, H, W, C) tokens or (B, C, H, W) maps."""
    tokens = module.channels_last
    maps = x.permute(0, 3, 1, 2) if tokens else x
    B, _, H, W = maps.shape
    heads, d, k = module.num_heads, module.head_dim, module.kernel
    per_group = heads // len(module.dilations)
    weight = module.qkv.weight[:, :, 0, 0]
    bias = module.qkv.bias
    qkv = torch.einsum("oc,bchw->bohw", weight, maps)
    if bias is not None:
        qkv = qkv + bias.view(1, -1, 1, 1)
    q, key, value = qkv.chunk(3, dim=1)  # (B, heads*d, H, W), head h's channels h*d .. (h+1)*d
    out = torch.zeros(B, H, W, heads * d, dtype=x.dtype)
    for h in range(heads):
        dilation = module.dilations[h // per_group]
        channels = slice(h * d, (h + 1) * d)
        for y in range(H):
            for x_ in range(W):
                keys, values = [], []
                for i in range(k):
                    for j in range(k):
                        yy, xx = y + (i - k // 2) * dilation, x_ + (j - k // 2) * dilation
                        if 0 <= yy < H and 0 <= xx < W:
                            keys.append(key[:, channels, yy, xx])
                            values.append(value[:, channels, yy, xx])
                        else:  # zero padding: a zero key (logit 0) and a zero value, still in the softmax
                            keys.append(torch.zeros(B, d, dtype=x.dtype))
                            values.append(torch.zeros(B, d, dtype=x.dtype))
                logits = torch.einsum("bd,bnd->bn", q[:, channels, y, x_], torch.stack(keys, 1)) * d**-0.5
                out[:, y, x_, channels] = torch.einsum("bn,bnd->bd", logits.softmax(-1), torch.stack(values, 1))
    y = module.proj(out)  # (B, H, W, C)
    return y if tokens else y.permute(0, 3, 1, 2)
