"""Slow reference of ``scale_aware_modulation`` (SMT's scale-aware modulation), written out from the paper and the
authors' ``Attention.forward`` (``ca_attention=1``): per head a depthwise conv summed tap by tap, the heads'
channels regrouped by hand (group g = channel g of every head), the aggregation one group at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "scale_aware_modulation"
SPEC = {"num_heads": 4, "kernel": 3, "kernel_step": 2, "expand_ratio": 2}
INPUT = TensorType("tokens", 64, 28, 28)


def _linear(x: Tensor, layer: nn.Module) -> Tensor:
    """A Linear or 1x1 conv applied to channels-last x (B, H, W, C)."""
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    out = torch.einsum("bhwc,oc->bhwo", x, weight)
    return out if layer.bias is None else out + layer.bias


def _depthwise(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Same-padded depthwise conv of x (B, c, H, W), summed over the kernel taps."""
    k = conv.kernel_size[0]
    H, W = x.shape[-2:]
    padded = F.pad(x, (k // 2,) * 4)
    out = torch.zeros_like(x) + conv.bias.view(1, -1, 1, 1)
    for dy in range(k):
        for dx in range(k):
            out = out + padded[:, :, dy:dy + H, dx:dx + W] * conv.weight[:, 0, dy, dx].view(1, -1, 1, 1)
    return out


def _norm(x: Tensor, norm: nn.Module) -> Tensor:
    """BatchNorm written out (batch statistics in training, running ones in eval); any other norm as it is."""
    if not isinstance(norm, nn.BatchNorm2d):
        return norm(x)
    if norm.training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = norm.running_mean, norm.running_var
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + norm.eps).sqrt() * norm.weight.view(shape) \
        + norm.bias.view(shape)


def reference(module: nn.Module, x: Tensor) -> Tensor:
    """The op's output for x in the module's layout (tokens (B, H, W, C) or maps (B, C, H, W))."""
    maps = not module.channels_last
    tokens = x.permute(0, 2, 3, 1) if maps else x  # (B, H, W, C)
    C = tokens.shape[-1]
    heads = len(module.local_conv)
    d = C // heads
    v = _linear(tokens, module.v)
    s = _linear(tokens, module.s).permute(0, 3, 1, 2)  # (B, C, H, W)
    convolved = [_depthwise(s[:, i * d:(i + 1) * d], module.local_conv[i]) for i in range(heads)]  # head i: d chans
    per_group = module.proj0.out_channels // d  # heads * expand_ratio outputs per group
    weight, bias = module.proj0.weight[:, :, 0, 0], module.proj0.bias  # (C * e, heads)
    hidden = []
    for g in range(d):  # group g reads channel g of every head
        inputs = torch.stack([convolved[i][:, g] for i in range(heads)], dim=1)  # (B, heads, H, W)
        rows = slice(g * per_group, (g + 1) * per_group)
        hidden.append(torch.einsum("bihw,oi->bohw", inputs, weight[rows]) + bias[rows].view(1, -1, 1, 1))
    h = module.act(_norm(torch.cat(hidden, dim=1), module.bn))
    modulator = _linear(h.permute(0, 2, 3, 1), module.proj1)  # (B, H, W, C)
    out = _linear(modulator * v, module.proj)
    return out.permute(0, 3, 1, 2) if maps else out
