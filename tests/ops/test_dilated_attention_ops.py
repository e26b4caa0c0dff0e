"""Multi-scale dilated attention (DilateFormer, Jiao et al. 2023): ``dilated_attention`` against the slow reference
in ``tests/references/dilated_attention.py`` (per head, per query), its zero-padding semantics, its parameter
names (the authors' ``MultiDilatelocalAttention``) and the shape rule's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from pydantic import ValidationError
from references.dilated_attention import reference

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5

SETTINGS = [
    ({"num_heads": 3}, TensorType("tokens", 12, 7, 8)),
    ({"num_heads": 3}, TensorType("maps", 12, 8, 7)),
    ({"num_heads": 4, "dilations": [2, 1], "qkv_bias": False, "proj_bias": False}, TensorType("tokens", 16, 5, 6)),
    ({"num_heads": 2, "kernel": 5, "dilations": [1]}, TensorType("maps", 8, 6, 5)),
    ({"num_heads": 4, "kernel": 1, "dilations": [1, 3]}, TensorType("tokens", 8, 3, 3)),
    ({"num_heads": 3, "head_dim": 2, "dilations": [3, 1, 2]}, TensorType("tokens", 8, 7, 7)),
    ({"head_dim": 4, "dilations": [1, 1, 2, 2]}, TensorType("maps", 16, 5, 5)),
]


@pytest.mark.parametrize(("config", "x"), SETTINGS, ids=[f"{x.layout}-{i}" for i, (_, x) in enumerate(SETTINGS)])
def test_dilated_attention_matches_the_per_query_reference(config: dict[str, Any], x: TensorType) -> None:
    torch.manual_seed(0)
    module = perturbed(build_op(TOKEN_MIXERS, "dilated_attention", config, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(module(inputs), reference(module, inputs)) <= TOL


def test_keys_outside_the_grid_stay_in_the_softmax_as_zeros() -> None:
    """With q = 0 every neighbour weighs 1 / kernel²: at a corner, 4 of the 9 neighbours are in the grid, so the
    output is (sum of those 4 values) / 9, not their mean (as the authors' zero-padded ``nn.Unfold``)."""
    x = TensorType("maps", 2, 4, 4)
    module = build_op(TOKEN_MIXERS, "dilated_attention", {"num_heads": 1, "dilations": [1]}, x)
    with torch.no_grad():
        module.qkv.weight.zero_()
        module.qkv.bias.zero_()
        module.qkv.weight[4:6, :, 0, 0] = torch.eye(2)  # v = x, q = k = 0
        module.proj.weight.copy_(torch.eye(2))
        module.proj.bias.zero_()
        inputs = torch.randn(x.shape(1))
        out = module(inputs)
    assert torch.allclose(out[0, :, 0, 0], inputs[0, :, :2, :2].sum((1, 2)) / 9, atol=1e-6)
    assert torch.allclose(out[0, :, 1, 1], inputs[0, :, :3, :3].sum((1, 2)) / 9, atol=1e-6)


def test_parameter_names_and_shapes_are_the_authors() -> None:
    """``MultiDilatelocalAttention(72, num_heads=3)``: qkv a 1x1 Conv2d (216, 72, 1, 1), proj a Linear (72, 72)."""
    module = build_op(TOKEN_MIXERS, "dilated_attention", {"num_heads": 3}, TensorType("tokens", 72, 8, 8))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {"qkv.weight": (216, 72, 1, 1), "qkv.bias": (216,), "proj.weight": (72, 72),
                      "proj.bias": (72,)}


def test_training_dropout_and_gradients() -> None:
    x = TensorType("tokens", 12, 7, 7)
    module = build_op(TOKEN_MIXERS, "dilated_attention", {"num_heads": 3, "attn_drop": 0.5}, x).train()
    inputs = torch.randn(x.shape(2), requires_grad=True)
    module(inputs).sum().backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"num_heads": 4}, TensorType("tokens", 16, 8, 8), "dilations", "3 dilation groups do not split the 4 heads"),
    ({"num_heads": 3, "dilations": [1, 2, 4]}, TensorType("tokens", 12, 8, 8), "dilations",
     "dilation 4 spreads the 3x3 neighbourhood over 9 tokens, more than the 8x8 grid"),
    ({"num_heads": 1, "kernel": 7, "dilations": [1]}, TensorType("maps", 8, 9, 6), "dilations",
     "over 7 tokens, more than the 9x6 grid"),
    ({"num_heads": 5}, TensorType("tokens", 12, 8, 8), "num_heads", "5 does not divide dim 12"),
    ({"num_heads": 3}, TensorType("tokens", 12, 8, 8, prefix=1), "type", "prefix token"),
    ({"num_heads": 3}, TensorType("vector", 12, 0, 0), "type", "needs layout"),
])
def test_the_shape_rule_refuses(config: dict[str, Any], x: TensorType, field: str, message: str) -> None:
    with pytest.raises(ShapeIssue) as err:
        build_op(TOKEN_MIXERS, "dilated_attention", config, x)
    assert err.value.field == field and message in err.value.message


@pytest.mark.parametrize("config", [{"kernel": 4}, {"dilations": []}, {"dilations": [0]}])
def test_the_config_refuses(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        op_spec(TOKEN_MIXERS, "dilated_attention", config)
