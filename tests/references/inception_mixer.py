"""The inception mixer (iFormer's ``Mixer``) written out slowly: the channel split by hand, the average pool region
by region, the attention head by head with an explicit softmax, the nearest upsampling by index, the GELUs and
convs one branch at a time, from the built module's parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "inception_mixer"
SPEC = {"num_heads": 3, "attention_heads": 1, "pool_size": 2}
INPUT = TensorType("tokens", 96, 28, 28)


def _avg_pool(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H / p, W / p), each output the mean of its p x p region."""
    B, C, H, W = x.shape
    out = x.new_zeros(B, C, H // p, W // p)
    for i in range(H // p):
        for j in range(W // p):
            out[:, :, i, j] = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].mean(dim=(2, 3))
    return out


def _low(module: nn.Module, x: Tensor) -> Tensor:
    """Attention over the pooled grid, head by head; each head's output channels are head * d + i."""
    low = module.low_mixer
    p, heads = low.pool_size, low.num_heads
    B, C, H, W = x.shape
    small = _avg_pool(x, p) if p > 1 else x
    tokens = small.flatten(2).transpose(1, 2)  # (B, N, C)
    qkv = F.linear(tokens, low.qkv.weight, low.qkv.bias)  # (B, N, 3C): q, k, v each C wide, head after head
    d = C // heads
    outs = []
    for h in range(heads):
        q = qkv[..., h * d:(h + 1) * d]
        k = qkv[..., C + h * d:C + (h + 1) * d]
        v = qkv[..., 2 * C + h * d:2 * C + (h + 1) * d]
        attn = torch.softmax(q @ k.transpose(1, 2) * d**-0.5, dim=-1)  # (B, N, N)
        outs.append(attn @ v)  # (B, N, d)
    y = torch.cat(outs, dim=-1).transpose(1, 2).reshape(B, C, H // p, W // p)
    rows = torch.arange(H) // p
    cols = torch.arange(W) // p
    return y[:, :, rows][:, :, :, cols]  # nearest upsampling: pixel (i, j) takes pooled cell (i // p, j // p)


def reference(module: nn.Module, x: Tensor) -> Tensor:
    if module.channels_last:
        x = x.permute(0, 3, 1, 2)
    high, low = module.high_dim, module.low_dim
    hm = module.high_mixer
    half = high // 2
    k = hm.proj1.kernel_size[0]
    cx, px, lx = x[:, :half], x[:, half:high], x[:, high:high + low]
    cx = F.conv2d(cx, hm.conv1.weight)  # 1x1, no bias, doubles the half
    cx = F.gelu(F.conv2d(cx, hm.proj1.weight, padding=k // 2, groups=2 * half))  # depthwise, no bias
    px = F.max_pool2d(px, k, stride=1, padding=k // 2)
    px = F.gelu(F.conv2d(px, hm.proj2.weight, hm.proj2.bias))
    y = torch.cat([cx, px, _low(module, lx)], dim=1)
    y = y + F.conv2d(y, module.conv_fuse.weight, padding=1, groups=y.shape[1])
    y = F.conv2d(y, module.proj.weight, module.proj.bias)
    return y.permute(0, 2, 3, 1) if module.channels_last else y
