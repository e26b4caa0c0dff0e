"""CaiT's and ConViT's primitives against the real timm modules (same weights, perturbed first):
talking-heads attention, class attention, gated positional self-attention (with its local init and
relative offsets), and the ``class_attention`` block template (only the prefix tokens change) checked
through small timm ``Cait`` / ``ConVit`` models."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed, port
from timm.models.cait import Cait, ClassAttn, TalkingHeadAttn
from timm.models.convit import GPSA, ConVit
from torch import nn

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue, SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.gpsa import relative_offsets
from metaformer_lab.zoo.keymap import convert
from metaformer_lab.zoo.models import get

B = 2
TOL = 1e-5


_spec = partial(op_spec, TOKEN_MIXERS)
_op = partial(build_op, TOKEN_MIXERS)


# --- talking-heads attention ----------------------------------------------------------------------

@pytest.mark.parametrize("x_type", [TensorType("tokens", 32, 4, 5), TensorType("tokens", 32, 3, 3, prefix=1)],
                         ids=["grid", "prefixed"])
def test_talking_heads_matches_timm(x_type: TensorType) -> None:
    ref = TalkingHeadAttn(32, num_heads=4, qkv_bias=True)
    ours = port(ref, _op("talking_heads_attention", {"num_heads": 4, "qkv_bias": True}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x).flatten(1, -2), ref(x.flatten(1, -2))) <= TOL


def test_talking_heads_on_maps_equals_tokens() -> None:
    tokens, maps = TensorType("tokens", 16, 3, 4), TensorType("maps", 16, 3, 4)
    on_tokens = perturbed(_op("talking_heads_attention", {"num_heads": 2}, tokens))
    on_maps = _op("talking_heads_attention", {"num_heads": 2}, maps)
    on_maps.load_state_dict(on_tokens.state_dict())
    x = torch.randn(tokens.shape(B))
    with torch.no_grad():
        assert max_diff(on_maps(x.permute(0, 3, 1, 2)), on_tokens(x).permute(0, 3, 1, 2)) <= TOL


def test_talking_heads_shape_rule_checks_heads() -> None:
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("talking_heads_attention").resolve(_spec("talking_heads_attention", {"num_heads": 5}),
                                                          TensorType("tokens", 16, 2, 2))
    assert err.value.field == "num_heads"


# --- class attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_class_attention_matches_timm(fused: bool) -> None:
    x_type = TensorType("tokens", 32, 4, 5, prefix=1)
    ref = ClassAttn(32, num_heads=4, qkv_bias=True)
    ref.fused_attn = fused
    ours = port(ref, _op("class_attention", {"num_heads": 4, "qkv_bias": True, "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert y.shape == (B, 1, 32)
        assert max_diff(y, ref(x)) <= TOL


def test_class_attention_gives_the_prefix_tokens_alone() -> None:
    x_type = TensorType("tokens", 16, 3, 3, prefix=2)
    out = TOKEN_MIXERS.get("class_attention").resolve(_spec("class_attention", {"head_dim": 8}), x_type).out_type
    assert out == TensorType("tokens", 16, 0, 0, prefix=2)
    assert out.shape(B) == (B, 2, 16)


def test_class_attention_needs_prefix_tokens() -> None:
    with pytest.raises(ShapeIssue, match="needs prefix"):
        TOKEN_MIXERS.get("class_attention").resolve(_spec("class_attention", {}), TensorType("tokens", 32, 2, 2))


# --- gated positional self-attention --------------------------------------------------------------

def _timm_gpsa(dim: int, heads: int, qkv_bias: bool = False, locality_strength: float = 1.0) -> GPSA:
    return GPSA(dim, num_heads=heads, qkv_bias=qkv_bias, locality_strength=locality_strength)


@pytest.mark.parametrize(("heads", "qkv_bias"), [(4, False), (9, True)], ids=["convit-ti", "convit-s"])
def test_gpsa_matches_timm(heads: int, qkv_bias: bool) -> None:
    x_type = TensorType("tokens", 36, 5, 5)
    ref = _timm_gpsa(36, heads, qkv_bias)
    ours = port(ref, _op("gpsa", {"num_heads": heads, "qkv_bias": qkv_bias}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x).flatten(1, 2), ref(x.flatten(1, 2))) <= TOL



def test_gpsa_keeps_its_positional_attention_at_inference_until_pos_proj_or_the_gate_changes() -> None:
    x_type = TensorType("tokens", 36, 5, 5)
    ref = _timm_gpsa(36, 4, True)
    ours = port(ref, _op("gpsa", {"num_heads": 4, "qkv_bias": True}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        first = ours.gated_position()
        assert ours.gated_position() is first  # kept
        for param, ref_param in ((ours.pos_proj.bias, ref.pos_proj.bias), (ours.gating_param, ref.gating_param)):
            param.add_(0.5)  # in place, as an optimiser or load_state_dict does
            ref_param.add_(0.5)
            assert ours.gated_position() is not first
            assert max_diff(ours(x).flatten(1, 2), ref(x.flatten(1, 2))) <= TOL
            first = ours.gated_position()
    gated = ours.gated_position()[1]  # with autograd: computed, never kept
    assert gated.requires_grad and ours._position_cache is None

def test_gpsa_relative_offsets_match_timm_and_stay_out_of_the_state_dict() -> None:
    ref = _timm_gpsa(16, 4)
    assert torch.equal(relative_offsets(6, 6), ref.get_rel_indices(36))
    ours = _op("gpsa", {"num_heads": 4}, TensorType("tokens", 16, 2, 3))
    assert "rel_indices" not in ours.state_dict()
    offsets = ours.rel_indices[0]  # (N, N, 3); token 4 is row 1, column 1 of the 2x3 grid
    assert offsets[0, 4].tolist() == [1.0, 1.0, 2.0] and offsets[5, 0].tolist() == [-2.0, -1.0, 5.0]


@pytest.mark.parametrize(("heads", "strength"), [(4, 1.0), (9, 2.0), (6, 1.0)], ids=["4", "9-strong", "6-partial"])
def test_gpsa_local_init_matches_timm(heads: int, strength: float) -> None:
    ref = _timm_gpsa(36, heads, locality_strength=strength)
    ours = _op("gpsa", {"num_heads": heads, "locality_strength": strength}, TensorType("tokens", 36, 3, 3))
    with torch.no_grad():
        ref.v.weight.normal_()
        ref.pos_proj.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    ref.local_init()
    ours.init_weights()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_gpsa_works_on_the_grid_only() -> None:
    with pytest.raises(ShapeIssue, match="prefix"):
        TOKEN_MIXERS.get("gpsa").resolve(_spec("gpsa", {}), TensorType("tokens", 32, 2, 2, prefix=1))


def test_gpsa_on_maps_equals_tokens() -> None:
    tokens, maps = TensorType("tokens", 16, 3, 4), TensorType("maps", 16, 3, 4)
    on_tokens = perturbed(_op("gpsa", {"num_heads": 4}, tokens))
    on_maps = _op("gpsa", {"num_heads": 4}, maps)
    on_maps.load_state_dict(on_tokens.state_dict())
    x = torch.randn(tokens.shape(B))
    with torch.no_grad():
        assert max_diff(on_maps(x.permute(0, 3, 1, 2)), on_tokens(x).permute(0, 3, 1, 2)) <= TOL


# --- the class_attention template, through small timm models ---------------------------------------

def _class_attention_block(**overrides: Any) -> dict[str, Any]:
    return {"template": "class_attention", "token_mixer": {"type": "class_attention", "num_heads": 4,
                                                            "head_dim": None, "qkv_bias": True},
            "norm": {"type": "layernorm", "eps": 1e-6}, "layer_scale": 1e-5, "layout": "tokens", **overrides}


def _tiny(stage0: dict[str, Any], block1: dict[str, Any], depths: tuple[int, int], dim: int) -> dict[str, Any]:
    return {"name": "tiny", "input": {"size": 32}, "num_classes": 5, "stem": {"type": "patchify", "patch": 8},
            "stages": [{"depth": depths[0], "dim": dim, "layout": "tokens", "pos_embed": {"type": "learned"},
                        "block": stage0},
                       {"depth": depths[1], "dim": dim, "layout": "tokens", "prefix_tokens": 1, "block": block1,
                        "norm": {"type": "layernorm", "eps": 1e-6}}],
            "head": {"type": "class_token"}}


def _matches_timm(ref: nn.Module, spec: dict[str, Any], zoo_name: str) -> None:
    """Perturbed timm weights through the zoo family's key map, strict load, logits within TOL."""
    perturbed(ref)
    ours = ml.build(spec).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(convert(get(zoo_name).key_map, ref.state_dict(), shapes), strict=True)
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


