"""The ``concat`` composite: attention branches asked for a width (heads and projection follow it, the rest of the
op unchanged), the concatenation and its projection against a reference, costs with the projection counted, and
the shape rule's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.registry import Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost
from metaformer_lab.latency.gpu import estimate_gpu
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.concat import CONCAT, Concat

TOL = 1e-5


@pytest.mark.parametrize(("tag", "config", "x"), [
    ("attention", {"num_heads": 2, "head_dim": 4}, TensorType("tokens", 16, 3, 3, prefix=1)),
    ("attention", {"num_heads": 2, "head_dim": 4, "fused": False}, TensorType("maps", 16, 3, 4)),
    ("sr_attention", {"num_heads": 2, "head_dim": 4, "sr_ratio": 2}, TensorType("tokens", 16, 4, 4)),
    ("window_attention", {"num_heads": 2, "head_dim": 4, "window": 2, "shift": True},
     TensorType("tokens", 16, 4, 4)),
], ids=["attention", "attention-maps", "sr_attention", "window_attention"])
def test_a_width_asked_of_an_attention_op_narrows_its_projection_alone(tag: str, config: dict[str, Any],
                                                                       x: TensorType) -> None:
    """With the inner width fixed (num_heads and head_dim), the op asked for 6 channels is the full-width op
    keeping the first 6 output channels of its projection."""
    full = perturbed(build_op(TOKEN_MIXERS, tag, config, x))
    narrow = build_op(TOKEN_MIXERS, tag, config, x, 6)
    state = {k: v[:6] if k.startswith("proj.") else v for k, v in full.state_dict().items()}
    narrow.load_state_dict(state, strict=True)
    inputs = torch.randn(x.shape(2))
    channels = 1 if x.layout == "maps" else -1
    assert max_diff(narrow(inputs), full(inputs).narrow(channels, 0, 6)) < TOL
    assert TOKEN_MIXERS.get(tag).resolve(op_spec(TOKEN_MIXERS, tag, config), x, 6).out_type == x.with_channels(6)


def test_a_width_sizes_the_heads_by_head_dim() -> None:
    """Without num_heads, a branch of width 8 at head_dim 4 has 2 heads (HiLo: the heads follow the branch)."""
    spec = op_spec(TOKEN_MIXERS, "attention", {"head_dim": 4})
    resolved = TOKEN_MIXERS.get("attention").resolve(spec, TensorType("tokens", 32, 2, 2), 8)
    assert (resolved["num_heads"], resolved["head_dim"]) == (2, 4)


def _concat(config: dict[str, Any], x: TensorType) -> Concat:
    from pydantic import TypeAdapter

    from metaformer_lab.spec.arch import TokenMixerSpec

    spec = TypeAdapter(TokenMixerSpec).validate_python({"type": "concat", **config})
    children = [TOKEN_MIXERS.of_spec(c).make(c, t, dim)
                for c, (t, dim) in zip(spec.branches, CONCAT.branch_inputs(spec, x), strict=True)]
    module = CONCAT.build(spec, Resolved(x, x), children)
    assert isinstance(module, Concat)
    return perturbed(module).eval()


@pytest.mark.parametrize("x", [TensorType("tokens", 16, 4, 4), TensorType("maps", 16, 4, 4)], ids=["tokens", "maps"])
def test_concat_is_the_branches_side_by_side_then_the_projection(x: TensorType) -> None:
    config = {"widths": [12, 8], "proj": True,
              "branches": [{"type": "attention", "head_dim": 4}, {"type": "attention", "num_heads": 1}]}
    module = _concat(config, x)
    inputs = torch.randn(x.shape(2))
    a, b = (branch(inputs) for branch in module.branches)
    if x.layout == "maps":  # the projection is a 1x1 conv: a Linear over the channels
        joined = torch.cat([a, b], dim=1).permute(0, 2, 3, 1)  # (B, H, W, 20)
        weight = module.proj.weight.flatten(1)  # (16, 20, 1, 1) -> (16, 20)
        expected = (joined @ weight.T + module.proj.bias).permute(0, 3, 1, 2)
    else:
        expected = torch.cat([a, b], dim=-1) @ module.proj.weight.T + module.proj.bias
    assert a.shape[1 if x.layout == "maps" else -1] == 12
    assert max_diff(module(inputs), expected) < TOL


def _attention_reference(x: Tensor, qkv: nn.Linear, proj: nn.Linear, heads: int) -> Tensor:
    """Softmax attention one head at a time, written out: (B, N, C) -> (B, N, proj's width)."""
    q, k, v = qkv(x).chunk(3, dim=-1)  # 3 x (B, N, heads*d)
    outs = []
    for h in range(heads):
        d = q.shape[-1] // heads
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(1, 2) / d**0.5, dim=-1)
        outs.append(weights @ vh)
    return proj(torch.cat(outs, dim=-1))


