"""Bi-level routing attention (BiFormer, Zhu et al. 2023): the op against its slow, written-out reference
(``tests/references/routing_attention.py``: loops over regions and heads) for every option, and its refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from references.routing_attention import reference

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5


@pytest.mark.parametrize(("config", "x"), [
    ({"regions": 2, "topk": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 6)),
    ({"regions": 2, "topk": 1, "head_dim": 8, "local_conv": 3}, TensorType("tokens", 16, 4, 4)),
    ({"regions": 3, "topk": 9, "num_heads": 4}, TensorType("tokens", 16, 6, 6)),  # every region: global attention
    ({"regions": 2, "topk": 3, "num_heads": 2, "fused": False, "local_conv": None}, TensorType("maps", 16, 4, 6)),
    ({"regions": 2, "topk": 2, "num_heads": 2, "qk_dim": 8, "qkv_bias": False, "scale_width": "head"},
     TensorType("tokens", 16, 4, 4)),
    ({"regions": 2, "topk": 2, "num_heads": 2, "soft_routing": True}, TensorType("tokens", 16, 4, 4)),
    ({"regions": 2, "topk": 3, "num_heads": 2, "soft_routing": True, "diff_routing": True, "param_routing": True},
     TensorType("tokens", 16, 4, 4)),
    ({"regions": 2, "topk": 2, "num_heads": 2, "auto_pad": True}, TensorType("tokens", 16, 5, 3)),
    ({"regions": 3, "topk": 2, "num_heads": 2, "auto_pad": True, "fused": False}, TensorType("maps", 16, 7, 6)),
], ids=["base", "topk-1-lepe-3", "all-regions", "maps-explicit-no-lepe", "narrow-qk-head-scale", "soft",
        "soft-diff-param", "auto-pad", "auto-pad-maps"])
def test_routing_attention_matches_the_written_out_reference(config: dict[str, Any], x: TensorType) -> None:
    torch.manual_seed(0)
    module = perturbed(build_op(TOKEN_MIXERS, "routing_attention", config, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(module(inputs), reference(module, inputs)) <= TOL


def test_routing_picks_regions_not_all_tokens() -> None:
    """With topk < S² the output differs from attention over every region (the routing does something)."""
    x = TensorType("tokens", 16, 4, 4)
    routed = perturbed(build_op(TOKEN_MIXERS, "routing_attention", {"regions": 2, "topk": 1, "num_heads": 2}, x))
    full = build_op(TOKEN_MIXERS, "routing_attention", {"regions": 2, "topk": 4, "num_heads": 2}, x)
    full.load_state_dict(routed.state_dict())
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(routed(inputs), full(inputs)) > 1e-3


def test_hard_routing_sends_no_gradient_through_the_region_logits() -> None:
    """The authors' default: region queries and keys are detached, so only the token attention trains qkv."""
    x = TensorType("tokens", 16, 4, 4)
    module = build_op(TOKEN_MIXERS, "routing_attention", {"regions": 2, "topk": 2, "num_heads": 2,
                                                          "soft_routing": True}, x).train()
    q, k = torch.randn(1, 4, 4, 16, requires_grad=True), torch.randn(1, 4, 4, 16, requires_grad=True)
    index, weight = module.route(q, k)
    assert not weight.requires_grad and index.shape == (1, 4, 2)


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"regions": 3, "num_heads": 2}, TensorType("tokens", 16, 4, 6), "regions",
     "3 does not divide the 4x6 feature map (or set auto_pad)"),
    ({"regions": 5, "num_heads": 2, "auto_pad": True}, TensorType("tokens", 16, 4, 6), "regions",
     "5 regions per side are more than the 4x6 feature map has rows or columns"),
    ({"regions": 2, "topk": 5, "num_heads": 2}, TensorType("tokens", 16, 4, 4), "topk", "5 is more than the 4 regions"),
    ({"regions": 2, "topk": 2, "num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads",
     "3 does not divide dim 16"),
    ({"regions": 2, "topk": 2, "num_heads": 3, "qk_dim": 12}, TensorType("tokens", 16, 4, 4), "num_heads",
     "3 heads do not divide the value width 16"),
    ({"regions": 2, "topk": 2, "num_heads": 2, "head_dim": 4}, TensorType("tokens", 16, 4, 4), "head_dim",
     "2 heads of 4 do not make qk_dim 16"),
    ({"regions": 2, "topk": 2, "num_heads": 2, "diff_routing": True}, TensorType("tokens", 16, 4, 4), "diff_routing",
     "only hard routing without gradient exists; set soft_routing: true"),
    ({"regions": 2, "topk": 2, "num_heads": 2, "soft_routing": True, "param_routing": True},
     TensorType("tokens", 16, 4, 4), "param_routing",
     "its Linear learns through the routing weights; set diff_routing: true"),
    ({"regions": 2, "topk": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 4, prefix=1), "type",
     "routing_attention works on the token grid only, but the input has 1 prefix token(s); its prefix field "
     "(pass, zero or linear) routes the 1 prefix token(s) around it"),
], ids=["regions-divide", "regions-too-many", "topk", "heads", "value-heads", "head-dim", "diff", "param", "prefix"])
def test_routing_attention_refusals_name_the_field(config: dict[str, Any], x: TensorType, field: str,
                                                    message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "routing_attention", config)
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("routing_attention").resolve(spec, x)
    assert (err.value.field, err.value.message) == (field, message)


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_attention_with_a_conv_of_its_input_is_biformers_last_stage(layout: str) -> None:
    """BiFormer's stage 4 (topk -2: the authors' AttentionLePE) is global attention plus a depthwise conv of the
    attention's input (not of its values), added before the projection: ``attention`` with ``local_conv_input``."""
    x = TensorType(layout, 16, 3, 4)  # type: ignore[arg-type]
    module = perturbed(build_op(TOKEN_MIXERS, "attention", {"num_heads": 2, "local_conv": 5,
                                                            "local_conv_input": True}, x))
    inputs = torch.randn(x.shape(2))
    tokens = inputs.flatten(2).transpose(1, 2) if layout == "maps" else inputs.flatten(1, 2)  # (B, N, C)
    B, N, C = tokens.shape
    q, k, v = (tokens @ module.qkv.weight.T).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // 2) ** -0.5).softmax(-1)
    grid = tokens.transpose(1, 2).reshape(B, C, 3, 4)
    conv = module.local_conv
    lepe = torch.nn.functional.conv2d(grid, conv.weight, conv.bias, padding=2, groups=C).flatten(2).transpose(1, 2)
    expected = ((attn @ v).transpose(1, 2).reshape(B, N, C) + lepe) @ module.proj.weight.T + module.proj.bias
    expected = expected.transpose(1, 2).reshape(B, C, 3, 4) if layout == "maps" else expected.reshape(B, 3, 4, C)
    with torch.no_grad():
        assert max_diff(module(inputs), expected) <= TOL


@pytest.mark.parametrize(("config", "message"), [
    ({"local_conv_input": True}, "says what the local conv reads; set local_conv"),
    ({"local_conv": 3, "local_conv_input": True, "attn_ratio": 0.5},
     "the conv of the 16-wide input is added to the 8-wide values"),
], ids=["no-conv", "narrow-values"])
def test_attention_local_conv_input_refusals(config: dict[str, Any], message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "attention", {"num_heads": 2, **config})
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("attention").resolve(spec, TensorType("tokens", 16, 2, 2))
    assert (err.value.field, err.value.message) == ("local_conv_input", message)
