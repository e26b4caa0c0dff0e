"""Focal self-attention (Focal Transformer, Yang et al. 2021): ``focal_attention`` against the slow reference in
``tests/references/focal_attention.py`` (the authors' rolls, trim, pooling and unfold, window by window and head by
head), for each option; its refusals; and its place in a network."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from references.focal_attention import reference

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5


@pytest.mark.parametrize(("config", "x"), [
    ({"window": 2, "expand": 1, "focal_window": 3}, TensorType("tokens", 16, 4, 6)),
    ({"window": 3, "expand": 2, "focal_window": 1, "fused": False}, TensorType("tokens", 16, 6, 6)),
    ({"window": 4, "expand": 2, "focal_level": 3, "focal_window": 1}, TensorType("tokens", 16, 8, 8)),
    ({"window": 3, "expand": 0, "focal_level": 3, "focal_window": 3, "pool": "mean"}, TensorType("tokens", 16, 6, 9)),
    ({"window": 2, "expand": 1, "pool": "max", "qkv_bias": False}, TensorType("tokens", 16, 4, 4)),
    ({"window": 2, "expand": 1, "pool": "conv"}, TensorType("tokens", 16, 4, 4)),
    ({"window": 4, "expand": 0, "focal_window": 1}, TensorType("tokens", 16, 4, 4)),
    ({"window": 2, "expand": 1, "focal_level": 1}, TensorType("tokens", 16, 4, 4)),
    ({"window": 4, "expand": 3, "focal_level": 4, "focal_window": 3}, TensorType("tokens", 16, 8, 8)),
], ids=["two-levels", "explicit", "three-levels", "mean-cropped", "max-no-bias", "conv", "last-stage", "fine-only",
        "four-levels"])
def test_focal_attention_matches_the_written_out_reference(config: dict[str, Any], x: TensorType) -> None:
    ours = perturbed(build_op(TOKEN_MIXERS, "focal_attention", {"num_heads": 2, **config}, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(ours(inputs), reference(ours, inputs)) <= TOL


def test_focal_attention_to_another_width_matches_the_reference() -> None:
    x = TensorType("tokens", 16, 4, 4)
    ours = perturbed(build_op(TOKEN_MIXERS, "focal_attention", {"window": 2, "expand": 1, "num_heads": 2}, x))
    wide = TOKEN_MIXERS.get("focal_attention").make(
        op_spec(TOKEN_MIXERS, "focal_attention", {"window": 2, "expand": 1, "num_heads": 2}), x, 24)
    perturbed(wide)
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert wide(inputs).shape == (2, 4, 4, 24)
        assert max_diff(wide(inputs), reference(wide, inputs)) <= TOL
        assert max_diff(ours(inputs), reference(ours, inputs)) <= TOL


def test_focal_attention_has_the_authors_parameter_names_and_shapes() -> None:
    module = build_op(TOKEN_MIXERS, "focal_attention", {"num_heads": 3, "window": 7, "expand": 3, "focal_window": 7},
                      TensorType("tokens", 96, 56, 56))
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {  # layers.0.blocks.0 of focal_tiny_patch4_window7_224: attn.* and pool_layers.0
        "qkv.weight": (288, 96), "qkv.bias": (288,), "proj.weight": (96, 96), "proj.bias": (96,),
        "relative_position_bias_table": (169, 3), "relative_position_bias_table_to_neighbors": (1, 3, 49, 132),
        "relative_position_bias_table_to_windows.0": (3, 169), "pool_layers.0.weight": (1, 49),
        "pool_layers.0.bias": (1,)}
    assert module.pool_layers[0].weight.eq(1 / 49).all()  # the authors' block fills the fc pooling with the mean


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"window": 3}, TensorType("tokens", 16, 4, 6), "window", "3 does not divide the 4x6 feature map"),
    ({"window": 2, "expand": 2}, TensorType("tokens", 16, 4, 4), "expand", "2 must be less than the window (2)"),
    ({"window": 4, "expand": 1}, TensorType("tokens", 16, 8, 4), "expand",
     "the window spans the 8x4 map's whole width, so the ring would wrap around onto the window's own tokens; set "
     "expand: 0 (as the authors do there)"),
    ({"window": 2, "expand": 1, "focal_level": 4}, TensorType("tokens", 16, 4, 4), "focal_level",
     "level 4 pools sub-windows of window // 4 tokens, less than one in a 2-wide window"),
    ({"window": 2, "expand": 1}, TensorType("maps", 16, 4, 4), None, "tokens"),
    ({"window": 2, "expand": 1}, TensorType("tokens", 16, 4, 4, prefix=1), None, "prefix"),
], ids=["window", "expand", "expand-whole-map", "focal-level", "maps", "prefix"])
def test_focal_attention_refuses_bad_settings_with_the_field(config: dict[str, Any], x: TensorType,
                                                             field: str | None, message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "focal_attention", {"num_heads": 2, **config})
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("focal_attention").resolve(spec, x)
    if field is None:
        assert message in err.value.message
    else:
        assert (err.value.field, err.value.message) == (field, message)


def test_focal_attention_refuses_an_even_focal_window_in_the_spec() -> None:
    with pytest.raises(ValueError, match="odd"):
        op_spec(TOKEN_MIXERS, "focal_attention", {"focal_window": 4})


def test_focal_attention_reports_its_path_in_a_network() -> None:
    spec = {"name": "f", "input": {"channels": 3, "size": 32}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 16, "layout": "tokens",
                        "block": {"token_mixer": {"type": "focal_attention", "window": 3, "num_heads": 2}}}],
            "head": {"type": "pool_norm_linear"}}
    with pytest.raises(ml.SpecError, match=r"stages\[0\]\.block\.token_mixer\.window: 3 does not divide the 8x8"):
        ml.build(spec)
