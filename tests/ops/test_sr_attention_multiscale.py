"""sr_attention's multi-scale heads (``sr_ratios``: Shunted self-attention, Ren et al. 2022) against a slow
reference written here (float64, one head group at a time, the authors' ``SSA.Attention`` maths: group g's keys
and values from its own strided conv, norm, GELU and kv Linear, its values plus their depthwise conv); the GELU
after the reduction (``sr_act``); shape rules."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed
from torch import Tensor

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.sr_attention import MultiScaleSrAttention, SrAttention

TOL = 1e-5
B = 2

_op = partial(build_op, TOKEN_MIXERS)


def naive_multiscale(m: MultiScaleSrAttention, x: Tensor, add_to_values: bool) -> Tensor:
    """(B, H, W, C) -> (B, H, W, C) on a float64 copy, one group and one head at a time, explicit softmax."""
    m = copy.deepcopy(m).double()
    x = x.double()
    B_, H, W, C = x.shape
    tokens = x.reshape(B_, H * W, C)
    q = tokens @ m.q.weight.T + m.q.bias  # (B, N, inner)
    d, g_heads = m.head_dim, m.group_heads
    outs = []
    for g, scale in enumerate(m.scales):
        s = scale.sr.stride[0]
        small = F.conv2d(x.permute(0, 3, 1, 2), scale.sr.weight, scale.sr.bias, stride=s)  # (B, C, h, w)
        h, w = small.shape[2:]
        small = scale.act(scale.norm(small.flatten(2).transpose(1, 2)))  # (B, h*w, C)
        kv = small @ scale.kv.weight.T + scale.kv.bias  # (B, h*w, 2 * g_heads * d): k then v
        width = g_heads * d
        k, v = kv[..., :width], kv[..., width:]
        local = 0
        if scale.local_conv is not None:
            conv = scale.local_conv
            local = F.conv2d(v.transpose(1, 2).reshape(B_, width, h, w), conv.weight, conv.bias,
                             padding=conv.padding, groups=width).flatten(2).transpose(1, 2)
            if add_to_values:
                v, local = v + local, 0
        for head in range(g_heads):
            part = slice(head * d, (head + 1) * d)
            qh = q[..., (g * g_heads + head) * d:(g * g_heads + head + 1) * d]
            logits = (qh @ k[..., part].transpose(1, 2)) * d**-0.5  # (B, N, h*w)
            attn = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
            outs.append(attn @ v[..., part] + (local[..., part] if torch.is_tensor(local) else 0))
    y = torch.cat(outs, dim=-1) @ m.proj.weight.T + m.proj.bias
    return y.reshape(B_, H, W, -1).float()


_REFERENCE = [
    pytest.param({"sr_ratios": [4, 2], "sr_act": True, "num_heads": 2, "local_conv": 3, "local_conv_add": "value"},
                 (8, 4), True, id="shunted-stage1"),
    pytest.param({"sr_ratios": [2, 1], "sr_act": True, "num_heads": 4, "local_conv": 3, "local_conv_add": "value",
                  "fused": False}, (4, 6), True, id="shunted-1x1"),
    pytest.param({"sr_ratios": [4, 2, 1], "num_heads": 3, "head_dim": 4}, (4, 4), False, id="three-scales"),
    pytest.param({"sr_ratios": [1, 1], "num_heads": 2, "local_conv": 3}, (3, 3), False, id="local-conv-output"),
]


@pytest.mark.parametrize(("config", "grid", "to_values"), _REFERENCE)
def test_multiscale_heads_match_the_slow_reference(config: dict[str, Any], grid: tuple[int, int],
                                                   to_values: bool) -> None:
    x_type = TensorType("tokens", 24, *grid)
    m = perturbed(_op("sr_attention", {"qkv_bias": True, **config}, x_type))
    assert isinstance(m, MultiScaleSrAttention)
    x = torch.randn(x_type.shape(B))
    assert max_diff(m(x), naive_multiscale(m, x, to_values)) <= TOL


def test_multiscale_parameters_are_the_authors() -> None:
    """Shunted at sr 8: a q and a proj of C x C, two full reductions (8x8, 4x4) with norms, two kv Linears of
    C -> C (half-width k and v), two depthwise convs of C / 2 channels."""
    C = 64
    m = _op("sr_attention", {"sr_ratios": [8, 4], "sr_act": True, "num_heads": 2, "local_conv": 3,
                             "local_conv_add": "value"}, TensorType("tokens", C, 16, 16))
    expected = 2 * (C * C + C) + (C * C * 64 + C) + (C * C * 16 + C) + 2 * 2 * C + 2 * (C * C + C) + 2 * (C // 2 * 10)
    assert sum(p.numel() for p in m.parameters()) == expected


def test_sr_act_adds_a_gelu_after_the_norm_and_defaults_to_none() -> None:
    x_type = TensorType("tokens", 16, 4, 4)
    plain = _op("sr_attention", {"sr_ratio": 2, "num_heads": 2}, x_type)
    act = _op("sr_attention", {"sr_ratio": 2, "num_heads": 2, "sr_act": True}, x_type)
    assert isinstance(plain, SrAttention) and isinstance(plain.act, torch.nn.Identity)
    assert isinstance(act.act, torch.nn.GELU)
    pool = _op("sr_attention", {"reduction": "pool", "pool_size": 2, "num_heads": 2}, x_type)
    assert isinstance(pool.act, torch.nn.GELU)  # PVTv2-li's, as before


_TOK = TensorType("tokens", 64, 8, 8)
_BAD = [
    ({"sr_ratios": [8, 3], "num_heads": 2}, _TOK, "sr_ratios", "3 does not divide the 8x8 feature map"),
    ({"sr_ratios": [2, 1], "num_heads": 3}, TensorType("tokens", 48, 8, 8), "sr_ratios",
     "2 scales do not split 3 heads evenly"),
    ({"sr_ratios": [2, 1], "num_heads": 2}, TensorType("tokens", 64, 8, 8, prefix=1), "sr_ratios", "prefix"),
    ({"sr_ratios": [2, 1], "num_heads": 2, "reduction": "avgpool"}, _TOK, "reduction", "take reduction conv"),
    ({"sr_ratios": [2, 1], "num_heads": 2, "pos_bias": "block"}, _TOK, "pos_bias", "take pos_bias None"),
    ({"sr_ratios": [2, 1], "num_heads": 2, "local_conv": 3}, _TOK, "local_conv_add", "use value"),
]


@pytest.mark.parametrize(("config", "x_type", "field", "message"), _BAD)
def test_bad_multiscale_configs_name_the_field(config: dict[str, Any], x_type: TensorType, field: str,
                                               message: str) -> None:
    with pytest.raises(ShapeIssue, match=message) as info:
        _op("sr_attention", config, x_type)
    assert info.value.field == field
