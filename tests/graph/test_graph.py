"""The typed graph: every edge typed, composites branch and join, costs agree with the built module."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
from helpers import EXAMPLES

import metaformer_lab as ml
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost
from metaformer_lab.graph.render import to_dot


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
    mixer = "stages.0.blocks.0.token_mixer"
    branches = list(graph.successors(f"{mixer}.fork"))
    assert len(branches) == 4 and set(graph.predecessors(mixer)) == set(branches)
    widths = [graph.edges[f"{mixer}.fork", b]["type"].channels for b in branches]
    assert sum(widths) == graph.nodes[mixer]["out"].channels and widths[1:] == [4, 4, 4]
    assert graph.nodes[f"{mixer}.branches.2"]["path"] == "stages[0].block.token_mixer.branches[2]"


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
    graph = ml.to_graph(EXAMPLES[0], input_size=64)
    assert graph.input_type == TensorType("maps", 3, 64, 64)


def test_dot_names_every_node_and_edge_type() -> None:
    graph = ml.to_graph(EXAMPLES[0])
    dot = to_dot(graph)
    assert dot.count(" -> ") == graph.number_of_edges()
    assert all(f'"{n}"' in dot for n in graph.nodes)
