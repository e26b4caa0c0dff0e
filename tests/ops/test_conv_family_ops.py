"""The ops added for ConvNeXt, FocalNet and EfficientFormer against the timm modules they reproduce
(same weights, perturbed first): focal modulation, attention with a learned LeViT-style bias, the MLP
with hidden/output norms, the distilled pool head, and the post-norm block template."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, perturbed, port
from timm.layers import LayerNorm2d
from timm.models.efficientformer import Attention as EfficientFormerAttention
from timm.models.efficientformer import ConvMlpWithNorm, EfficientFormer
from timm.models.focalnet import FocalModulation as TimmFocalModulation
from timm.models.focalnet import FocalNet

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.lower import lower
from metaformer_lab.ops import CHANNEL_MIXERS, HEADS, TOKEN_MIXERS
from metaformer_lab.ops.attention import offset_index
from metaformer_lab.spec.load import read_spec
from metaformer_lab.zoo import get
from metaformer_lab.zoo.keymap import convert

TOL = 1e-5
B = 2


# --- focal modulation ----------------------------------------------------------------------------

FOCAL_KEYS = [(r"f\.", "proj_in."), (r"h\.", "modulator."), (r"focal_layers\.", "levels."),
              (r"\.0\.weight", ".dw.weight"), (r"norm\.", "post_norm.")]

FOCAL_CONFIGS = [
    pytest.param({}, {}, id="srf"),
    pytest.param({"focal_level": 3, "focal_window": 5}, {"focal_level": 3, "focal_window": 5}, id="lrf"),
    pytest.param({"focal_level": 1, "focal_factor": 4, "normalize_modulator": True, "bias": False},
                 {"focal_level": 1, "focal_factor": 4, "normalize_modulator": True, "bias": False}, id="normalized"),
    pytest.param({"post_norm": {"type": "layernorm", "eps": 1e-5}},
                 {"use_post_norm": True, "norm_layer": partial(LayerNorm2d, eps=1e-5)}, id="post-norm"),
]


@pytest.mark.parametrize(("config", "timm_kwargs"), FOCAL_CONFIGS)
@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_focal_modulation_matches_timm(config: dict[str, Any], timm_kwargs: dict[str, Any], layout: str) -> None:
    x_type = TensorType(layout, 16, 6, 7)  # type: ignore[arg-type]
    kwargs = {"focal_level": 2, "focal_window": 3, **timm_kwargs}
    ref = TimmFocalModulation(16, **kwargs)
    ours = port(ref, build_op(TOKEN_MIXERS, "focal_modulation", config, x_type), FOCAL_KEYS)
    x = torch.randn(B, 16, 6, 7)
    with torch.no_grad():
        expected = ref(x)
        if layout == "maps":
            assert torch.equal(ours(x), expected)  # same op order: bit-exact
        else:
            assert max_diff(ours(x.permute(0, 2, 3, 1)), expected.permute(0, 2, 3, 1)) <= TOL


def test_focal_modulation_kernels_grow_per_level() -> None:
    module = build_op(TOKEN_MIXERS, "focal_modulation", {"focal_level": 3, "focal_window": 5, "focal_factor": 4},
                 TensorType("maps", 8, 9, 9))
    assert [level.dw.kernel_size for level in module.levels] == [(5, 5), (9, 9), (13, 13)]


def test_focal_modulation_rules() -> None:
    opdef = TOKEN_MIXERS.get("focal_modulation")
    with pytest.raises(ValueError, match="must be even"):
        opdef.spec.model_validate({"type": "focal_modulation", "focal_factor": 3})
    spec = opdef.spec.model_validate({"type": "focal_modulation", "focal_level": 8, "focal_window": 61})
    with pytest.raises(ShapeIssue, match="exceeds"):
        opdef.resolve(spec, TensorType("maps", 8, 4, 4))
    with pytest.raises(ShapeIssue, match="prefix"):
        opdef.resolve(opdef.spec(), TensorType("tokens", 8, 4, 4, prefix=1))


# --- attention with a learned LeViT-style bias ------------------------------------------------------

LEVIT_CONFIG = {"num_heads": 4, "head_dim": 8, "attn_ratio": 4.0, "qkv_layout": "heads_qkv", "attention_bias": True,
                "qkv_bias": True, "scale_order": "after"}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("grid", [(7, 7), (4, 5)], ids=["7x7", "4x5"])
def test_bias_attention_matches_timm_efficientformer(fused: bool, grid: tuple[int, int]) -> None:
    x_type = TensorType("tokens", 48, *grid)
    ref = EfficientFormerAttention(48, key_dim=8, num_heads=4, attn_ratio=4, resolution=grid)
    ours = build_op(TOKEN_MIXERS, "attention", {**LEVIT_CONFIG, "fused": fused}, x_type)
    assert torch.equal(ours.attention_bias_idxs, ref.attention_bias_idxs)  # the same persistent buffer
    ours = port(ref, ours)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        got, expected = ours(x), ref(x.flatten(1, 2)).unflatten(1, grid)
    if fused:
        assert max_diff(got, expected) <= TOL
    else:
        assert torch.equal(got, expected)  # explicit softmax, scale after q kᵀ: timm's order


def test_bias_attention_state_dict_has_the_index_buffer() -> None:
    module = build_op(TOKEN_MIXERS, "attention", LEVIT_CONFIG, TensorType("maps", 48, 3, 4))
    state = module.state_dict()
    assert state["attention_biases"].shape == (4, 12)
    assert state["attention_bias_idxs"].shape == (12, 12)
    assert state["qkv.weight"].shape == (4 * (8 + 8 + 32), 48)
    assert state["proj.weight"].shape == (48, 4 * 32)


def test_offset_index_is_symmetric_and_fills_the_table() -> None:
    index = offset_index((3, 4))
    assert torch.equal(index, index.T)
    assert index.diagonal().eq(0).all()
    assert set(index.flatten().tolist()) == set(range(12))


def test_bias_attention_refuses_prefix_tokens() -> None:
    opdef = TOKEN_MIXERS.get("attention")
    spec = opdef.spec.model_validate({"type": "attention", **LEVIT_CONFIG})
    with pytest.raises(ShapeIssue, match="prefix"):
        opdef.resolve(spec, TensorType("tokens", 48, 3, 3, prefix=1))


# --- MLP with hidden and output norms -------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_mlp_with_norms_matches_timm_conv_mlp_with_norm(train: bool) -> None:
    x_type = TensorType("maps", 16, 5, 6)
    ref = ConvMlpWithNorm(16, hidden_features=64)
    config = {"ratio": 4.0, "hidden_norm": {"type": "batchnorm"}, "out_norm": {"type": "batchnorm"}}
    ours = port(ref, build_op(CHANNEL_MIXERS, "mlp", config, x_type))  # timm's names: fc1, norm1, fc2, norm2
    ref.train(train)
    ours.train(train)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.norm1.running_mean, ref.norm1.running_mean)  # train mode updates both alike


def test_mlp_hidden_norm_is_checked_at_the_hidden_width() -> None:
    opdef = CHANNEL_MIXERS.get("mlp")
    spec = opdef.spec.model_validate({"type": "mlp", "ratio": 1.5, "hidden_norm": {"type": "groupnorm", "groups": 16},
                                      "out_norm": {"type": "groupnorm", "groups": 16}})
    with pytest.raises(ShapeIssue) as info:
        opdef.resolve(spec, TensorType("maps", 16, 4, 4))  # out_norm fits 16 channels, hidden_norm not 24
    assert info.value.field == "hidden_norm.groups"


# --- distilled pool head ---------------------------------------------------------------------------

def test_distilled_head_matches_timm_efficientformer_head() -> None:
    ref = perturbed(EfficientFormer(depths=(1,), embed_dims=(24,), num_vit=0, num_classes=7))
    x_type = TensorType("tokens", 24, 3, 4)
    ours = build_op(HEADS, "pool_norm_linear", {"norm": None, "distilled": True}, x_type, 7)
    ours.load_state_dict({**{f"fc.{k}": v for k, v in ref.head.state_dict().items()},
                          **{f"fc_dist.{k}": v for k, v in ref.head_dist.state_dict().items()}}, strict=True)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.equal(ours(x), ref.forward_head(x.flatten(1, 2)))  # timm: mean over tokens, (fc + fc_dist) / 2


def test_distilled_head_without_classes_returns_features() -> None:
    head = build_op(HEADS, "pool_norm_linear", {"distilled": True}, TensorType("maps", 8, 2, 2), 0)
    assert head.fc_dist is None
    assert head(torch.randn(B, 8, 2, 2)).shape == (B, 8)


# --- post-norm template: a small FocalNet with every option of the large variants on ----------------

_LN5 = {"type": "layernorm", "eps": 1e-5}
_POSTNORM_BLOCK = {"template": "postnorm", "layer_scale": 1e-4, "norm": _LN5, "channel_mixer": {"type": "mlp"},
                   "token_mixer": {"type": "focal_modulation", "focal_level": 3, "focal_window": 5,
                                   "normalize_modulator": True, "post_norm": _LN5}}
_OVERLAP_DOWN = {"type": "conv", "kernel": 3, "stride": 2, "padding": 1, "norm_after": _LN5}


def _small_focalnet_spec() -> dict[str, Any]:
    stages: list[dict[str, Any]] = [{"depth": 2, "dim": 8, "block": _POSTNORM_BLOCK}]
    stages += [{"depth": 1, "dim": 8 * 2**i, "downsample": _OVERLAP_DOWN, "block": _POSTNORM_BLOCK} for i in (1, 2, 3)]
    stages[-1]["norm"] = _LN5
    return {"name": "focalnet_postnorm", "input": {"size": 64}, "num_classes": 10,
            "stem": {"type": "conv", "kernel": 7, "stride": 4, "padding": 2, "norm_after": _LN5},
            "stages": stages, "head": {"type": "pool_norm_linear", "norm": None}}


def test_postnorm_template_matches_timm_focalnet_with_post_norm() -> None:
    """timm's use_post_norm + use_post_norm_in_modulation + overlapping downsamplers + layer scale (the
    focalnet_large/xlarge/huge options), through the family's key map."""
    ref = perturbed(FocalNet(embed_dim=8, depths=(2, 1, 1, 1), focal_levels=(3,) * 4, focal_windows=(5,) * 4,
                             use_overlap_down=True, use_post_norm=True, use_post_norm_in_modulation=True,
                             normalize_modulator=True, layerscale_value=1e-4, num_classes=10))
    ours = compile_graph(lower(read_spec(_small_focalnet_spec()))).eval()
    target = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(convert(get("focalnet_tiny_srf").key_map, ref.state_dict(), target), strict=True)
    x = torch.randn(B, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_postnorm_template_puts_norms_after_the_mixers() -> None:
    spec = read_spec({"name": "t", "input": {"size": 8}, "stem": {"type": "patchify", "patch": 2},
                      "stages": [{"depth": 1, "dim": 8, "block": {"template": "postnorm",
                                                                  "token_mixer": {"type": "pooling"}}}]})
    graph = lower(spec)
    branches = graph.plan.stages[0].blocks[0].branches
    assert [[graph.nodes[n]["part"] for n in b.parts] for b in branches] == [["token_mixer", "norm1"], ["mlp", "norm2"]]
    for branch in branches:
        mixer, norm = branch.parts
        assert graph.has_edge(mixer, norm)
        assert [graph.nodes[n]["kind"] for n in graph.successors(norm)] == ["add"]  # the norm's output is summed
