"""Cost model: parameters, FLOPs and activation memory, read off the typed graph.

Each op node is built on the ``meta`` device (no memory, no initialisation) and run under
``torch.utils.flop_counter.FlopCounterMode`` on a meta tensor of its input type. FLOPs count a
multiply-add as 2 and cover conv, matmul and attention, like the published figures; norms,
activations and element-wise ops count 0. Fused SDPA on the CPU, which FlopCounterMode counts as 0,
gets the standard attention formula (see :func:`count_flops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.meta import on_meta
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.nodes import LEAF_KINDS, build_node, build_with_branches


def _cpu_flash_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def sdpa_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the attention kernels FlopCounterMode leaves at 0."""
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of running ``fn()`` (total, and per module path below the root module)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=sdpa_formulas())
    with counter, torch.no_grad():
        fn()
    per_module: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and "." in name:
            per_module[name.split(".", 1)[1]] = sum(ops.values())
    return counter.get_total_flops(), per_module


def count_params(module: nn.Module) -> int:
    """Every parameter element, frozen ones included (each shared parameter once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class NodeCost:
    params: int
    flops: int
    activation_bytes: int


@dataclass(frozen=True)
class Cost:
    """Totals and a per-part breakdown (``stem``, ``stages.i``, ``head``)."""

    params: int
    flops: int
    activation_bytes: int
    parts: dict[str, NodeCost] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryNeed:
    """What building a network and running it once without gradients needs: its parameters, plus a few of its
    largest activations live at once. ``by_part``: parameter and activation bytes per spec part
    (``stem``, ``stages[i]``, ``head``), to name the one that dominates."""

    params_bytes: int
    peak_activation_bytes: int
    by_part: dict[str, int]
    """Each part's parameters plus its own largest activations live at once (the total's terms, per part)."""

    LIVE_ACTIVATIONS = 4
    """Activations alive at once in an inference forward (input, output, a residual, a temporary)."""

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.LIVE_ACTIVATIONS * self.peak_activation_bytes

    @property
    def dominant(self) -> tuple[str, int]:
        """The spec path of the part that needs the most, and what it needs."""
        part = max(self.by_part, key=lambda p: self.by_part[p])
        return part, self.by_part[part]


def memory_need(graph: ArchGraph, batch: int = 1, dtype_bytes: int = 4) -> MemoryNeed:
    """:class:`MemoryNeed` from the graph, before any tensor exists: each distinct op is built once on the
    ``meta`` device to count its parameters (a network repeats the same few blocks), activations come from
    the edge types. Seconds even for a network too large for the machine."""
    params_of: dict[tuple[Any, ...], int] = {}
    shared = stage_shared_surplus(graph)
    params = peak = 0
    part_params: dict[str, int] = {}
    part_peak: dict[str, int] = {}
    for name, node in graph.nodes(data=True):
        out: TensorType | None = node["out"]
        acts = out.numel(batch) * dtype_bytes if out is not None else 0
        count = 0
        if node["kind"] in LEAF_KINDS or node["kind"] in ("scale", "prefix"):
            spec = node.get("spec")
            key = (node["kind"], None if spec is None else spec.model_dump_json(), input_type(graph, name), out,
                   node.get("count"))
            if key not in params_of:
                params_of[key] = node_cost(graph, name).params if graph.is_composite(name) else \
                    _meta_params(graph, name)
            count = params_of[key] - shared.get(name, 0)
        params += count * dtype_bytes
        peak = max(peak, acts)
        part = node["group"] if node["stage"] is None else f"stages[{node['stage']}]"
        part_params[part] = part_params.get(part, 0) + count * dtype_bytes
        part_peak[part] = max(part_peak.get(part, 0), acts)
    by_part = {p: part_params[p] + MemoryNeed.LIVE_ACTIVATIONS * part_peak[p] for p in part_params if p != "input"}
    return MemoryNeed(params, peak, by_part)


def dense_scale_bytes(graph: ArchGraph, dtype_bytes: int = 4) -> int:
    """A cheap scale of a network's weights, no module built: every op counted as one dense layer from its input
    width to its output width. Not a parameter count (pooling has none, an MLP has several such layers): a
    trigger that says when :func:`memory_need`, which builds each distinct op on the meta device (and imports
    timm to do so), is worth its seconds."""
    total = 0
    for name, node in graph.nodes(data=True):
        if node["kind"] in LEAF_KINDS and not graph.is_composite(name) and node["out"] is not None:
            total += node["in_type"].channels * node["out"].channels * dtype_bytes
    return total


def _meta_input(x: TensorType, batch: int) -> Tensor:
    return torch.empty(x.shape(batch), device="meta")


def _meta_params(graph: ArchGraph, name: str) -> int:
    with on_meta():
        return count_params(build_node(graph, name))


def input_type(graph: ArchGraph, name: str) -> TensorType | None:
    """The type node ``name`` reads: a composite mixer's join reads what its fork reads."""
    node = graph.nodes[name]
    return graph.nodes[node["fork"]]["in_type"] if graph.is_composite(name) else node["in_type"]


