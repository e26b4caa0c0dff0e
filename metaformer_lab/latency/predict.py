"""Predicting latency from the typed graph and a profile, without building a module.

``predict(spec, profile)`` lowers the spec (shapes only), walks the graph's costed nodes with their keys
(see :mod:`.keys`), looks each up in the profile, and applies the profile's whole-model correction. An
op the profile never saw is estimated from its nearest neighbours and listed in ``estimated``:

1. the same op with the same config at other tensor types: ms = a + b * elements, fitted on them;
2. else the same op type with another config, the same way;
3. else any op of the same kind; the nearest by element count, scaled.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from metaformer_lab.core.errors import LatencyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency.keys import NodeKey, default_out_mem, walk_keys
from metaformer_lab.latency.profile import FEATURES, OpEntry, Profile
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import SpecSource, read_spec, with_input_size


@dataclass(frozen=True)
class Prediction:
    """A predicted latency: ``ms`` (corrected, times the profile's host factor), ``ops_ms`` (sum of the
    per-op latencies), the per-node breakdown, the nodes estimated from neighbours, the profile it came
    from and the host factor applied (1.0: none; see :mod:`.host`)."""

    ms: float
    ops_ms: float
    nodes: dict[str, float]
    estimated: tuple[str, ...]
    features: dict[str, float]
    profile: str
    settings: dict[str, Any] = field(default_factory=dict)
    host_scale: float = 1.0

    @property
    def coverage(self) -> float:
        """Share of the costed nodes the profile measured."""
        return 1.0 - len(self.estimated) / max(len(self.nodes), 1)

    def to_json(self, *, nodes: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"predicted_ms": self.ms, "ops_ms": self.ops_ms, "profile": self.profile,
                               "coverage": self.coverage, "estimated_nodes": list(self.estimated),
                               "features": self.features, "settings": self.settings, "host_scale": self.host_scale}
        if nodes:
            out["nodes_ms"] = self.nodes
        return out


def _fit_line(entries: Sequence[OpEntry]) -> tuple[float, float] | None:
    """Least squares ms = a + b * numel_in over entries with at least two distinct sizes."""
    xs = [float(e.numel_in) for e in entries]
    if len(set(xs)) < 2:
        return None
    ys = [e.ms for e in entries]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return my - b * mx, b


def _nearest(entries: Sequence[OpEntry], numel: int) -> OpEntry:
    ordered = sorted(entries, key=lambda e: e.numel_in)
    i = bisect.bisect_left([e.numel_in for e in ordered], numel)
    near = [ordered[j] for j in (i - 1, i) if 0 <= j < len(ordered)]
    return min(near, key=lambda e: abs(math.log((e.numel_in + 1) / (numel + 1))))


def estimate(profile: Profile, key: NodeKey) -> float:
    """A latency for an op the profile never measured, from its nearest neighbours (see the module doc)."""
    numel = key.numel_in
    for group in (profile.by_config.get(key.config), profile.by_op.get((key.kind, key.op))):
        if not group:
            continue
        same_mem = [e for e in group if e.mem == key.in_mem] or list(group)
        line = _fit_line(same_mem)
        floor = min(e.ms for e in same_mem)
        if line is not None and line[1] >= 0:
            return max(line[0] + line[1] * numel, floor * 0.5)
        near = _nearest(same_mem, numel)
        return near.ms * max(numel, 1) / max(near.numel_in, 1) if near.numel_in else near.ms
    group = profile.by_kind.get(key.kind) or list(profile.ops.values())
    if not group:
        return 0.0
    near = _nearest(group, numel)
    return near.ms * max(numel, 1) / max(near.numel_in, 1) if near.numel_in else near.ms


def structure(graph: ArchGraph) -> dict[str, float]:
    """The counts the whole-model correction multiplies: blocks, residual branches, stages."""
    stages = graph.plan.stages
    blocks = sum(len(stage.blocks) for stage in stages)
    branches = sum(len(block.branches) for stage in stages for block in stage.blocks)
    return {"blocks": float(blocks), "branches": float(branches), "stages": float(len(stages)), "one": 1.0}


def op_latencies(graph: ArchGraph, profile: Profile) -> tuple[dict[str, float], list[str]]:
    """Per-node latency (ms) from the profile, and the nodes that had to be estimated."""
    nodes: dict[str, float] = {}
    estimated: list[str] = []

    def out_mem(name: str, key: NodeKey) -> str:
        entry = profile.ops.get(key.key)
        if entry is not None:
            nodes[name] = entry.ms
            return entry.out_mem
        nodes[name] = estimate(profile, key)
        estimated.append(name)
        return default_out_mem(name, key)

    for _ in walk_keys(graph, profile.target.batch_size, out_mem):
        pass
    return nodes, estimated


def corrected(profile: Profile, features: dict[str, float]) -> float:
    if not profile.correction:
        return features["ops_ms"]
    return sum(c * features[f] for c, f in zip(profile.correction, FEATURES, strict=True))


def as_graph(spec_or_graph: ArchGraph | SpecSource, input_size: int | tuple[int, int] | None = None) -> ArchGraph:
    """The typed graph of a spec (at ``input_size`` when given); a graph passes through."""
    if isinstance(spec_or_graph, ArchGraph):
        return spec_or_graph if input_size is None else lower(with_input_size(spec_or_graph.spec, input_size))
    spec = spec_or_graph if isinstance(spec_or_graph, ArchSpec) else read_spec(spec_or_graph)
    return lower(with_input_size(spec, input_size))


def check_input(graph: ArchGraph, profile: Profile) -> None:
    """A profile measures one input size; a spec at another size is refused, not silently rescaled."""
    have = profile.target.input_size
    got = (graph.input_type.height, graph.input_type.width)
    if have is not None and have != got:
        raise LatencyError.single("input.size", f"the spec's input is {got[0]}x{got[1]}, but profile '{profile.name}' "
                                                f"was measured at {have[0]}x{have[1]}; use a profile for that size")


def predict(spec_or_graph: ArchGraph | SpecSource, profile: Profile) -> Prediction:
    """The latency of the module ``build(spec)`` returns, predicted from its graph and ``profile``.

    Raises:
        LatencyError: the spec's input size is not the profile's.
    """
    graph = as_graph(spec_or_graph)
    check_input(graph, profile)
    nodes, estimated = op_latencies(graph, profile)
    features = {"ops_ms": sum(nodes.values()), **structure(graph)}
    return Prediction(ms=max(corrected(profile, features), 0.0) * profile.host_scale, ops_ms=features["ops_ms"],
                      nodes=nodes, estimated=tuple(estimated), features=features, profile=profile.name,
                      settings=dict(profile.settings), host_scale=profile.host_scale)