def test_small_cait_matches_timm() -> None:
    ref = Cait(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, init_values=1e-5, depth_token_only=2,
               num_classes=5)
    block0 = {"base": "cait", "token_mixer": {"num_heads": 4}}
    _matches_timm(ref, _tiny(block0, _class_attention_block(), (3, 2), 32), "cait_xxs24_224")


def test_small_convit_matches_timm() -> None:
    ref = ConVit(img_size=32, patch_size=8, embed_dim=8, num_heads=4, depth=12, local_up_to_layer=10, num_classes=5)
    block1 = {"base": "vit", "token_mixer": {"num_heads": 4, "qkv_bias": False, "fused": False, "scale_order": "after"}}
    _matches_timm(ref, _tiny({"base": "convit_gpsa"}, block1, (10, 2), 32), "convit_tiny")


def test_class_attention_block_changes_the_prefix_tokens_only() -> None:
    spec = _tiny({"token_mixer": {"type": "identity"}}, _class_attention_block(layer_scale=1.0), (1, 1), 32)
    net = perturbed(ml.build(spec))
    stage = net.stages[1]
    x = stage.prefix(torch.randn(B, 4, 4, 32))  # (B, 1 + 16, 32)
    with torch.no_grad():
        y = stage.blocks[0](x)
    assert torch.equal(y[:, 1:], x[:, 1:])
    assert not torch.allclose(y[:, :1], x[:, :1])


