"""Multi-head pooling attention (MViT, Fan et al. 2021): the op against its slow reference
(``tests/references/pooling_attention.py``) on every option, its shape rule's refusals, and MViT's blocks (a query
stride with a max-pooled shortcut, a widening MLP step with ``proj``) in a network."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import ROOT, build_op, max_diff, perturbed
from references.pooling_attention import reference

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import CHANNEL_MIXERS, TOKEN_MIXERS
from metaformer_lab.ops.pooling_attention import PoolingAttentionSpec

TOL = 1e-5

_OPTIONS = [
    ({"num_heads": 2, "kv_stride": 2}, TensorType("tokens", 16, 4, 4)),
    ({"num_heads": 2, "q_stride": 2, "kv_stride": 2}, TensorType("tokens", 16, 4, 6, prefix=1)),
    ({"num_heads": 1, "kv_stride": 4}, TensorType("tokens", 8, 4, 4, prefix=1)),
    ({"num_heads": 2, "q_stride": 2, "kv_stride": 4, "kernel": 5, "fused": False}, TensorType("tokens", 8, 4, 4)),
    ({"num_heads": 2, "head_dim": 6, "q_stride": 2, "qkv_bias": False}, TensorType("tokens", 8, 2, 4, prefix=2)),
    ({"head_dim": 4, "kernel": 1, "q_stride": 2, "mode": "max", "norm": None}, TensorType("tokens", 16, 4, 4)),
    ({"num_heads": 2, "q_stride": 2, "kv_stride": 2, "mode": "avg", "norm": None},
     TensorType("tokens", 16, 4, 4, prefix=1)),
    ({"num_heads": 2, "q_stride": 2, "kv_stride": 2, "residual_pooling": True},
     TensorType("tokens", 16, 4, 4, prefix=1)),
    ({"num_heads": 2, "q_stride": 2, "residual_pooling": True, "fused": False}, TensorType("tokens", 16, 4, 4)),
    ({"num_heads": 2, "kernel": 1}, TensorType("tokens", 16, 3, 3, prefix=1)),
    ({"num_heads": 2, "q_stride": 2, "kv_stride": 4, "rel_pos": True, "residual_pooling": True},
     TensorType("tokens", 16, 4, 8, prefix=1)),
    ({"num_heads": 2, "kv_stride": 2, "rel_pos": True, "fused": False}, TensorType("tokens", 16, 4, 2)),
    ({"num_heads": 2, "q_stride": 2, "rel_pos": True}, TensorType("tokens", 16, 4, 4, prefix=2)),
    ({"num_heads": 2, "kernel": 1, "rel_pos": True}, TensorType("tokens", 16, 3, 3)),
]


@pytest.mark.parametrize(("config", "x_type"), _OPTIONS, ids=[str(i) for i in range(len(_OPTIONS))])
def test_pooling_attention_matches_the_reference(config: dict[str, Any], x_type: TensorType) -> None:
    op = perturbed(build_op(TOKEN_MIXERS, "pooling_attention", config, x_type))
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        y = op(x)
        assert y.shape == x_type.with_grid(x_type.height // op.q_stride, x_type.width // op.q_stride).shape(2)
        assert max_diff(y, reference(op, x)) < TOL


def test_pooling_only_where_slowfast_pools() -> None:
    """q is pooled only with a stride, k and v unless kernel and stride are 1 (SlowFast's ``kernel_q = ()``)."""
    x = TensorType("tokens", 16, 4, 4, prefix=1)
    plain = build_op(TOKEN_MIXERS, "pooling_attention", {"num_heads": 2}, x)
    assert plain.pool_q is None and plain.norm_q is None and plain.pool_k is not None and plain.norm_v is not None
    assert tuple(plain.pool_k.weight.shape) == (8, 1, 3, 3)  # depthwise over one head's width, shared by the heads
    bare = build_op(TOKEN_MIXERS, "pooling_attention", {"num_heads": 2, "kernel": 1}, x)
    assert bare.pool_k is None and bare.pool_v is None
    assert {n for n, _ in build_op(TOKEN_MIXERS, "pooling_attention", {"num_heads": 2, "q_stride": 2}, x)
            .named_parameters()} == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "pool_q.weight",
                                     "norm_q.weight", "norm_q.bias", "pool_k.weight", "norm_k.weight", "norm_k.bias",
                                     "pool_v.weight", "norm_v.weight", "norm_v.bias"}


_BAD = [
    ({"num_heads": 2, "q_stride": 2}, TensorType("tokens", 16, 4, 3), "q_stride", "does not divide the 4x3"),
    ({"num_heads": 2, "kv_stride": 4}, TensorType("tokens", 16, 6, 6, prefix=1), "kv_stride", "does not divide"),
    ({"num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads", "does not divide dim 16"),
    ({"num_heads": 2, "mode": "max"}, TensorType("tokens", 16, 4, 4), "norm", "set norm: null"),
    ({"num_heads": 2}, TensorType("maps", 16, 4, 4), "type", "tokens"),
    ({"num_heads": 2}, TensorType("tokens", 16, 0, 0, prefix=1), "type", "needs the token grid"),
]


@pytest.mark.parametrize(("config", "x_type", "field", "message"), _BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(_BAD)])
def test_shape_rule_names_the_field(config: dict[str, Any], x_type: TensorType, field: str, message: str) -> None:
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("pooling_attention").resolve(PoolingAttentionSpec.model_validate(config), x_type)
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize("config", [{"kernel": 2}, {"q_stride": 0}, {"mode": "lp"}],
                         ids=["even-kernel", "zero-stride", "unknown-mode"])
def test_field_limits_are_checked_by_the_config(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PoolingAttentionSpec.model_validate(config)


def test_mlp_proj_widens_with_a_projection_of_its_input() -> None:
    """``fc2(act(fc1(x))) + proj(x)`` at ``out_dim`` (MViT v1's widening block: ``x = proj(n) + mlp(n)``)."""
    x_type = TensorType("tokens", 8, 2, 3, prefix=1)
    mlp = perturbed(build_op(CHANNEL_MIXERS, "mlp", {"out_dim": 16, "proj": True}, x_type))
    x = torch.randn(x_type.shape(2))
    expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))) + mlp.proj(x)
    with torch.no_grad():
        assert max_diff(mlp(x), expected) < TOL
    assert mlp(x).shape == (2, 7, 16)


def test_the_example_runs_mvit_blocks() -> None:
    net = perturbed(ml.build(ml.load_spec(ROOT / "examples" / "tiny_pooling_attention.yaml")))
    assert [t.height for t in net.feature_types] == [8, 4, 2]
    transition = net.stages[1].blocks[0]
    assert transition.token_mixer.pool_q is not None  # queries pooled with stride 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = net.stages[0](net.stem(x))  # (B, 1 + 8*8, 64)
        h = transition.token_mixer(transition.norm1(tokens))
        s = transition.shortcut(tokens)  # the class token passes, the grid is max-pooled 3x3, stride 2
        assert h.shape == s.shape == (2, 1 + 16, 64)
        grid = tokens[:, 1:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.max_pool2d(grid, 3, 2, 1).flatten(2).transpose(1, 2)
        assert max_diff(s, torch.cat([tokens[:, :1], pooled], dim=1)) == 0
        assert net(x).shape == (2, 10)
        assert max_diff(ml.deploy(net)(x), net(x)) < 1e-4
