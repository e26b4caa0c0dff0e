"""Slow reference of ``focal_attention``: the authors' focal self-attention (Focal Transformer,
classification/focal_transformer.py ``WindowAttention`` + ``FocalTransformerBlock``'s pooling) written out window by
window and head by head, with their literal ``torch.roll``s and masks for the ring, their trim and pooling per
sub-window, and ``F.unfold`` for the pooled keys around each window."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaformer_lab.core.types import TensorType

OP = "focal_attention"
SPEC = {"num_heads": 2, "window": 7, "expand": 3, "focal_level": 2, "focal_window": 3}
INPUT = TensorType("tokens", 64, 28, 28)


def _ring_keys(t: Tensor, r: int, c: int, w: int, e: int) -> Tensor:  # (B, H, W, C) -> (B, ring, C)
    """The window's ring keys: t rolled by (-e, -e), (-e, e), (e, -e), (e, e), each window's tokens kept where the
    authors' masks (mask_tl, mask_tr, mask_bl, mask_br) are one."""
    out = []
    for sy, sx in ((-e, -e), (-e, e), (e, -e), (e, e)):
        rolled = torch.roll(t, shifts=(sy, sx), dims=(1, 2))[:, r * w:(r + 1) * w, c * w:(c + 1) * w]  # (B, w, w, C)
        keep = torch.ones(w, w, dtype=torch.bool)
        rows = slice(None, -e) if sy < 0 else slice(e, None)
        cols = slice(None, -e) if sx < 0 else slice(e, None)
        keep[rows, cols] = False
        out.append(rolled[:, keep])  # (B, kept, C), row-major
    return torch.cat(out, dim=1)


def _pool(module: nn.Module, x: Tensor, k: int) -> Tensor:  # (B, H, W, C) -> (B, nh, nw, C)
    """Level k + 1's pooled map: the map trimmed to whole sub-windows (the authors' trim_t / trim_b), then each
    sub-window pooled on its own."""
    w = module.window
    B, H, W, C = x.shape
    s = w // 2**k
    nh, nw = H // w * 2**k, W // w * 2**k
    top, left = (H - nh * s) // 2, (W - nw * s) // 2
    x = x[:, top:top + nh * s, left:left + nw * s]
    out = torch.zeros(B, nh, nw, C)
    for i in range(nh):
        for j in range(nw):
            cell = x[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(B, s * s, C)  # (B, s*s, C)
            if module.pool == "fc":
                fc = module.pool_layers[k]
                out[:, i, j] = (cell * fc.weight[0][None, :, None]).sum(1) + fc.bias
            elif module.pool == "mean":
                out[:, i, j] = cell.mean(1)
            elif module.pool == "max":
                out[:, i, j] = cell.max(1).values
            else:  # conv: depthwise s x s
                conv = module.pool_layers[k]
                out[:, i, j] = (cell * conv.weight.flatten(1).t()[None]).sum(1) + conv.bias
    return out


def _rel_index(w: int, keys: int) -> Tensor:
    """The authors' get_relative_position_index((w, w), (keys, keys)), loop by loop."""
    index = torch.zeros(w * w, keys * keys, dtype=torch.long)
    for qi in range(w * w):
        for ki in range(keys * keys):
            dy = qi // w - ki // keys + keys - 1
            dx = qi % w - ki % keys + keys - 1
            index[qi, ki] = dy * (w + keys - 1) + dx
    return index


def reference(module: nn.Module, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
    B, H, W, C = x.shape
    w, heads, d = module.window, module.num_heads, module.head_dim
    inner = heads * d
    e = module.expand
    q, k, v = module.qkv(x).split(inner, dim=-1)  # 3 x (B, H, W, inner)
    levels = []  # per pooled level: (k, v) unfolded (B, inner, K*K, L), inside mask (K*K, L), kept positions
    for lvl in range(module.focal_level - 1):
        pooled = _pool(module, x, lvl)  # (B, nh, nw, C)
        nh, nw = pooled.shape[1:3]
        _, kp, vp = module.qkv(pooled).split(inner, dim=-1)  # the authors run the whole qkv on the pooled map
        s = 2**lvl
        kernel = 2 * (module.focal_window // 2) + 2 * s - 1
        unfold = nn.Unfold(kernel_size=kernel, stride=s, padding=kernel // 2)
        ku, vu = (unfold(t.permute(0, 3, 1, 2)).view(B, inner, kernel * kernel, -1) for t in (kp, vp))
        inside = unfold(torch.ones(1, 1, nh, nw)).view(kernel * kernel, -1)
        keep = torch.zeros(kernel, kernel, dtype=torch.bool)
        keep[s - 1:, s - 1:] = True
        levels.append((ku, vu, inside, keep.flatten()))
    table = module.relative_position_bias_table
    out = torch.zeros(B, H, W, inner)
    for r in range(H // w):
        for c in range(W // w):
            win = (slice(None), slice(r * w, (r + 1) * w), slice(c * w, (c + 1) * w))
            keys, values = [k[win].reshape(B, w * w, inner)], [v[win].reshape(B, w * w, inner)]
            masks = [torch.zeros(w * w)]
            if e:
                keys.append(_ring_keys(k, r, c, w, e))
                values.append(_ring_keys(v, r, c, w, e))
                masks.append(torch.zeros(keys[-1].shape[1]))
            for ku, vu, inside, keep in levels:
                col = r * (W // w) + c
                keys.append(ku[:, :, keep, col].transpose(1, 2))
                values.append(vu[:, :, keep, col].transpose(1, 2))
                masks.append(torch.where(inside[keep, col] > 0, 0.0, -100.0))
            kk, vv, mask = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(masks)  # (B, N, inner), (N,)
            qq = q[win].reshape(B, w * w, inner)
            for h in range(heads):
                hs = slice(h * d, (h + 1) * d)
                attn = (qq[..., hs] * d**-0.5) @ kk[..., hs].transpose(1, 2)  # (B, w*w, N)
                a0 = w * w
                for i in range(w * w):
                    for j in range(w * w):
                        dy, dx = i // w - j // w + w - 1, i % w - j % w + w - 1
                        attn[:, i, j] = attn[:, i, j] + table[dy * (2 * w - 1) + dx, h]
                if e:
                    neighbors = module.relative_position_bias_table_to_neighbors[0, h]  # (w*w, ring)
                    attn[:, :, a0:a0 + neighbors.shape[1]] += neighbors
                    a0 += neighbors.shape[1]
                for lvl, table_k in enumerate(module.relative_position_bias_table_to_windows):
                    keys_k = module.focal_window + 2**lvl - 1
                    bias = table_k[h][_rel_index(w, keys_k)]  # (w*w, keys_k^2)
                    attn[:, :, a0:a0 + keys_k**2] += bias
                    a0 += keys_k**2
                attn = (attn + mask).softmax(dim=-1)
                y = attn @ vv[..., hs]  # (B, w*w, d)
                out[:, r * w:(r + 1) * w, c * w:(c + 1) * w, hs] = y.view(B, w, w, d)
    return module.proj(out)