def test_class_attention_template_drop_path_reaches_the_prefix_only() -> None:
    spec = _tiny({"token_mixer": {"type": "identity"}}, _class_attention_block(), (1, 1), 32)
    spec["defaults"] = {"drop_path_rate": 0.5}
    net = ml.build(spec).train()
    stage = net.stages[1]
    x = stage.prefix(torch.randn(8, 4, 4, 32))
    y = stage.blocks[0](x)
    assert torch.equal(y[:, 1:], x[:, 1:])


@pytest.mark.parametrize(("block", "prefix", "path", "message"), [
    (_class_attention_block(), 0, "stages[1].block.template", "updates the prefix tokens only"),
    (_class_attention_block(token_mixer={"type": "attention", "head_dim": 8}), 1, "stages[1].block.token_mixer",
     "it must return those alone"),
    ({"token_mixer": {"type": "class_attention", "head_dim": 8}}, 1, "stages[1].block.token_mixer",
     "a residual branch must keep it"),
], ids=["no-prefix-tokens", "full-token-mixer", "class-attention-in-metaformer"])
def test_class_attention_misuse_is_a_spec_error(block: dict[str, Any], prefix: int, path: str, message: str) -> None:
    spec = _tiny({"token_mixer": {"type": "identity"}}, block, (1, 1), 32)
    spec["stages"][1]["prefix_tokens"] = prefix
    if not prefix:
        spec["head"] = {"type": "pool_norm_linear"}
    with pytest.raises(SpecError) as err:
        ml.to_graph(spec)
    assert any(i.path == path and message in i.message for i in err.value.issues), err.value.issues
