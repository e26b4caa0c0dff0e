"""Agent attention (Han et al. 2024): the op against the written-out reference in ``tests/references``, on the
whole map, in windows and with PVT's reduced keys, its refusals, and its cost against global attention."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from references.agent_attention import reference

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5

SETTINGS: list[tuple[str, dict[str, Any], TensorType]] = [
    ("whole-map", {"agents": 4, "num_heads": 2}, TensorType("tokens", 16, 6, 6)),
    ("whole-map-unfused", {"agents": 9, "num_heads": 2, "fused": False}, TensorType("tokens", 16, 6, 4)),
    ("uneven-pool", {"agents": 4, "num_heads": 1}, TensorType("tokens", 8, 5, 3)),
    ("windows", {"agents": 4, "window": 4, "num_heads": 2}, TensorType("tokens", 16, 8, 4)),
    ("pvt-reduced", {"agents": 9, "sr_ratio": 2, "num_heads": 2}, TensorType("tokens", 16, 6, 4)),
    ("no-bias-no-dwc", {"agents": 4, "num_heads": 2, "agent_bias": False, "dwc": None},
     TensorType("tokens", 16, 4, 4)),
    ("dwc5-bias3-width", {"agents": 4, "num_heads": 2, "dwc": 5, "bias_size": 3}, TensorType("tokens", 16, 4, 4)),
]


@pytest.mark.parametrize(("config", "x"), [s[1:] for s in SETTINGS], ids=[s[0] for s in SETTINGS])
def test_agent_attention_matches_the_written_out_reference(config: dict[str, Any], x: TensorType) -> None:
    torch.manual_seed(0)
    ours = perturbed(build_op(TOKEN_MIXERS, "agent_attention", config, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(ours(inputs), reference(ours, inputs)) < TOL


def test_agent_attention_has_the_authors_parameters() -> None:
    """Agent-PVT-T's stage 1 (64 wide, 56x56, 1 head, 9 agents, no reduction): the authors' tensors and shapes,
    their q and kv as one qkv."""
    ours = build_op(TOKEN_MIXERS, "agent_attention", {"agents": 9, "num_heads": 1}, TensorType("tokens", 64, 56, 56))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {"qkv.weight": (192, 64), "qkv.bias": (192,), "dwc.weight": (64, 1, 3, 3), "dwc.bias": (64,),
                      "proj.weight": (64, 64), "proj.bias": (64,), "an_bias": (1, 9, 7, 7), "na_bias": (1, 9, 7, 7),
                      "ah_bias": (1, 1, 9, 56, 1), "aw_bias": (1, 1, 9, 1, 56), "ha_bias": (1, 1, 56, 1, 9),
                      "wa_bias": (1, 1, 1, 56, 9)}
    assert 0.005 < ours.an_bias.std().item() < 0.03  # the authors' trunc_normal(std .02), not zeros


def test_agent_attention_keys_come_from_the_reduced_grid() -> None:
    ours = build_op(TOKEN_MIXERS, "agent_attention", {"agents": 4, "sr_ratio": 4, "num_heads": 2},
                    TensorType("tokens", 16, 8, 8))
    assert ours.ah_bias.shape == (1, 2, 4, 2, 1) and ours.ha_bias.shape == (1, 2, 8, 1, 4)
    assert ours.sr.stride == (4, 4) and ours.kv.out_features == 32


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"agents": 8}, TensorType("tokens", 16, 4, 4), "agents",
     "8 is not a square number (the agents are an a x a pooled grid)"),
    ({"agents": 4, "window": 3}, TensorType("tokens", 16, 4, 6), "window", "3 does not divide the 4x6 feature map"),
    ({"agents": 4, "window": 2, "sr_ratio": 2}, TensorType("tokens", 16, 4, 4), "sr_ratio",
     "2 reduces the whole map's keys; windows take sr_ratio 1"),
    ({"agents": 4, "sr_ratio": 3}, TensorType("tokens", 16, 4, 6), "sr_ratio",
     "3 does not divide the 4x6 feature map"),
], ids=["agents-not-square", "window", "windows-reduced", "sr-ratio"])
def test_agent_attention_refusals_name_the_field(config: dict[str, Any], x: TensorType, field: str,
                                                 message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "agent_attention", {"num_heads": 2, **config})
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("agent_attention").resolve(spec, x)
    assert (err.value.field, err.value.message) == (field, message)


def test_agent_attention_refuses_maps() -> None:
    spec = op_spec(TOKEN_MIXERS, "agent_attention", {"agents": 4, "num_heads": 2})
    with pytest.raises(ShapeIssue):
        TOKEN_MIXERS.get("agent_attention").resolve(spec, TensorType("maps", 16, 4, 4))


def test_agent_attention_costs_linear_in_the_tokens() -> None:
    """At 56x56 with 49 agents the two attentions cost O(N * A): fewer FLOPs than global attention's O(N^2)."""
    x = TensorType("tokens", 64, 56, 56)
    flops = {}
    for tag, config in (("agent_attention", {"agents": 49, "num_heads": 1}), ("attention", {"num_heads": 1})):
        module = build_op(TOKEN_MIXERS, tag, config, x)
        inputs = torch.randn(x.shape(1))
        flops[tag] = count_flops(lambda module=module, inputs=inputs: module(inputs))[0]
    assert flops["agent_attention"] < flops["attention"] / 5
