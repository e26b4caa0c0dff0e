"""The typed graph: every edge typed, composites branch and join, costs agree with the built module."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
from helpers import EXAMPLES, TINY_CAFORMER

import metaformer_lab as ml
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost
from metaformer_lab.graph.lower import Lowered, check_shapes
from metaformer_lab.graph.render import to_dot
from metaformer_lab.space import load_space, sample
from metaformer_lab.spec.yaml_io import parse_yaml


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_edge_carries_a_tensor_type(path: Path) -> None:
    graph = ml.to_graph(path)
    assert nx.is_directed_acyclic_graph(graph)
    assert all(isinstance(t, TensorType) for _, _, t in graph.edges(data="type"))
    assert all(isinstance(graph.nodes[n]["out"], TensorType) for n in graph.nodes)
    assert all(graph.nodes[n]["path"] for n in graph.nodes)
    sinks = [n for n in graph.nodes if graph.out_degree(n) == 0]
    assert sinks == ["head"]


def test_composite_mixers_branch_and_join() -> None:
    graph = ml.to_graph(Path(__file__).parents[2] / "examples" / "tiny_inception_hilo.yaml")
    [mixer] = [n for n in graph.plan.stages[0].blocks[0].branches[0].parts if graph.nodes[n]["part"] == "token_mixer"]
    assert graph.is_composite(mixer)
    fork, branches = graph.nodes[mixer]["fork"], graph.nodes[mixer]["branches"]
    assert list(graph.successors(fork)) == branches
    assert len(branches) == 4 and set(graph.predecessors(mixer)) == set(branches)
    assert all(graph.nodes[b]["inside"] == mixer for b in branches)
    assert not graph.nodes[mixer]["inside"] and not graph.nodes[fork]["inside"]
    widths = [graph.edges[fork, b]["type"].channels for b in branches]
    assert sum(widths) == graph.nodes[mixer]["out"].channels and widths[1:] == [4, 4, 4]
    assert graph.nodes[branches[2]]["path"] == "stages[0].block.token_mixer.branches[2]"


def test_nodes_say_where_they_sit() -> None:
    """Stage, block, part and cost group are node attributes; the plan lists every node with a module."""
    graph = ml.to_graph(Path(__file__).parents[2] / "examples" / "tiny_caformer.yaml")
    plan = graph.plan
    assert graph.nodes[plan.stem]["group"] == "stem" and graph.nodes[plan.head]["group"] == "head"
    for i, stage in enumerate(plan.stages):
        assert graph.nodes[stage.end]["stage"] == i and graph.nodes[stage.end]["group"] == f"stages.{i}"
        for j, block in enumerate(stage.blocks):
            for branch in block.branches:
                for node in branch.parts + branch.shortcut:
                    assert (graph.nodes[node]["stage"], graph.nodes[node]["block"]) == (i, j)
                    assert graph.nodes[node]["part"]
    with_modules = {n for n, d in graph.nodes(data=True) if d["part"] and not d["inside"]}
    planned = {plan.stem, plan.head} | {
        n for s in plan.stages
        for n in (s.downsample_layout, s.downsample, s.layout, s.prefix, s.pos_embed, s.norm, *(
            m for b in s.blocks for m in (b.layout, *(p for br in b.branches for p in br.parts + br.shortcut))))
        if n is not None}
    assert with_modules == planned


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_graph_cost_equals_the_built_module(path: Path) -> None:
    graph = ml.to_graph(path)
    net = ml.build(graph).eval()
    cost = graph_cost(graph)
    flops, _ = count_flops(lambda: net(torch.zeros(graph.input_type.shape(1))))
    assert cost.params == count_params(net)
    assert cost.flops == flops
    assert sum(p.params for p in cost.parts.values()) == cost.params


def test_fused_attention_flops_are_counted() -> None:
    spec = {"name": "a", "input": {"size": 16}, "num_classes": 0, "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 32, "layout": "tokens",
                        "block": {"token_mixer": {"type": "attention", "head_dim": 16, "fused": True},
                                  "channel_mixer": {"type": "mlp", "ratio": 1.0}}}],
            "head": {"type": "pool_norm_linear", "norm": None}}
    net = ml.build(spec).eval()
    fused, _ = count_flops(lambda: net(torch.zeros(1, 3, 16, 16)))
    spec["stages"][0]["block"]["token_mixer"]["fused"] = False
    net_unfused = ml.build(spec).eval()
    unfused, _ = count_flops(lambda: net_unfused(torch.zeros(1, 3, 16, 16)))
    n, c = 16, 32
    attention = 2 * (2 * n * n * c)  # q @ k^T and attn @ v
    assert fused == unfused
    stem, qkv_proj, mlp = 2 * n * c * (3 * 4 * 4), 2 * n * c * (3 * c + c), 2 * (2 * n * c * c)
    assert fused - attention == stem + qkv_proj + mlp


def test_input_size_override_reshapes_the_graph() -> None:
    graph = ml.to_graph(TINY_CAFORMER, input_size=64)
    assert graph.input_type == TensorType("maps", 3, 64, 64)


def test_dot_names_every_node_and_edge_type() -> None:
    graph = ml.to_graph(TINY_CAFORMER)
    dot = to_dot(graph)
    assert dot.count(" -> ") == graph.number_of_edges()
    assert all(f'"{n}"' in dot for n in graph.nodes)


def test_a_block_without_token_mixer_keeps_the_channel_mixer_residual_only() -> None:
    """``token_mixer: null``: no norm1, token mixer, layer_scale1 or res_scale1 node, one residual add; the
    compiled block has the same parts, and its cost is the built module's."""
    spec = {"name": "ffn_only", "input": {"size": 16}, "num_classes": 4,
            "stem": {"type": "conv", "kernel": 2, "stride": 2, "padding": 0},
            "stages": [{"depth": 2, "dim": 8, "block": [
                {"token_mixer": {"type": "pooling"}, "layer_scale": 0.1, "res_scale": 1.0},
                {"token_mixer": None, "layer_scale": 0.1, "res_scale": 1.0}]}]}
    graph = ml.to_graph(spec)
    full, ffn = graph.plan.stages[0].blocks
    parts = [[graph.nodes[n]["part"] for n in b.parts + b.shortcut] for b in ffn.branches]
    assert parts == [["norm2", "mlp", "layer_scale2", "res_scale2"]]
    assert len(full.branches) == 2
    adds = [n for n, d in graph.nodes(data=True) if d["kind"] == "add" and d["block"] == 1]
    assert len(adds) == 1
    net = ml.build(graph)
    assert {name for name, _ in net.stages[0].blocks[1].named_children()} == {
        "layout_in", "norm2", "mlp", "layer_scale2", "res_scale2", "drop_path"}
    assert graph_cost(graph).params == count_params(net)
    block, x = net.stages[0].blocks[1].eval(), torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(block(x), block.res_scale2(x) + block.layer_scale2(block.mlp(block.norm2(x))))
    loaded = ml.load_spec(spec)
    assert ml.load_spec(parse_yaml(ml.dump_spec(loaded), "spec.yaml")) == loaded


def _records(lowered: Lowered) -> tuple[object, ...]:
    return lowered.nodes, lowered.edges, lowered.plan, lowered.input, lowered.output


@pytest.mark.parametrize("source", ["zoo", "examples", "tiny", "metaformer"])
def test_repeated_blocks_are_copies_of_a_fresh_lowering(source: str) -> None:
    """A stage's repeated blocks are copied from the first under their own names; every node, attribute, edge and
    plan entry must be what lowering each block afresh gives (composites, prefix tokens, layouts, steps included)."""
    if source == "zoo":
        specs = [ml.load_spec(name) for name in ml.list_models()]
    elif source == "examples":
        specs = [ml.load_spec(path) for path in EXAMPLES]
    else:
        specs = sample(load_space(source), 40, seed=1).specs
    copied = 0
    for spec in specs:
        reused, fresh = check_shapes(spec), check_shapes(spec, reuse_blocks=False)
        assert list(reused.nodes) == list(fresh.nodes), spec.name
        assert _records(reused) == _records(fresh), spec.name
        copied += sum(stage.depth - 1 for stage in spec.stages)
    assert copied > len(specs)  # the specs do repeat blocks