def node_cost(graph: ArchGraph, name: str, batch: int = 1, dtype_bytes: int = 4) -> NodeCost:
    """Cost of one node at ``batch``; composite mixers count what they run besides their branches (``concat``'s
    projection), the branches being nodes of their own."""
    node = graph.nodes[name]
    out: TensorType | None = node["out"]
    kind = node["kind"]
    views = ("input", "layout", "fork", "prefix_view")  # no new tensor of their own
    activations = out.numel(batch) * dtype_bytes if out is not None and kind not in views else 0
    if kind == "scale":
        return NodeCost(out.channels, 0, activations)  # type: ignore[union-attr]
    if kind == "prefix":
        return NodeCost(node["count"] * out.channels, 0, activations)  # type: ignore[union-attr]
    if kind not in LEAF_KINDS:
        return NodeCost(0, 0, activations)
    with on_meta():
        module, branches = build_with_branches(graph, name)
    module.eval()
    flops, per_module = count_flops(lambda: module(_meta_input(input_type(graph, name), batch)))  # type: ignore[arg-type]
    paths = {id(m): path for path, m in module.named_modules()}
    flops -= sum(per_module.get(paths[id(b)], 0) for b in branches)
    return NodeCost(count_params(module) - sum(count_params(b) for b in branches), flops, activations)


_NODE_COSTS: dict[tuple[Any, ...], NodeCost] = {}
_NODE_COSTS_MAX = 1 << 16


def _cached_node_cost(graph: ArchGraph, name: str, batch: int, dtype_bytes: int) -> NodeCost:
    """:func:`node_cost`, once per distinct op: a node's cost is a function of its kind, config, input and
    output types and wiring (a network repeats the same few blocks; a search the same few thousand ops)."""
    node = graph.nodes[name]
    spec = node.get("spec")
    key = (node["kind"], None if spec is None else (type(spec).__qualname__, spec.model_dump_json()),
           input_type(graph, name), node["out"], node.get("init") is not None, node.get("count"),
           graph.is_composite(name) if node["kind"] in LEAF_KINDS else None, batch, dtype_bytes)
    cost = _NODE_COSTS.get(key)
    if cost is None:
        cost = node_cost(graph, name, batch, dtype_bytes)
        if len(_NODE_COSTS) >= _NODE_COSTS_MAX:
            _NODE_COSTS.clear()
        _NODE_COSTS[key] = cost
    return cost


def stage_shared_surplus(graph: ArchGraph, what: str = "params") -> dict[str, int]:
    """Per node, the parameter elements it counts as its own but shares with an earlier block of its stage (a block
    part whose spec has ``stage_shared_params``: CMT's position bias tables), as the compiler ties them
    (:func:`metaformer_lab.compile.compiler.tie_in_stage`): one per stage, part name and size. ``what="flops"``:
    the FLOPs (at batch 1) of what the stage runs once for all its blocks (``stage_shared_flops``: GC-ViT's query
    generator, :func:`metaformer_lab.compile.compiler.hoist_stage_context`)."""
    seen: set[tuple[Any, ...]] = set()
    surplus: dict[str, int] = {}
    for name, node in graph.nodes(data=True):
        shared = getattr(node.get("spec"), f"stage_shared_{what}", None)
        if node["kind"] not in LEAF_KINDS or shared is None or node["inside"] is not None or node["stage"] is None:
            continue
        count = shared(node["resolved"])
        key = (node["stage"], node["part"], count)
        if count and key in seen:
            surplus[name] = count
        seen.add(key)
    return surplus


def graph_cost(graph: ArchGraph, batch: int = 1, dtype_bytes: int = 4) -> Cost:
    """Params, FLOPs and activation bytes of the whole graph, without building the network.

    Activation bytes: the sum of every op's output (what training keeps for the backward pass,
    leaving out each op's internal temporaries).
    """
    parts: dict[str, list[int]] = {}
    for name in graph.nodes:
        cost = _cached_node_cost(graph, name, batch, dtype_bytes)
        acc = parts.setdefault(graph.nodes[name]["group"], [0, 0, 0])
        acc[0] += cost.params
        acc[1] += cost.flops
        acc[2] += cost.activation_bytes
    parts.pop("input", None)
    for name, count in stage_shared_surplus(graph).items():
        parts[graph.nodes[name]["group"]][0] -= count
    for name, count in stage_shared_surplus(graph, "flops").items():
        parts[graph.nodes[name]["group"]][1] -= count * batch
    totals = [sum(v[i] for v in parts.values()) for i in range(3)]
    return Cost(totals[0], totals[1], totals[2], {k: NodeCost(*v) for k, v in parts.items()})
