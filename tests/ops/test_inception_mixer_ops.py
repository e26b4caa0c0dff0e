"""The inception mixer (iFormer, Si et al. 2022) against its slow written-out reference (``references/
inception_mixer.py``) for every option combination, its parameter names (the authors'), and its shape rule's
refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from references.inception_mixer import reference

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5


@pytest.mark.parametrize("layout", ["tokens", "maps"])
@pytest.mark.parametrize(("config", "grid"), [
    ({"head_dim": 4, "attention_heads": 2, "pool_size": 2}, (4, 6)),
    ({"num_heads": 4, "attention_heads": 1}, (3, 5)),
    ({"num_heads": 4, "attention_heads": 3, "pool_size": 3, "qkv_bias": False}, (6, 3)),
    ({"head_dim": 2, "attention_heads": 5, "pool_size": 2, "kernel": 5}, (4, 4)),
    ({"head_dim": 4, "attention_heads": 2, "pool_size": 2, "fused": False}, (2, 4)),
], ids=["pool-2", "no-pool", "pool-3-no-bias", "kernel-5", "explicit-softmax"])
def test_inception_mixer_matches_the_written_out_reference(config: dict[str, Any], grid: tuple[int, int],
                                                           layout: str) -> None:
    torch.manual_seed(0)
    x = TensorType(layout, 16, *grid)
    module = perturbed(build_op(TOKEN_MIXERS, "inception_mixer", config, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(module(inputs), reference(module, inputs)) <= TOL


def test_inception_mixer_passes_prefix_tokens_around_it() -> None:
    x = TensorType("tokens", 16, 4, 4, prefix=1)
    module = perturbed(build_op(TOKEN_MIXERS, "inception_mixer",
                                {"head_dim": 4, "attention_heads": 2, "pool_size": 2, "prefix": "pass"}, x))
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        out = module(inputs)
        grid = reference(module.op, inputs[:, 1:].unflatten(1, (4, 4))).flatten(1, 2)
    assert torch.equal(out[:, :1], inputs[:, :1])
    assert max_diff(out[:, 1:], grid) <= TOL


@pytest.mark.parametrize("kernel", [3, 5])
def test_the_deploy_form_moves_the_fuse_residual_into_the_depthwise_conv(kernel: int) -> None:
    x = TensorType("tokens", 16, 4, 4)
    module = perturbed(build_op(TOKEN_MIXERS, "inception_mixer", {"head_dim": 4, "attention_heads": 2,
                                                                  "pool_size": 2, "kernel": kernel}, x))
    deployed = ml.deploy(module)
    inputs = torch.randn(x.shape(2))
    assert module.fuse_residual and not deployed.fuse_residual
    with torch.no_grad():
        assert max_diff(deployed(inputs), reference(module, inputs)) <= TOL


def test_inception_mixer_has_the_authors_parameter_names_and_shapes() -> None:
    """iFormer-S stage 3's first blocks: 320 wide, heads of 32, 7 attention heads (224 low, 96 high channels)."""
    module = build_op(TOKEN_MIXERS, "inception_mixer", {"num_heads": 10, "attention_heads": 7},
                      TensorType("tokens", 320, 14, 14))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "high_mixer.conv1.weight": (96, 48, 1, 1), "high_mixer.proj1.weight": (96, 1, 3, 3),
        "high_mixer.proj2.weight": (96, 48, 1, 1), "high_mixer.proj2.bias": (96,),
        "low_mixer.qkv.weight": (672, 224), "low_mixer.qkv.bias": (672,),
        "conv_fuse.weight": (416, 1, 3, 3), "proj.weight": (320, 416, 1, 1), "proj.bias": (320,),
    }


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads", "3 does not divide dim 16"),
    ({"num_heads": 4, "head_dim": 8}, TensorType("tokens", 16, 4, 4), "num_heads",
     "4 heads of 8 give 32 channels, but the input has 16"),
    ({"num_heads": 4, "attention_heads": 4}, TensorType("tokens", 16, 4, 4), "attention_heads",
     "4 of the 4 heads leave no high-frequency channels; take fewer"),
    ({"head_dim": 3, "attention_heads": 2}, TensorType("tokens", 15, 4, 4), "attention_heads",
     "the high-frequency part (9 channels) must be even: its two branches take half each"),
    ({"num_heads": 4, "pool_size": 2}, TensorType("maps", 16, 4, 5), "pool_size",
     "2 does not divide the 4x5 grid"),
    ({"num_heads": 4}, TensorType("tokens", 16, 4, 4, prefix=1), "type",
     "inception_mixer works on the token grid only, but the input has 1 prefix token(s); its prefix field (pass, "
     "zero or linear) routes the 1 prefix token(s) around it"),
], ids=["heads-divide", "heads-times-width", "no-high", "odd-high", "pool-divides", "prefix"])
def test_inception_mixer_refusals_name_the_field(config: dict[str, Any], x: TensorType, field: str,
                                                 message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "inception_mixer", config)
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("inception_mixer").resolve(spec, x)
    assert (err.value.field, err.value.message) == (field, message)
