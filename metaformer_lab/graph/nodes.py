"""Building the module of one graph node (shared by the compiler and the cost model)."""

from __future__ import annotations

from metaformer_lab.core.lazy_torch import nn
from metaformer_lab.core.registry import CompositeDef
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import LayerScale, layout_change
from metaformer_lab.ops.position import PrefixTokens

LEAF_KINDS = frozenset(REGISTRIES)
"""Node kinds built by a registry entry (the role names)."""


def build_node(graph: ArchGraph, name: str | None) -> nn.Module:
    """The module of node ``name``; ``nn.Identity`` when the graph has no such node.

    Composite token mixers are built with their branches; forks and residual adds belong to the
    containers and have no module of their own here.
    """
    if name is None or name not in graph.nodes:
        return nn.Identity()
    node = graph.nodes[name]
    kind = node["kind"]
    if kind == "layout":
        return layout_change(node["in_type"], node["out"].layout)
    if kind == "scale":
        return LayerScale(node["out"].channels, node["init"], node["out"].layout)
    if kind == "prefix":
        return PrefixTokens(node["count"], node["out"].channels, had_prefix=node["in_type"].prefix > 0)
    if kind not in LEAF_KINDS:
        raise ValueError(f"node {name} of kind {kind} has no module of its own")
    return build_with_branches(graph, name)[0]


def build_with_branches(graph: ArchGraph, name: str) -> tuple[nn.Module, list[nn.Module]]:
    """The module of registry op node ``name`` and, for a composite mixer, its branch modules inside it."""
    node = graph.nodes[name]
    opdef = REGISTRIES[node["kind"]].of_spec(node["spec"])
    if isinstance(opdef, CompositeDef):
        children = [build_node(graph, end) for end in node["branches"]]
        return opdef.build(node["spec"], node["resolved"], children), children
    return opdef.build(node["spec"], node["resolved"]), []