def test_hilo_style_concat_matches_a_written_out_reference() -> None:
    """Two global attentions on the whole input, 3 and 1 heads of width 4, concatenated without a projection:
    each branch reads all 16 channels and writes its own 12 or 4."""
    x = TensorType("tokens", 16, 3, 3)
    module = _concat({"widths": [12, 4], "branches": [{"type": "attention", "head_dim": 4},
                                                      {"type": "attention", "head_dim": 4}]}, x)
    inputs = torch.randn(x.shape(2))
    flat = inputs.flatten(1, 2)  # (B, 9, 16)
    expected = torch.cat([_attention_reference(flat, b.qkv, b.proj, b.num_heads) for b in module.branches], dim=-1)
    assert [b.num_heads for b in module.branches] == [3, 1]
    assert max_diff(module(inputs), expected.unflatten(1, (3, 3))) < TOL


def _spec(mixer: dict[str, Any], layout: str = "tokens") -> dict[str, Any]:
    return {"name": "c", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 16, "layout": layout,
                        "block": {"token_mixer": mixer, "channel_mixer": {"type": "mlp", "ratio": 1.0}}}],
            "head": {"type": "pool_norm_linear"}}


_PROJ = {"type": "concat", "proj": True, "widths": [16, 8],
         "branches": [{"type": "dwconv", "kernel": 3}, {"type": "sr_attention", "sr_ratio": 2, "head_dim": 4}]}


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_costs_count_the_projection(layout: str) -> None:
    mixer = _PROJ if layout == "tokens" else {**_PROJ, "branches": [{"type": "dwconv", "kernel": 3},
                                                                    {"type": "attention", "head_dim": 4}]}
    graph = ml.to_graph(_spec(mixer, layout))
    net = ml.build(graph).eval()
    cost = graph_cost(graph)
    flops, _ = count_flops(lambda: net(torch.zeros(graph.input_type.shape(1))))
    assert (cost.params, cost.flops) == (count_params(net), flops)


def test_the_gpu_estimate_counts_the_projection() -> None:
    graph = ml.to_graph(_spec(_PROJ))
    assert estimate_gpu(graph, "h100", dtype="float32").flops == graph_cost(graph).flops


@pytest.mark.parametrize(("mixer", "path", "message"), [
    ({"type": "concat", "widths": [8, 8, 8], "branches": [{"type": "attention", "head_dim": 4}] * 2}, "widths",
     "3 widths for 2 branches"),
    ({"type": "concat", "widths": [8, 4], "branches": [{"type": "attention", "head_dim": 4}] * 2}, "widths",
     "sum to 12, but without proj the concatenation must give the 16 input channels; make them sum to 16 or set "
     "proj: true"),
    ({"type": "concat", "branches": [{"type": "dwconv"}, {"type": "attention", "head_dim": 4}]}, "branches[0]",
     "'dwconv' gives 16 channels, but the concatenation asks it for 8; only attention, sr_attention, "
     "window_attention take a width, other ops keep their input's"),
    ({"type": "concat", "widths": [12, 4], "branches": [{"type": "attention", "head_dim": 8},
                                                        {"type": "attention", "head_dim": 4}]},
     "branches[0].head_dim", "8 does not divide dim 12"),
])
def test_shape_rule_refusals_name_the_field(mixer: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        ml.to_graph(_spec(mixer))
    assert [(i.path, i.message) for i in err.value.issues] == [(f"stages[0].block.token_mixer.{path}", message)]
