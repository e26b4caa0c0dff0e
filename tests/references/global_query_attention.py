"""Slow reference of ``global_query_attention`` (GC-ViT's global self-attention): the query generator written out
with functional convs, squeeze-excitation and max pools, then one image, one window and one head at a time:
``softmax(q kᵀ / sqrt(d) + bias) v`` with ``q`` the image's generated window (its channels split into heads),
``k`` and ``v`` from the window's tokens, ``bias`` read from the relative position table at each query - key
offset. Computed from the built module's parameters (``OP``, ``SPEC``, ``INPUT``: see
``benchmarks/attention_ops.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "global_query_attention"
SPEC = {"num_heads": 2, "window": 7}
INPUT = TensorType("tokens", 64, 28, 28)


def _mbconv(block: nn.Module, x: Tensor) -> Tensor:  # (1, C, H, W): x + pw(se(gelu(dw(x))))
    h = F.gelu(F.conv2d(x, block.conv_dw.weight, padding=1, groups=x.shape[1]))
    s = h.mean(dim=(2, 3), keepdim=True)
    s = torch.sigmoid(F.conv2d(F.gelu(F.conv2d(s, block.se.fc1.weight)), block.se.fc2.weight))
    return x + F.conv2d(h * s, block.conv_pw.weight)


def _generate(generator: nn.Module, context: Tensor) -> Tensor:  # (1, H, W, C) -> (w, w, C)
    q = context.permute(0, 3, 1, 2)
    for name, part in generator.blocks.named_children():
        q = _mbconv(part, q) if name.startswith("conv") else F.max_pool2d(q, 3, 2, 1)
    return q[0].permute(1, 2, 0)


def reference(module: nn.Module, x: Tensor, context: Tensor | None = None,
              generator: nn.Module | None = None) -> Tensor:
    """(B, H, W, C) -> (B, H, W, C'); ``context`` (B, H, W, C): what the generator (default: the module's own)
    reads (None: ``x``)."""
    generator = module.global_block if generator is None else generator
    B, H, W, C = x.shape
    w, heads, d = module.window, module.num_heads, module.head_dim
    context = x if context is None else context
    table = module.relative_position_bias_table
    wk, wv = module.qkv.weight[:C], module.qkv.weight[C:]
    bk, bv = (module.qkv.bias[:C], module.qkv.bias[C:]) if module.qkv.bias is not None else (None, None)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    coords = [(i, j) for i in range(w) for j in range(w)]
    bias = torch.zeros(heads, w * w, w * w, dtype=x.dtype)  # per head: the table at each query - key offset
    if table is not None:
        for h in range(heads):
            for n, (qi, qj) in enumerate(coords):
                for m, (ki, kj) in enumerate(coords):
                    bias[h, n, m] = table[(qi - ki + w - 1) * (2 * w - 1) + (qj - kj + w - 1), h]
    for b in range(B):
        q = _generate(generator, context[b:b + 1]).reshape(w * w, C)  # (w*w, C)
        for r in range(0, H, w):
            for c in range(0, W, w):
                tokens = x[b, r:r + w, c:c + w].reshape(w * w, C)
                k, v = F.linear(tokens, wk, bk), F.linear(tokens, wv, bv)
                for h in range(heads):
                    part = slice(h * d, (h + 1) * d)
                    logits = q[:, part] @ k[:, part].T * d**-0.5 + bias[h]  # (w*w, w*w)
                    out[b, r:r + w, c:c + w, part] = (logits.softmax(dim=-1) @ v[:, part]).reshape(w, w, d)
    return module.proj(out)
