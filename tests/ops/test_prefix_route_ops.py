"""Prefix tokens routed around grid-only ops (``ops/prefix.py``): PiT's class-token pooling against timm
(``pit.Pooling``, same weights), CeiT's LeFF and LocalViT's FFN against a hand-written split / op / concat with
the same weights, in a network too; the graph, costs, latency keys and deploy form; and what is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, port
from timm.models.pit import Pooling
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue, SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.latency.keys import default_out_mem, walk_keys
from metaformer_lab.ops import CHANNEL_MIXERS, DOWNSAMPLERS, TOKEN_MIXERS
from metaformer_lab.ops.common import LATENCY_KEY
from metaformer_lab.ops.mlp import ConvFfnSpec
from metaformer_lab.ops.prefix import ROUTE, PrefixRouted

TOL = 1e-5
B = 2
EXAMPLE = "examples/tiny_class_token_conv.yaml"


def _split(x: Tensor, prefix: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, P + H*W, C) -> (B, P, C), (B, C, H, W): PiT's and CeiT's view of the tokens."""
    return x[:, :prefix], x[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)


# --- PiT: a depthwise conv downsampler, the class tokens through a Linear ------------------------------


@pytest.mark.parametrize("prefix", [1, 2], ids=["pit", "pit-distilled"])
def test_conv_downsampler_with_linear_prefix_is_pit_pooling(prefix: int) -> None:
    x_type = TensorType("tokens", 16, 6, 6, prefix=prefix)
    config = {"kernel": 3, "stride": 2, "padding": 1, "groups": 16, "prefix": "linear"}
    ours = build_op(DOWNSAMPLERS, "conv", config, x_type, 32)
    reference = Pooling(16, 32, stride=2)
    port(reference, ours, [(r"^conv\.", "op.conv."), (r"^fc\.", "proj.")])
    reference.eval()
    x = torch.randn(x_type.shape(B))
    cls, maps = _split(x, prefix, (6, 6))
    want_maps, want_cls = reference(maps, cls)
    got = ours(x)
    assert got.shape == (B, prefix + 9, 32)
    assert max_diff(got[:, :prefix], want_cls) < TOL
    assert max_diff(got[:, prefix:], want_maps.flatten(2).transpose(1, 2)) < TOL


# --- CeiT's LeFF and LocalViT's FFN: the class token around the whole FFN -----------------------------


@pytest.mark.parametrize("mode", ["pass", "zero"])
def test_conv_ffn_around_prefix_is_split_op_concat(mode: str) -> None:
    x_type = TensorType("tokens", 8, 4, 5, prefix=1)
    routed = build_op(CHANNEL_MIXERS, "conv_ffn", {"prefix": mode}, x_type)
    assert isinstance(routed, PrefixRouted)
    grid_only = build_op(CHANNEL_MIXERS, "conv_ffn", {}, TensorType("tokens", 8, 4, 5))
    grid_only.load_state_dict(routed.op.state_dict())
    x = torch.randn(x_type.shape(B))
    cls = x[:, :1] if mode == "pass" else torch.zeros_like(x[:, :1])
    want = torch.cat([cls, grid_only(x[:, 1:].unflatten(1, (4, 5))).flatten(1, 2)], dim=1)
    assert max_diff(routed(x), want) < TOL


def test_conv_ffn_default_keeps_its_own_prefix_handling() -> None:
    """Without ``prefix`` the class token still goes through fc1 and fc2 and skips only the conv (as before)."""
    x_type = TensorType("tokens", 8, 4, 5, prefix=1)
    module = build_op(CHANNEL_MIXERS, "conv_ffn", {}, x_type)
    assert not isinstance(module, PrefixRouted)
    x = torch.randn(x_type.shape(B))
    want_cls = module.fc2(module.act(module.hidden_act(module.fc1(x[:, :1]))))
    assert max_diff(module(x)[:, :1], want_cls) < TOL


def _leff_vit(mode: str) -> dict[str, Any]:
    return {
        "name": "leff_vit", "input": {"channels": 3, "size": 32}, "num_classes": 10,
        "stem": {"type": "patchify", "patch": 8},
        "stages": [{"depth": 2, "dim": 32, "layout": "tokens", "prefix_tokens": 1, "pos_embed": {"type": "learned"},
                    "block": {"base": "vit", "token_mixer": {"type": "attention", "num_heads": 2, "head_dim": None},
                              "channel_mixer": {"type": "conv_ffn", "prefix": mode}}}],
        "head": {"type": "class_token"},
    }


@pytest.mark.parametrize("mode", ["pass", "zero"], ids=["ceit-leff", "localvit"])
def test_vit_with_a_class_token_and_leff_blocks_matches_a_hand_written_block(mode: str) -> None:
    net = ml.build(_leff_vit(mode)).eval()
    block = net.stages[0].blocks[1]
    seen: dict[str, Tensor] = {}
    block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        net(torch.randn(B, 3, 32, 32))
        x = seen["x"]  # (B, 1 + 16, 32)
        x = x + block.token_mixer(block.norm1(x))
        h = block.norm2(x)
        cls, grid = _split(h, 1, (4, 4))
        ffn = block.mlp.op  # the FFN on the grid alone, in its tokens layout
        grid = ffn(grid.permute(0, 2, 3, 1)).flatten(1, 2)
        want = x + torch.cat([cls if mode == "pass" else torch.zeros_like(cls), grid], dim=1)
    assert max_diff(seen["y"], want) < TOL
    if mode == "zero":  # LocalViT: the FFN leaves the class token as attention left it
        assert max_diff(seen["y"][:, :1], x[:, :1]) == 0


