"""The isotropic MLP models' ops against timm's mlp_mixer modules (same weights, perturbed first):
ResMLP's Affine norm (bit-exact, as timm computes it with addcmul) and the token mixers of MixerBlock
and ResBlock."""

from __future__ import annotations

import pytest
import torch
from helpers import build_op, max_diff, perturbed
from timm.models.mlp_mixer import Affine as TimmAffine
from timm.models.mlp_mixer import MixerBlock, ResBlock
from torch import Tensor

from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import NORMS, TOKEN_MIXERS

B = 2
TOL = 1e-5
_TOKENS = TensorType("tokens", 16, 3, 4)


def _as_sequence(x: Tensor) -> Tensor:
    return x.flatten(1, 2)  # (B, H, W, C) -> (B, N, C), timm's layout


def test_affine_matches_timm_affine_exactly() -> None:
    ref = perturbed(TimmAffine(_TOKENS.channels))
    ours = build_op(NORMS, "affine", {}, _TOKENS)
    with torch.no_grad():
        for name in ("alpha", "beta"):
            getattr(ours, name).copy_(getattr(ref, name).reshape(-1))  # timm: (1, 1, C); ours: (C,)
    x = torch.randn(_TOKENS.shape(B))
    with torch.no_grad():
        assert torch.equal(_as_sequence(ours(x)), ref(_as_sequence(x)))


def test_affine_on_maps_equals_affine_on_tokens() -> None:
    maps = TensorType("maps", 16, 3, 4)
    on_tokens, on_maps = build_op(NORMS, "affine", {}, _TOKENS), build_op(NORMS, "affine", {}, maps)
    perturbed(on_tokens)
    on_maps.load_state_dict(on_tokens.state_dict())
    x = torch.randn(_TOKENS.shape(B))
    with torch.no_grad():
        assert torch.equal(on_maps(x.permute(0, 3, 1, 2)), on_tokens(x).permute(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_token_mlp_matches_mixer_block(layout: str) -> None:
    x_type = TensorType(layout, 16, 3, 4)
    ref = perturbed(MixerBlock(16, x_type.height * x_type.width))
    ours = build_op(TOKEN_MIXERS, "token_mlp", {}, x_type)
    ours.mlp.load_state_dict(ref.mlp_tokens.state_dict(), strict=True)
    seq = torch.randn(B, x_type.height * x_type.width, 16)  # (B, N, C)
    x = seq.unflatten(1, x_type.grid)  # (B, H, W, C)
    if layout == "maps":
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    with torch.no_grad():
        expected = ref.mlp_tokens(seq.transpose(1, 2)).transpose(1, 2)  # timm: mix over N
        y = ours(x)
        y = y.permute(0, 2, 3, 1) if layout == "maps" else y  # -> (B, H, W, C)
        assert max_diff(_as_sequence(y), expected) <= TOL


def test_token_linear_matches_res_block() -> None:
    ref = perturbed(ResBlock(16, _TOKENS.height * _TOKENS.width))
    ours = build_op(TOKEN_MIXERS, "token_linear", {}, _TOKENS)
    ours.fc.load_state_dict(ref.linear_tokens.state_dict(), strict=True)
    x = torch.randn(_TOKENS.shape(B))
    with torch.no_grad():
        expected = ref.linear_tokens(_as_sequence(x).transpose(1, 2)).transpose(1, 2)
        assert max_diff(_as_sequence(ours(x)), expected) <= TOL
