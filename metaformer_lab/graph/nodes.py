"""Building the module of one graph node (shared by the compiler and the cost model)."""

from __future__ import annotations

from torch import nn

from metaformer_lab.core.registry import CompositeDef
from metaformer_lab.graph.lower import ArchGraph
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import LayerScale, layout_change

LEAF_KINDS = frozenset(REGISTRIES)
"""Node kinds built by a registry entry (the role names)."""


def build_node(graph: ArchGraph, name: str) -> nn.Module:
    """The module of node ``name``; ``nn.Identity`` when the graph has no such node.

    Composite token mixers are built with their branches; prefix tokens, forks and residual adds
    belong to the containers and have no module of their own here.
    """
    if name not in graph.nodes:
        return nn.Identity()
    node = graph.nodes[name]
    kind = node["kind"]
    if kind == "layout":
        return layout_change(node["in_type"], node["out"].layout)
    if kind == "scale":
        return LayerScale(node["out"].channels, node["init"], node["out"].layout)
    if kind not in LEAF_KINDS:
        raise ValueError(f"node {name} of kind {kind} has no module of its own")
    role, spec = node["role"], node["spec"]
    opdef = REGISTRIES[role].of_spec(spec)
    if isinstance(opdef, CompositeDef):
        children = [build_node(graph, f"{name}.branches.{k}") for k in range(len(opdef.branches(spec)))]
        return opdef.build(spec, graph.nodes[f"{name}.fork"]["in_type"], children)
    if role in ("stem", "downsample"):
        return opdef.build(spec, node["in_type"], node["out"].channels)
    if role == "head":
        return opdef.build(spec, node["in_type"], graph.spec.num_classes)
    return opdef.build(spec, node["in_type"])
