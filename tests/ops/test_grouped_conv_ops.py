"""Grouped convs wherever a conv is declared (``groups``), and the inner residual ``y + dw(y)`` of
``conv_ffn`` and ``mbconv`` (``dw_residual``): the modules use them, the shape rules check them, and
latency keys of configs that leave them at their defaults are unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, op_spec
from torch import nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import LATENCY_KEY

MAPS = TensorType("maps", 16, 6, 6)
TOKENS = TensorType("tokens", 16, 6, 6)
IMAGE = TensorType("maps", 6, 16, 16)

# role, tag, config, input type, out dim, groups the op's kxk conv must get
GROUPED = [
    pytest.param("token_mixer", "dwconv", {"kernel": 3, "groups": 4}, MAPS, None, 4, id="dwconv"),
    pytest.param("token_mixer", "dwconv", {"kernel": 3}, TOKENS, None, 16, id="dwconv-depthwise"),
    pytest.param("token_mixer", "sepconv", {"kernel": 3, "groups": 8}, TOKENS, None, 8, id="sepconv"),
    pytest.param("channel_mixer", "conv_ffn", {"groups": 2}, TOKENS, None, 2, id="conv_ffn"),
    pytest.param("token_mixer", "mbconv", {"groups": 16}, MAPS, None, 16, id="mbconv"),
    pytest.param("stem", "conv", {"kernel": 3, "stride": 2, "groups": 3}, IMAGE, 12, 3, id="conv-stem"),
    pytest.param("stem", "patchify", {"patch": 4, "groups": 2}, IMAGE, 8, 2, id="patchify"),
    pytest.param("downsample", "conv", {"groups": 4}, MAPS, 32, 4, id="conv-downsample"),
    pytest.param("token_mixer", "sr_attention", {"sr_ratio": 2, "head_dim": 8, "groups": 4}, TOKENS, None, 4,
                 id="sr_attention"),
    pytest.param("pos_embed", "peg", {"groups": 2}, TOKENS, None, 2, id="peg"),
]


def _kxk_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


@pytest.mark.parametrize(("role", "tag", "config", "x", "out_dim", "groups"), GROUPED)
def test_the_declared_conv_is_grouped(role: str, tag: str, config: dict[str, Any], x: TensorType,
                                      out_dim: int | None, groups: int) -> None:
    extra = () if out_dim is None else (out_dim,)
    module = build_op(role, tag, config, x, *extra)
    [conv] = _kxk_convs(module)
    assert conv.groups == groups
    assert conv.weight.shape[1] == conv.in_channels // groups  # each output channel reads one group
    out = REGISTRIES[role].get(tag).resolve(op_spec(role, tag, config), x, out_dim).out_type
    assert tuple(module(torch.randn(x.shape(2))).shape) == out.shape(2)


def test_conv_stack_groups_each_conv() -> None:
    config = {"strides": [2, 2], "widths": [12], "groups": [3, 4]}
    module = build_op("stem", "conv_stack", config, IMAGE, 16)
    assert [c.groups for c in _kxk_convs(module)] == [3, 4]


@pytest.mark.parametrize(("role", "tag", "config", "x", "out_dim", "field", "message"), [
    pytest.param("token_mixer", "dwconv", {"groups": 3}, MAPS, None, "groups",
                 "3 does not divide the conv's 16 input channels", id="dwconv"),
    pytest.param("token_mixer", "sepconv", {"groups": 5}, MAPS, None, "groups",
                 "5 does not divide the conv's 32 hidden channels", id="sepconv"),
    pytest.param("channel_mixer", "conv_ffn", {"groups": 5}, TOKENS, None, "groups",
                 "5 does not divide the conv's 64 hidden channels", id="conv_ffn"),
    pytest.param("token_mixer", "mbconv", {"groups": 7}, MAPS, None, "groups",
                 "7 does not divide the conv's 64 hidden channels", id="mbconv"),
    pytest.param("stem", "conv", {"groups": 4}, IMAGE, 16, "groups", "4 does not divide the conv's 6 input channels",
                 id="conv-stem-input"),
    pytest.param("downsample", "conv", {"groups": 16}, MAPS, 24, "groups",
                 "16 does not divide the conv's 24 output channels", id="conv-downsample-output"),
    pytest.param("token_mixer", "sr_attention", {"sr_ratio": 2, "head_dim": 8, "groups": 3}, TOKENS, None, "groups",
                 "3 does not divide the conv's 16 input channels", id="sr_attention"),
    pytest.param("pos_embed", "peg", {"groups": 3}, TOKENS, None, "groups",
                 "3 does not divide the conv's 16 input channels", id="peg"),
    pytest.param("stem", "conv_stack", {"strides": [2, 2], "groups": [1, 5]}, IMAGE, 16, "groups[1]",
                 "5 does not divide the conv's 8 input channels", id="conv-stack"),
    pytest.param("stem", "conv_stack", {"strides": [2, 2], "groups": [1]}, IMAGE, 16, "groups",
                 "needs 2 entries (one per conv), got 1", id="conv-stack-count"),
    pytest.param("token_mixer", "mbconv", {"stride": 2, "out_dim": 16, "dw_residual": True}, MAPS, None,
                 "dw_residual", "needs the kxk conv to keep the grid, but it has stride 2",
                 id="strided-inner-residual"),
])
def test_shape_rules_reject(role: str, tag: str, config: dict[str, Any], x: TensorType, out_dim: int | None,
                            field: str, message: str) -> None:
    with pytest.raises(ShapeIssue) as err:
        REGISTRIES[role].get(tag).resolve(op_spec(role, tag, config), x, out_dim)
    assert (err.value.field, err.value.message.split(";")[0]) == (field, message)


def test_conv_ffn_inner_residual_adds_the_conv_input() -> None:
    """``dw_residual``: fc1 -> y + dwconv(y) -> act -> fc2; the same weights without it give fc2(act(dwconv(y)))."""
    x_type = TensorType("maps", 8, 5, 5)
    with_res = build_op("channel_mixer", "conv_ffn", {"dw_residual": True}, x_type)
    without = build_op("channel_mixer", "conv_ffn", {}, x_type)
    without.load_state_dict(with_res.state_dict())
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = with_res.fc1(x)
        expected = with_res.fc2(with_res.act(y + with_res.dwconv(y)))
        torch.testing.assert_close(with_res(x), expected)
        assert not torch.allclose(with_res(x), without(x))


def test_conv_ffn_dw_bias_off_drops_only_the_kxk_conv_bias() -> None:
    """``dw_bias: false`` (Visformer's SpatialMlp): the grouped kxk conv has no bias; its default keeps one, and
    latency keys leave the option out at its default."""
    x_type = TensorType("maps", 8, 5, 5)
    m = build_op("channel_mixer", "conv_ffn", {"groups": 8, "bias": False, "dw_bias": False}, x_type)
    assert m.dwconv.bias is None and m.fc1.bias is None and m.fc2.bias is None
    assert build_op("channel_mixer", "conv_ffn", {}, x_type).dwconv.bias is not None
    assert '"dw_bias"' not in op_spec("channel_mixer", "conv_ffn", {}).model_dump_json(context={LATENCY_KEY: True})
    off = op_spec("channel_mixer", "conv_ffn", {"dw_bias": False}).model_dump_json(context={LATENCY_KEY: True})
    assert '"dw_bias"' in off


def test_mbconv_inner_residual_adds_the_conv_input() -> None:
    x_type = TensorType("maps", 8, 5, 5)
    m = build_op("token_mixer", "mbconv", {"dw_residual": True, "groups": 4}, x_type)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = m.expand_act(m.expand_norm(m.expand_conv(x)))
        expected = m.project_norm(m.project_conv(m.dw_act(m.dw_norm(y + m.dw_conv(y)))))
        torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize(("role", "tag"), [("token_mixer", "dwconv"), ("token_mixer", "sepconv"),
                                           ("channel_mixer", "conv_ffn"), ("token_mixer", "mbconv"),
                                           ("stem", "conv"), ("stem", "patchify"), ("stem", "conv_stack"),
                                           ("downsample", "conv"), ("token_mixer", "sr_attention"),
                                           ("pos_embed", "peg")])
def test_latency_keys_leave_out_new_options_at_their_defaults(role: str, tag: str) -> None:
    """Shipped latency profiles were keyed before these options existed: a config that leaves them at their
    defaults serialises as it did then; one that sets them gets a key of its own."""
    spec = op_spec(role, tag, {})
    key = spec.model_dump_json(context={LATENCY_KEY: True})
    assert '"groups"' not in key and '"dw_residual"' not in key
    assert '"groups"' in spec.model_dump_json()
    grouped = op_spec(role, tag, {"groups": [1, 1] if tag == "conv_stack" else 2})
    assert grouped.model_dump_json(context={LATENCY_KEY: True}) != key
