"""The attention token mixers against the real timm modules (same weights, perturbed first), a naive
O(N²) reference for linear attention, fused vs explicit paths, shape rules and gradients."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed, port
from timm.layers import Attention as TimmAttention
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.attention import AttentionSpec

TOL = 1e-5
B = 2


_op = partial(build_op, TOKEN_MIXERS)


# --- global attention ---------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("heads", "head_dim", "qkv_bias", "qk_norm"), [
    (4, None, True, False), (4, None, False, True), (2, 12, True, True)], ids=["vit", "qk-norm", "inner-width"])
def test_attention_matches_timm_vit_attention(fused: bool, heads: int, head_dim: int | None, qkv_bias: bool,
                                              qk_norm: bool) -> None:
    x_type = TensorType("tokens", 32, 4, 5, prefix=1)
    ref = TimmAttention(32, num_heads=heads, attn_head_dim=head_dim, qkv_bias=qkv_bias, qk_norm=qk_norm,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref.fused_attn = fused
    ours = port(ref, _op("attention", {"num_heads": heads, "head_dim": head_dim, "qkv_bias": qkv_bias,
                                       "qk_norm": qk_norm, "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_timm_metaformer_attention(fused: bool) -> None:
    x_type = TensorType("tokens", 64, 4, 5)
    ref = MetaFormerAttention(64, head_dim=32)  # qkv_bias and proj_bias off
    ref.fused_attn = fused
    ours = port(ref, _op("attention", {"head_dim": 32, "proj_bias": False, "fused": fused,
                                       "scale_order": "after"}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x.flatten(1, 2)).unflatten(1, x_type.grid)) <= TOL


def test_attention_on_maps_is_attention_on_flattened_tokens() -> None:
    x_type = TensorType("maps", 32, 4, 5)
    ref = TimmAttention(32, num_heads=4, qkv_bias=True)
    ref.fused_attn = True
    ours = port(ref, _op("attention", {"num_heads": 4, "qkv_bias": True}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = ref(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        assert max_diff(ours(x), expected) <= TOL


# --- window attention ---------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("grid", "window", "shift"), [
    ((8, 12), 4, False), ((8, 12), 4, True), ((4, 12), 4, True), ((4, 4), 4, True)],
    ids=["w-msa", "sw-msa", "shift-one-axis", "window-covers-map"])
def test_window_attention_matches_timm_swin(fused: bool, grid: tuple[int, int], window: int, shift: bool) -> None:
    """Against ``SwinTransformerBlock._attn``: roll, partition, WindowAttention with its mask, merge, roll back."""
    x_type = TensorType("tokens", 32, *grid)
    block = SwinTransformerBlock(32, input_resolution=grid, num_heads=2, window_size=window,
                                 shift_size=window // 2 if shift else 0)
    block.attn.fused_attn = fused
    ours = port(block.attn, _op("window_attention", {"window": window, "shift": shift, "num_heads": 2,
                                                     "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), block._attn(x)) <= TOL
    assert tuple(block.shift_size) == ours.shift
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                      "relative_position_bias_table"}


def test_window_attention_mask_matches_timm_swin() -> None:
    block = SwinTransformerBlock(16, input_resolution=(8, 12), num_heads=2, window_size=4, shift_size=2)
    ours = _op("window_attention", {"window": 4, "shift": True, "num_heads": 2}, TensorType("tokens", 16, 8, 12))
    assert torch.equal(ours.attn_mask.squeeze(1), block.attn_mask)  # -100 across regions, 0 within


@pytest.mark.parametrize("fused", [True, False])
def test_window_attention_matches_twins_locally_grouped_attention(fused: bool) -> None:
    x_type = TensorType("tokens", 32, 8, 12)
    ref = LocallyGroupedAttn(32, num_heads=4, ws=4)
    ref.fused_attn = fused
    ours = port(ref, _op("window_attention", {"window": 4, "num_heads": 4, "rel_pos_bias": False, "fused": fused},
                         x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = ref(x.flatten(1, 2), x_type.grid).unflatten(1, x_type.grid)
        assert max_diff(ours(x), expected) <= TOL


# --- spatial-reduction attention ----------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("sr_ratio", "linear"), [(2, False), (1, False), (4, True)], ids=["sr2", "sr1", "li"])
def test_sr_attention_matches_timm_pvt_v2(fused: bool, sr_ratio: int, linear: bool) -> None:
    x_type = TensorType("tokens", 64, 8, 12)
    ref = PvtAttention(64, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear, qkv_bias=True)
    ref.fused_attn = fused
    config = {"num_heads": 2, "sr_ratio": sr_ratio, "reduction": "pool" if linear else "conv", "fused": fused}
    ours = port(ref, _op("sr_attention", config, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = ref(x.flatten(1, 2), list(x_type.grid)).unflatten(1, x_type.grid)
        assert max_diff(ours(x), expected) <= TOL


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_sr_attention_matches_twins_global_subsampled_attention(sr_ratio: int) -> None:
    x_type = TensorType("tokens", 64, 8, 12)
    ref = GlobalSubSampleAttn(64, num_heads=4, sr_ratio=sr_ratio)
    ref.fused_attn = True
    ours = port(ref, _op("sr_attention", {"num_heads": 4, "sr_ratio": sr_ratio}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = ref(x.flatten(1, 2), x_type.grid).unflatten(1, x_type.grid)
        assert max_diff(ours(x), expected) <= TOL


# --- linear attention ---------------------------------------------------------------------------

def naive_linear_attention(module: nn.Module, x: Tensor, phi: Any, eps: float) -> Tensor:
    """O(N²): the attention matrix with softmax replaced by phi(q) phi(k)ᵀ, normalised per row."""
    N, heads = x.shape[1], module.num_heads
    qkv = module.qkv(x).reshape(x.shape[0], N, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
    q, k, v = qkv.double().unbind(0)
    sim = phi(q) @ phi(k).transpose(-2, -1)  # (B, heads, N, N)
    attn = sim / (sim.sum(dim=-1, keepdim=True) + eps)
    y = (attn @ v).float().transpose(1, 2).reshape(x.shape[0], N, -1)  # (B, N, heads*d)
    return module.proj(y)


@pytest.mark.parametrize(("feature_map", "phi"), [("elu", lambda t: F.elu(t) + 1), ("relu", F.relu)])
@pytest.mark.parametrize("x_type", [TensorType("tokens", 32, 4, 5, prefix=2), TensorType("tokens", 32, 4, 5)],
                         ids=["prefixed", "grid"])
def test_linear_attention_matches_naive_quadratic_form(feature_map: str, phi: Any, x_type: TensorType) -> None:
    ours = perturbed(_op("linear_attention", {"feature_map": feature_map, "num_heads": 4, "qkv_bias": True}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = naive_linear_attention(ours, x.reshape(B, x_type.num_tokens, -1), phi, ours.eps)
        assert max_diff(ours(x), expected.reshape(x.shape)) <= TOL


def test_linear_attention_on_maps_is_linear_attention_on_tokens() -> None:
    tokens = perturbed(_op("linear_attention", {"num_heads": 2}, TensorType("tokens", 16, 4, 5)))
    maps = _op("linear_attention", {"num_heads": 2}, TensorType("maps", 16, 4, 5))
    maps.load_state_dict(tokens.state_dict())
    x = torch.randn(B, 4, 5, 16)
    with torch.no_grad():
        assert max_diff(maps.eval()(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), tokens(x)) <= TOL


# --- fused vs explicit --------------------------------------------------------------------------

@pytest.mark.parametrize(("tag", "config", "x_type"), [
    ("attention", {"num_heads": 4, "qk_norm": True}, TensorType("tokens", 32, 4, 5, prefix=1)),
    ("attention", {"scale_order": "after"}, TensorType("maps", 64, 4, 5)),
    ("window_attention", {"window": 4, "shift": True, "num_heads": 2}, TensorType("tokens", 32, 8, 8)),
    ("sr_attention", {"sr_ratio": 2, "num_heads": 2}, TensorType("tokens", 32, 8, 8)),
    ("sr_attention", {"reduction": "pool", "pool_size": 3, "num_heads": 2}, TensorType("tokens", 32, 8, 8)),
], ids=["attention", "attention-scale-after", "window-shifted", "sr", "sr-pool"])
def test_fused_and_explicit_paths_agree(tag: str, config: dict[str, Any], x_type: TensorType) -> None:
    fused = perturbed(_op(tag, {**config, "fused": True}, x_type))
    explicit = _op(tag, {**config, "fused": False}, x_type)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(fused(x), explicit.eval()(x)) <= TOL


# --- config and shape rules ---------------------------------------------------------------------

def test_head_dim_default_follows_num_heads() -> None:
    assert AttentionSpec().head_dim == 32  # MetaFormer: heads = dim // 32
    assert AttentionSpec(num_heads=6).head_dim is None  # ViT: head_dim = dim // 6
    assert AttentionSpec(num_heads=6, head_dim=32).head_dim == 32  # both: inner width 192
    for spec in (AttentionSpec(), AttentionSpec(num_heads=6), AttentionSpec(num_heads=6, head_dim=32)):
        for dump in ({}, {"exclude_unset": True}, {"exclude_defaults": True}):
            assert AttentionSpec.model_validate(spec.model_dump(mode="json", **dump)) == spec


_TOK = TensorType("tokens", 320, 8, 8)
_BAD = [
    ("attention", {"num_heads": 6}, _TOK, "num_heads", "6 does not divide dim 320"),
    ("attention", {"head_dim": 48}, _TOK, "head_dim", "48 does not divide dim 320"),
    ("attention", {"num_heads": None, "head_dim": None}, _TOK, "head_dim", "null needs num_heads"),
    ("attention", {}, TensorType("vector", 320), "type", "needs layout 'maps' or 'tokens'"),
    ("window_attention", {}, TensorType("tokens", 64, 4, 4), "window", "7 does not divide the 4x4 feature map"),
    ("window_attention", {"window": 4}, TensorType("tokens", 64, 4, 4, prefix=1), "type", "1 prefix token(s)"),
    ("window_attention", {"window": 4}, TensorType("maps", 64, 4, 4), "type", "needs layout 'tokens'"),
    ("window_attention", {"window": 4, "num_heads": 6}, _TOK, "num_heads", "6 does not divide dim 320"),
    ("sr_attention", {"sr_ratio": 3}, _TOK, "sr_ratio", "3 does not divide the 8x8 feature map"),
    ("sr_attention", {"sr_ratio": 2, "norm": {"type": "groupnorm", "groups": 3}}, _TOK, "norm.groups",
     "3 does not divide 320 channels"),
    ("sr_attention", {}, TensorType("tokens", 64, 0, 0, prefix=1), "type", "the prefix tokens only"),
    ("linear_attention", {"num_heads": 6}, TensorType("maps", 320, 4, 4), "num_heads", "6 does not divide dim 320"),
]


@pytest.mark.parametrize(("tag", "config", "x_type", "field", "message"), _BAD,
                         ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(_BAD)])
def test_shape_rules_name_the_field(tag: str, config: dict[str, Any], x_type: TensorType, field: str,
                                    message: str) -> None:
    opdef = TOKEN_MIXERS.get(tag)
    with pytest.raises(ShapeIssue) as err:
        opdef.resolve(opdef.spec.model_validate({"type": tag, **config}), x_type)
    assert err.value.field == field
    assert message in err.value.message


def test_pool_reduction_ignores_sr_ratio() -> None:
    x_type = TensorType("tokens", 64, 6, 6)
    opdef = TOKEN_MIXERS.get("sr_attention")
    assert opdef.resolve(opdef.spec.model_validate({"reduction": "pool", "sr_ratio": 4}), x_type).out_type == x_type


# --- training -----------------------------------------------------------------------------------

_TRAIN = [
    ("attention", {"num_heads": 2, "head_dim": 12, "qkv_bias": True, "qk_norm": True, "attn_drop": 0.1},
     TensorType("tokens", 32, 4, 4, prefix=1)),
    ("window_attention", {"window": 2, "shift": True, "num_heads": 2, "fused": False}, TensorType("tokens", 16, 4, 6)),
    ("sr_attention", {"reduction": "pool", "pool_size": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 4)),
    ("sr_attention", {"sr_ratio": 2, "num_heads": 2, "norm": {"type": "batchnorm"}}, TensorType("tokens", 16, 4, 4)),
    ("linear_attention", {"feature_map": "relu", "num_heads": 2}, TensorType("maps", 16, 4, 4)),
]


@pytest.mark.parametrize(("tag", "config", "x_type"), _TRAIN, ids=[t[0] for t in _TRAIN])
def test_every_parameter_gets_a_gradient(tag: str, config: dict[str, Any], x_type: TensorType) -> None:
    module = _op(tag, config, x_type).train()
    module(torch.randn(x_type.shape(B))).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("tag", "config", "x_type"), _TRAIN, ids=[t[0] for t in _TRAIN])
def test_builds_and_runs_on_the_meta_device(tag: str, config: dict[str, Any], x_type: TensorType) -> None:
    """The cost model builds every op on ``meta``: masks and index buffers must follow the device."""
    with torch.device("meta"):
        module = _op(tag, config, x_type)
    assert module(torch.empty(x_type.shape(B), device="meta")).shape == x_type.shape(B)
