"""The typed graph of a spec: a ``networkx.DiGraph`` built from what the lowering recorded.

The lowering (:mod:`metaformer_lab.graph.lower`) checks shapes on plain records and does not import networkx;
this module turns its records into the graph that costs, the predictor and the compiler read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx

from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.plan import NetworkPlan
from metaformer_lab.spec.arch import ArchSpec

if TYPE_CHECKING:
    from metaformer_lab.graph.lower import Lowered


class ArchGraph(nx.DiGraph):
    """A ``networkx.DiGraph`` of typed ops.

    Node attributes: ``kind``, ``path`` (spec path), ``spec`` (op config or None), ``role`` (registry role
    of leaf ops), ``in_type`` and ``out`` (TensorTypes), and where the node sits: ``stage`` and ``block``
    (indices or None), ``part`` (its module name inside its container, None for nodes without a module),
    ``resolved`` (registry ops: what the op's shape rule settled, the builder's input),
    ``group`` (``input``, ``stem``, ``stages.i``, ``head``) and ``inside`` (the composite mixer whose
    branches hold it, or None). Scale nodes also carry ``init``, prefix nodes ``count``, composite mixers
    ``fork`` and ``branches`` (the fork node and each branch's last node). A grid-only op with prefix tokens
    routed around it (its ``prefix`` field, ``ops/prefix.py``) keeps the prefixed types as ``in_type`` and ``out``
    and a :class:`~metaformer_lab.ops.prefix.PrefixRoute` in its ``resolved`` settings. Edge attribute: ``type``.
    Graph attributes: ``spec``, ``input``, ``output``, ``plan`` (the :class:`~.plan.NetworkPlan`).
    Nothing reads structure out of a node's name: it is all in these attributes.
    """

    @classmethod
    def of(cls, lowered: Lowered) -> ArchGraph:
        """The graph of a lowering's records (nodes in the order they were added, a topological order)."""
        graph = cls(spec=lowered.spec, input=lowered.input, output=lowered.output, plan=lowered.plan)
        graph.add_nodes_from(lowered.nodes.items())
        graph.add_edges_from((src, dst, {"type": t}) for src, dst, t in lowered.edges)
        return graph

    @property
    def spec(self) -> ArchSpec:
        return self.graph["spec"]

    @property
    def input_type(self) -> TensorType:
        return self.graph["input"]

    @property
    def output_type(self) -> TensorType:
        return self.graph["output"]

    @property
    def plan(self) -> NetworkPlan:
        return self.graph["plan"]

    @property
    def stage_types(self) -> list[TensorType]:
        """The output type of each stage."""
        return [self.nodes[s.end]["out"] for s in self.plan.stages]

    def group_types(self) -> dict[str, TensorType]:
        """The output type of each cost group (``stem``, ``stages.i``, ``head``)."""
        ends = [self.plan.stem, *(s.end for s in self.plan.stages), self.plan.head]
        return {self.nodes[n]["group"]: self.nodes[n]["out"] for n in ends}

    def is_composite(self, name: str) -> bool:
        """A composite mixer's join node (its branches are nodes of their own)."""
        return "fork" in self.nodes[name]

    def ops(self, kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Nodes in topological order, optionally of one kind."""
        return [(n, self.nodes[n]) for n in nx.topological_sort(self) if kind is None or self.nodes[n]["kind"] == kind]
