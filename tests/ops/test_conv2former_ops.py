"""The options added for Conv2Former against written-out references: ``gated``'s projection after the product
(ConvMod: ``proj(a * v)``), ``sepconv`` without its pointwise conv down (the gate ``dwconv(GELU(conv1x1(x)))``),
``conv_ffn``'s activation inside the inner residual (``y + GELU(dwconv(y))``), and ``conv_mlp_head``'s activation
before the conv's norm; their costs, the GPU estimate and the shape rules' refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed
from pydantic import TypeAdapter

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.registry import Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost
from metaformer_lab.latency.gpu import estimate_gpu
from metaformer_lab.ops import CHANNEL_MIXERS, HEADS, TOKEN_MIXERS
from metaformer_lab.ops.gated import GATED, Gated

TOL = 1e-5
B = 2
CONVMOD = {"type": "gated", "proj": True,
           "branches": [{"type": "dwconv", "kernel": 1, "groups": 1},
                        {"type": "sepconv", "ratio": 1.0, "kernel": 5, "act": "gelu", "bias": True, "project": False}]}


def _gated(config: dict[str, Any], x: TensorType) -> Gated:
    from metaformer_lab.spec.arch import TokenMixerSpec

    spec = TypeAdapter(TokenMixerSpec).validate_python(config)
    children = [TOKEN_MIXERS.of_spec(c).make(c, t, dim)
                for c, (t, dim) in zip(spec.branches, GATED.branch_inputs(spec, x), strict=True)]
    module = GATED.build(spec, Resolved(x, x), children)
    assert isinstance(module, Gated)
    return perturbed(module)


def test_gated_with_proj_is_conv2formers_convmod() -> None:
    module = _gated(CONVMOD, TensorType("maps", 16, 6, 7))
    value, gate = module.branches
    x = torch.randn(B, 16, 6, 7)
    a = F.conv2d(F.gelu(F.conv2d(x, gate.pwconv1.weight, gate.pwconv1.bias)), gate.dwconv.weight, gate.dwconv.bias,
                 padding=2, groups=16)  # the authors' self.att
    v = F.conv2d(x, value.dw.weight, value.dw.bias)  # self.v
    expected = F.conv2d(a * v, module.proj.weight, module.proj.bias)  # self.proj
    with torch.no_grad():
        assert max_diff(module(x), expected) < TOL
    assert not any(n.startswith("branches.1.pwconv2") for n, _ in module.named_parameters())


def test_gated_without_proj_is_the_product_alone() -> None:
    config = {"type": "gated", "branches": [{"type": "identity"}, {"type": "dwconv", "kernel": 3}], "act": "sigmoid"}
    module = _gated(config, TensorType("tokens", 16, 4, 4))
    assert isinstance(module.proj, torch.nn.Identity) and count_params(module) == 16 * 9 + 16
    x = torch.randn(B, 4, 4, 16)
    with torch.no_grad():
        assert max_diff(module(x), x * torch.sigmoid(module.branches[1](x))) < TOL
    tokens = _gated({**config, "proj": True}, TensorType("tokens", 16, 4, 4))
    with torch.no_grad():
        expected = (x * torch.sigmoid(tokens.branches[1](x))) @ tokens.proj.weight.T + tokens.proj.bias
        assert max_diff(tokens(x), expected) < TOL


def _spec(mixer: dict[str, Any], layout: str = "maps", **extra: Any) -> dict[str, Any]:
    return {"name": "c", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 16, "layout": layout,
                        "block": {"token_mixer": mixer, "channel_mixer": {"type": "mlp", "ratio": 1.0}}}],
            "head": {"type": "pool_norm_linear"}, **extra}


@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_costs_and_the_gpu_estimate_count_the_projection(layout: str) -> None:
    graph = ml.to_graph(_spec(CONVMOD, layout))
    net = ml.build(graph).eval()
    cost = graph_cost(graph)
    flops, _ = count_flops(lambda: net(torch.zeros(graph.input_type.shape(1))))
    assert (cost.params, cost.flops) == (count_params(net), flops)
    assert estimate_gpu(graph, "h100", dtype="float32").flops == cost.flops
    without = graph_cost(ml.to_graph(_spec({**CONVMOD, "proj": False}, layout)))
    assert cost.params - without.params == 16 * 16 + 16


@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_conv_ffn_act_inside_is_conv2formers_mlp(layout: str) -> None:
    x_type = TensorType(layout, 8, 5, 6)  # type: ignore[arg-type]
    config = {"ratio": 2.0, "hidden_act": "gelu", "act": "gelu", "dw_residual": True, "act_inside": True}
    module = perturbed(build_op(CHANNEL_MIXERS, "conv_ffn", config, x_type))
    x = torch.randn(B, 8, 5, 6)
    y = F.gelu(F.conv2d(x, module.fc1.weight.view(16, 8, 1, 1), module.fc1.bias))
    y = y + F.gelu(F.conv2d(y, module.dwconv.weight, module.dwconv.bias, padding=1, groups=16))
    expected = F.conv2d(y, module.fc2.weight.view(8, 16, 1, 1), module.fc2.bias)
    with torch.no_grad():
        out = module(x if layout == "maps" else x.permute(0, 2, 3, 1))
        assert max_diff(out if layout == "maps" else out.permute(0, 3, 1, 2), expected) < TOL


def test_conv_mlp_head_act_norm_puts_the_activation_first() -> None:
    config = {"conv_dim": 24, "conv_bias": True, "conv_norm": {"type": "layernorm", "eps": 1e-6}, "act": "gelu",
              "conv_order": "act_norm"}
    head = perturbed(build_op(HEADS, "conv_mlp_head", config, TensorType("maps", 16, 4, 4), 10))
    x = torch.randn(B, 16, 4, 4)
    conv, norm = head.conv.conv, head.conv.norm
    y = F.gelu(conv(x)).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (24,), norm.weight, norm.bias, 1e-6).mean((1, 2))  # the authors' head, then pooling
    with torch.no_grad():
        assert max_diff(head(x), head.fc(y)) < TOL


@pytest.mark.parametrize(("mixer", "channel_mixer", "path", "message"), [
    ({"type": "sepconv", "ratio": 2.0, "project": False}, None, "token_mixer.project",
     "false keeps the middle width 32 as the output, but the op must give its 16 input channels; set ratio: 1"),
    ({"type": "dwconv"}, {"type": "conv_ffn", "act_inside": True}, "channel_mixer.act_inside",
     "puts the activation inside the inner residual; it needs dw_residual: true"),
])
def test_refusals_name_the_field(mixer: dict[str, Any], channel_mixer: dict[str, Any] | None, path: str,
                                 message: str) -> None:
    spec = _spec(mixer)
    if channel_mixer is not None:
        spec["stages"][0]["block"]["channel_mixer"] = channel_mixer
    with pytest.raises(SpecError) as err:
        ml.to_graph(spec)
    assert [(i.path, i.message) for i in err.value.issues] == [(f"stages[0].block.{path}", message)]
