"""CMT's pieces (Guo et al. 2022; huawei-noah/Efficient-AI-Backbones cmt_pytorch/cmt.py) against references written
here in plain torch: sr_attention's learned position bias (``relative_pos``, one table per stage: tied by the
compiler, counted once by the cost model), the IRFFN's BatchNorms in conv_ffn, and conv_mlp_head on tokens."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, perturbed
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.ops import CHANNEL_MIXERS, HEADS, TOKEN_MIXERS

_mixer = partial(build_op, TOKEN_MIXERS)
DIM = 16
CMT_ATTN = {"type": "sr_attention", "num_heads": 2, "head_dim": None, "sr_ratio": 2, "reduction": "dwconv",
            "norm": {"type": "batchnorm"}, "pos_bias": "stage"}


def _cmt_attention(m: nn.Module, x: Tensor) -> Tensor:
    """CMT's ``Attention.forward`` with ``relative_pos``: (B, H, W, C) -> same; our q, kv, sr, norm, pos_bias."""
    b, h, w, c = x.shape
    heads, d = m.num_heads, c // m.num_heads
    tokens = x.flatten(1, 2)  # (B, N, C)
    q = m.q(tokens).reshape(b, -1, heads, d).transpose(1, 2)
    small = m.norm(m.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)).flatten(1, 2)  # (B, M, C)
    k, v = m.kv(small).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * d ** -0.5 + m.pos_bias).softmax(-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(b, h, w, c))


@pytest.mark.parametrize("fused", [True, False])
def test_position_bias_is_added_to_the_logits_as_cmt_does(fused: bool) -> None:
    m = perturbed(_mixer("sr_attention", {**CMT_ATTN, "fused": fused}, TensorType("tokens", DIM, 4, 6)))
    assert m.pos_bias.shape == (2, 24, 6)
    x = torch.randn(2, 4, 6, DIM)
    with torch.no_grad():
        assert max_diff(m(x), _cmt_attention(m, x)) < 1e-5


def _net(pos_bias: str, depth: int = 3) -> dict[str, Any]:
    block = {"base": "cmt", "steps": {"attn": {"token_mixer": {"num_heads": 2, "sr_ratio": 2, "pos_bias": pos_bias}},
                                      "mlp": {"channel_mixer": {"ratio": 2.0}}}}
    return {"name": "cmt_bias", "input": {"size": 32}, "num_classes": 5, "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": depth, "dim": DIM, "layout": "tokens", "block": block},
                       {"depth": 2, "dim": 32, "layout": "tokens", "block": block,
                        "downsample": {"type": "conv", "kernel": 2, "stride": 2}}]}


def test_a_stage_shares_one_position_bias_table_and_counts_it_once() -> None:
    graph = ml.to_graph(_net("stage"))
    net = ml.build(graph)
    tables = [blk.attn.pos_bias for stage in net.stages for blk in stage.blocks]
    assert all(t is tables[0] for t in tables[:3]) and all(t is tables[3] for t in tables[3:])
    assert tables[0] is not tables[3]
    assert graph_cost(graph).params == sum(p.numel() for p in net.parameters())
    per_block = ml.to_graph(_net("block"))
    surplus = 2 * 2 * 64 * 16 + 1 * 2 * 16 * 4  # stage 0: two more 2x64x16 tables; stage 1: one more 2x16x4
    assert graph_cost(per_block).params == graph_cost(graph).params + surplus
    assert graph_cost(per_block).params == sum(p.numel() for p in ml.build(per_block).parameters())


def test_a_shared_table_trains_as_one_and_deploys() -> None:
    net = perturbed(ml.build(_net("stage")))
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = [blk.attn.pos_bias.grad for blk in net.stages[0].blocks]
    assert grads[0] is not None and all(g is grads[0] for g in grads)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ml.deploy(net)(x), net(x)) < 1e-4


def test_a_position_bias_needs_a_grid_without_prefix_tokens() -> None:
    spec = _net("block", depth=1)
    spec["stages"][0]["prefix_tokens"] = 1
    spec["head"] = {"type": "class_token", "tokens": [0]}
    spec["stages"] = spec["stages"][:1]
    with pytest.raises(SpecError, match="pos_bias"):
        ml.to_graph(spec)


class _Irffn(nn.Module):
    """CMT's ``Mlp`` (the IRFFN) on (B, C, H, W), loaded from our conv_ffn's modules."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.ours = ours

    def forward(self, x: Tensor) -> Tensor:
        o = self.ours
        w1 = o.fc1.weight[:, :, None, None] if o.fc1.weight.dim() == 2 else o.fc1.weight
        w2 = o.fc2.weight[:, :, None, None] if o.fc2.weight.dim() == 2 else o.fc2.weight
        norms = [o.hidden_norm, o.dw_norm, o.out_norm]

        def norm(i: int, t: Tensor) -> Tensor:  # an eval-mode BatchNorm2d
            n = getattr(norms[i], "bn", norms[i])
            return nn.functional.batch_norm(t, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)

        y = norm(0, nn.functional.gelu(nn.functional.conv2d(x, w1, o.fc1.bias)))
        y = norm(1, nn.functional.gelu(o.dwconv(y) + y))
        return norm(2, nn.functional.conv2d(y, w2, o.fc2.bias))


IRFFN = {"ratio": 3.6, "hidden_act": "gelu", "hidden_norm": {"type": "batchnorm"}, "dw_residual": True,
         "act": "gelu", "dw_norm": {"type": "batchnorm"}, "out_norm": {"type": "batchnorm"}}


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_conv_ffn_with_norms_is_cmts_irffn(layout: str) -> None:
    m = perturbed(build_op(CHANNEL_MIXERS, "conv_ffn", IRFFN, TensorType(layout, DIM, 5, 4)))
    maps = torch.randn(2, DIM, 5, 4)
    x = maps.permute(0, 2, 3, 1) if layout == "tokens" else maps
    with torch.no_grad():
        y = m(x)
        y = y.permute(0, 3, 1, 2) if layout == "tokens" else y
        assert max_diff(y, _Irffn(m)(maps)) < 1e-5


def test_conv_mlp_head_on_tokens_is_the_head_on_the_map() -> None:
    config = {"conv_dim": 24, "conv_bias": True, "act": "silu"}
    on_tokens = perturbed(build_op(HEADS, "conv_mlp_head", config, TensorType("tokens", DIM, 3, 4), 7))
    on_maps = build_op(HEADS, "conv_mlp_head", config, TensorType("maps", DIM, 3, 4), 7)
    on_maps.load_state_dict(on_tokens.state_dict())
    maps = torch.randn(2, DIM, 3, 4)
    with torch.no_grad():
        assert max_diff(on_tokens(maps.permute(0, 2, 3, 1)), on_maps(maps)) < 1e-6
