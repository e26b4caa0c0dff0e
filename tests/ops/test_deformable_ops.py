"""The conv downsampler's ``deformable`` option (DCNv1, LITv2's deformable token merging) against torchvision's
``deform_conv2d`` with the same weights and offsets, the plain conv it is at zero offsets, its costs and the
shape rule's refusal."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed
from torchvision.ops import deform_conv2d

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost
from metaformer_lab.latency.gpu import estimate_gpu
from metaformer_lab.ops.downsamplers import DeformConv2d

TOL = 1e-5


@pytest.mark.parametrize(("kernel", "stride", "padding", "size"), [(2, 2, 0, (8, 6)), (3, 2, 1, (7, 9)),
                                                                   (3, 1, 1, (5, 5))])
def test_deformable_conv_matches_torchvision(kernel: int, stride: int, padding: int, size: tuple[int, int]) -> None:
    conv = DeformConv2d(6, 10, kernel, stride, padding, bias=True)
    for p in conv.parameters():
        p.data.normal_(0, 0.5)  # offsets of a pixel or two, some outside the map
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        expected = deform_conv2d(x, conv.conv_offset(x), conv.weight, conv.bias, stride=stride, padding=padding)
        assert max_diff(conv(x), expected) < TOL


def test_at_zero_offsets_it_is_the_plain_conv() -> None:
    conv = DeformConv2d(6, 10, 2, 2, 0, bias=True)  # the offset conv starts at zero (DTM's init)
    x = torch.randn(2, 6, 8, 6)
    with torch.no_grad():
        assert max_diff(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2)) < TOL


def test_the_downsampler_carries_the_offset_conv() -> None:
    config = {"kernel": 2, "padding": 0, "norm_after": {"type": "batchnorm"}, "act": "gelu"}
    x = TensorType("maps", 8, 8, 6)
    plain = build_op("downsample", "conv", config, x, 16)
    dtm = perturbed(build_op("downsample", "conv", {**config, "deformable": True}, x, 16))
    assert count_params(dtm) - count_params(plain) == 2 * 4 * 8 * 4 + 8  # 8 offset channels, k = 2
    assert isinstance(dtm.conv, DeformConv2d)
    assert dtm(torch.randn(2, 8, 8, 6)).shape == (2, 16, 4, 3)


def _spec(downsample: dict[str, Any]) -> dict[str, Any]:
    return {"name": "d", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 2},
            "stages": [{"depth": 1, "dim": 8, "layout": "tokens",
                        "block": {"token_mixer": None, "channel_mixer": {"type": "conv_ffn", "ratio": 2.0}}},
                       {"depth": 1, "dim": 16, "layout": "tokens", "downsample": downsample,
                        "block": {"token_mixer": None, "channel_mixer": {"type": "conv_ffn", "ratio": 2.0}}}],
            "head": {"type": "pool_norm_linear"}}


def test_costs_count_the_offset_conv_and_the_sampled_conv() -> None:
    dtm = {"type": "conv", "kernel": 2, "stride": 2, "padding": 0, "norm_after": {"type": "batchnorm"},
           "act": "gelu", "deformable": True}
    graph = ml.to_graph(_spec(dtm))
    net = ml.build(graph).eval()
    cost = graph_cost(graph)
    flops, _ = count_flops(lambda: net(torch.zeros(graph.input_type.shape(1))))
    assert (cost.params, cost.flops) == (count_params(net), flops)
    plain = graph_cost(ml.to_graph(_spec({**dtm, "deformable": False})))
    assert cost.flops - plain.flops == 2 * (4 * 4) * (8 * 4) * 8  # the offset conv's MACs, 4x4 outputs
    assert estimate_gpu(graph, "h100", dtype="float32").flops >= plain.flops


def test_a_grouped_deformable_conv_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        ml.to_graph(_spec({"type": "conv", "kernel": 2, "groups": 2, "deformable": True}))
    assert [(i.path, i.message) for i in err.value.issues] == [
        ("stages[1].downsample.deformable", "takes a full conv (groups 1), not groups 2")]