# --- the graph, costs, latency keys, deploy -----------------------------------------------------------


def test_example_graph_shows_each_route_and_costs_count_the_projection() -> None:
    graph = ml.to_graph(EXAMPLE)
    routes = {graph.nodes[n]["path"]: graph.nodes[n]["resolved"][ROUTE] for n in graph.nodes
              if graph.nodes[n].get("resolved") is not None and ROUTE in graph.nodes[n]["resolved"].settings}
    assert {p: r.mode for p, r in routes.items()} == {
        "stages[0].block.channel_mixer": "pass", "stages[1].downsample": "linear",
        "stages[1].block.token_mixer": "pass", "stages[1].block.channel_mixer": "zero"}
    down = routes["stages[1].downsample"]
    assert down.count == 1 and down.grid.in_type == TensorType("maps", 32, 8, 8)
    assert down.grid.out_type == TensorType("maps", 64, 4, 4)
    assert graph.nodes["stages.1.downsample"]["out"] == TensorType("tokens", 64, 4, 4, prefix=1)
    assert "stages.1.downsample_layout" not in graph.nodes  # the route converts the grid alone
    net = ml.build(graph)
    assert graph_cost(graph).params == sum(p.numel() for p in net.parameters())


def test_latency_keys_leave_the_field_out_at_its_default() -> None:
    assert "prefix" not in ConvFfnSpec().model_dump_json(context={LATENCY_KEY: True})
    assert "dw_residual" not in ConvFfnSpec().model_dump_json(context={LATENCY_KEY: True})
    assert '"prefix":"zero"' in ConvFfnSpec(prefix="zero").model_dump_json(context={LATENCY_KEY: True})
    keys = dict(walk_keys(ml.to_graph(EXAMPLE), 1, default_out_mem))
    assert '"prefix":"linear"' in keys["stages.1.downsample"].text
    assert keys["stages.1.downsample"].in_type == TensorType("tokens", 32, 8, 8, prefix=1)


def test_example_deploys_to_the_same_outputs() -> None:
    torch.manual_seed(0)
    net = ml.build(EXAMPLE).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(B, 3, 32, 32)
    deployed = ml.deploy(net)
    with torch.no_grad():
        assert max_diff(deployed(x), net(x)) < 1e-4
    # the norm before a FFN the class token skips (zero) folds into fc1; before one it passes (pass), it stays
    assert not list(deployed.stages[1].blocks[0].norm2.parameters())  # a unit weight buffer at most
    assert isinstance(deployed.stages[0].blocks[0].norm2.weight, nn.Parameter)


# --- refused --------------------------------------------------------------------------------------------


def _problems(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        ml.to_graph(spec)
    return [str(issue) for issue in info.value.issues]


def test_a_grid_only_op_without_the_field_names_it() -> None:
    spec = _leff_vit("pass")
    spec["stages"][0]["block"]["token_mixer"] = {"type": "dwconv", "kernel": 3}
    (problem,) = _problems(spec)
    assert problem.startswith("stages[0].block.token_mixer.type: dwconv works on the token grid only")
    assert "its prefix field (pass, zero or linear) routes the 1 prefix token(s) around it" in problem


def test_pass_refuses_a_width_change() -> None:
    spec = _leff_vit("pass")
    spec["stages"].append({"depth": 1, "dim": 64, "layout": "tokens", "block": spec["stages"][0]["block"],
                           "downsample": {"type": "conv", "groups": 32, "prefix": "pass"}})
    assert _problems(spec) == ["stages[1].downsample.prefix: pass keeps the 1 prefix token(s) at 32 channels, but "
                               "conv gives 64; use linear"]


def test_a_prefix_only_view_has_no_grid_to_route() -> None:
    with pytest.raises(ShapeIssue, match="needs the token grid"):
        TOKEN_MIXERS.get("dwconv").resolve(TOKEN_MIXERS.get("dwconv").spec(prefix="pass"),
                                           TensorType("tokens", 8, 0, 0, prefix=1))


def test_an_unknown_mode_is_a_schema_error() -> None:
    spec = _leff_vit("both")
    with pytest.raises(ml.MetaformerLabError, match=r"stages\[0\]\.block\.channel_mixer"):
        ml.to_graph(spec)


def test_a_downsampling_block_routes_the_class_token_through_its_mixer_and_shortcut() -> None:
    """A CoAtNet-style MBConv block opening a stage (stride 2, a pooled shortcut) in a stage with a class token:
    both branches see the grid as maps, both take the class token to the new width through a Linear."""
    spec = _leff_vit("pass")
    spec["stem"] = {"type": "patchify", "patch": 4}
    first = {"base": "coatnet_mbconv", "layout": "tokens",
             "token_mixer": {"stride": 2, "out_dim": 64, "prefix": "linear"},
             "shortcut": {"type": "pool", "bias": False, "prefix": "linear"}}
    spec["stages"].append({"depth": 2, "dim": 64, "layout": "tokens",
                           "block": {"first": first, "cycle": [{**spec["stages"][0]["block"],
                                                              "token_mixer": {"type": "attention", "head_dim": 16}}]}})
    graph = ml.to_graph(spec)
    assert graph.nodes["stages.1.blocks.0.shortcut"]["out"] == TensorType("tokens", 64, 4, 4, prefix=1)
    assert "stages.1.blocks.0.shortcut_layout" not in graph.nodes
    net = ml.build(graph).eval()
    assert net(torch.randn(B, 3, 32, 32)).shape == (B, 10)
    assert graph_cost(graph).params == sum(p.numel() for p in net.parameters())
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ml.deploy(net)(x), net(x)) < 1e-4
