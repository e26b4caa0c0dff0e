"""CeiT's layer-wise class-token attention: a stage with ``collect_prefix`` (every block's prefix tokens in its
output, typed in the graph), and the ``layer_class_attention`` head against a hand-written LCA block (the authors'
``AttentionLCA`` + ``Block(feedforward_type='lca')``: a fused qkv, the query from the last token); the network's
forward, feature taps, costs, latency keys and deploy form; and what is refused."""

from __future__ import annotations

import pytest
import torch
from helpers import build_op
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.latency.keys import default_out_mem, walk_keys
from metaformer_lab.ops import HEADS
from metaformer_lab.ops.layer_class_attention import LayerClassAttentionHead

TOL = 1e-5


def _spec(**stage: object) -> dict[str, object]:
    return {"name": "lca", "input": {"channels": 3, "size": 32}, "num_classes": 10,
            "stem": {"type": "patchify", "patch": 8},
            "stages": [{"depth": 3, "dim": 32, "layout": "tokens", "prefix_tokens": 1, "pos_embed": {"type": "learned"},
                        "collect_prefix": True, "block": {"base": "vit", "token_mixer": {"num_heads": 2}}, **stage}],
            "head": {"type": "layer_class_attention", "num_heads": 2, "head_dim": None}}


def _lca_reference(head: LayerClassAttentionHead, tokens: Tensor, num_heads: int) -> Tensor:
    """The authors' LCA block on (B, T, C) with the head's weights: qkv fused as theirs, query from the last token."""
    b, t, c = tokens.shape
    x = tokens + head.layer_embed
    last = x[:, -1:]
    attn = head.attn
    qkv_w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])
    qkv_b = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias])
    h = head.norm1(x)
    q = nn.functional.linear(h[:, -1:], qkv_w[:c], qkv_b[:c]).reshape(b, 1, num_heads, -1).transpose(1, 2)
    kv = nn.functional.linear(h, qkv_w[c:], qkv_b[c:]).reshape(b, t, 2, num_heads, -1).permute(2, 0, 3, 1, 4)
    a = ((q @ kv[0].transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(-1)
    y = last + attn.proj((a @ kv[1]).transpose(1, 2).reshape(b, 1, c))
    y = y + head.mlp(head.norm2(y))
    return head.fc(head.norm(y[:, 0]))


@pytest.mark.parametrize("fused", [True, False])
def test_head_is_the_authors_lca_block(fused: bool) -> None:
    x_type = TensorType("tokens", 24, 3, 3, prefix=5)
    head = build_op(HEADS, "layer_class_attention", {"num_heads": 3, "head_dim": None, "fused": fused}, x_type, 7)
    assert isinstance(head, LayerClassAttentionHead)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 5 + 9, 24)
        assert (head(x) - _lca_reference(head, x[:, :5], 3)).abs().max() < TOL
        assert head(x).shape == (2, 7) and head.pre_logits(x).shape == (2, 24)


def test_collecting_stage_gives_every_blocks_class_token() -> None:
    graph = ml.to_graph(_spec())
    stage = graph.plan.stages[0]
    assert stage.collect is not None and stage.end == stage.collect
    node = graph.nodes[stage.collect]
    assert node["kind"] == "collect" and node["out"] == TensorType("tokens", 32, 4, 4, prefix=3)
    assert sorted(graph.predecessors(stage.collect)) == [f"stages.0.blocks.{j}.add_mlp" for j in range(3)]
    net = ml.build(_spec()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        s = net.stages[0]
        h = s.forward_pre(net.stem(x))
        taps = []
        for block in s.blocks:
            h = block(h)
            taps.append(h[:, :1])
        feats = net.forward_features(x)
        assert feats.shape == (2, 3 + 16, 32)
        assert torch.equal(feats, torch.cat([*taps, h[:, 1:]], dim=1))
        assert net(x).shape == (2, 10)
        # feature taps: the grid tokens, block taps too
        final, inter = net.forward_intermediates(x, indices=[0, 2])
        assert torch.equal(final, feats) and [t.shape for t in inter] == [(2, 32, 4, 4)] * 2
        assert (ml.deploy(net)(x) - net(x)).abs().max() < 1e-4
        maps = ml.build(_spec(), features_only=True, out_indices=(0, 2)).eval()(x)
        assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 2
    cost = graph_cost(graph)
    assert cost.params == sum(p.numel() for p in net.parameters())
    keys = dict(walk_keys(graph, 1, default_out_mem))
    assert stage.collect not in keys and "head" in keys  # the collect node launches nothing of its own


def test_collect_needs_prefix_tokens() -> None:
    spec = _spec(prefix_tokens=0)
    with pytest.raises(SpecError, match=r"collect_prefix.*needs blocks that keep the same prefix tokens"):
        ml.to_graph(spec)
