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

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.lower import ArchGraph
from metaformer_lab.graph.nodes import LEAF_KINDS, build_node


def _cpu_flash_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops,
}
"""FLOP formulas for the attention kernels FlopCounterMode leaves at 0."""


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of running ``fn()`` (total, and per module path below the root module)."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FORMULAS)
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


def _meta_input(x: TensorType, batch: int) -> Tensor:
    return torch.empty(x.shape(batch), device="meta")


def node_cost(graph: ArchGraph, name: str, batch: int = 1, dtype_bytes: int = 4) -> NodeCost:
    """Cost of one node at ``batch``; composite mixers count 0 (their branches are nodes)."""
    node = graph.nodes[name]
    out: TensorType | None = node["out"]
    kind = node["kind"]
    views = ("input", "layout", "fork", "prefix_view")  # no new tensor of their own
    activations = out.numel(batch) * dtype_bytes if out is not None and kind not in views else 0
    if kind == "scale":
        return NodeCost(out.channels, 0, activations)  # type: ignore[union-attr]
    if kind == "prefix":
        return NodeCost(node["count"] * out.channels, 0, activations)  # type: ignore[union-attr]
    if kind not in LEAF_KINDS or graph.is_composite(name):
        return NodeCost(0, 0, activations)
    with torch.device("meta"):
        module = build_node(graph, name)
    module.eval()
    flops, _ = count_flops(lambda: module(_meta_input(node["in_type"], batch)))
    return NodeCost(count_params(module), flops, activations)


def graph_cost(graph: ArchGraph, batch: int = 1, dtype_bytes: int = 4) -> Cost:
    """Params, FLOPs and activation bytes of the whole graph, without building the network.

    Activation bytes: the sum of every op's output (what training keeps for the backward pass,
    leaving out each op's internal temporaries).
    """
    parts: dict[str, list[int]] = {}
    for name in graph.nodes:
        cost = node_cost(graph, name, batch, dtype_bytes)
        acc = parts.setdefault(graph.nodes[name]["group"], [0, 0, 0])
        acc[0] += cost.params
        acc[1] += cost.flops
        acc[2] += cost.activation_bytes
    parts.pop("input", None)
    totals = [sum(v[i] for v in parts.values()) for i in range(3)]
    return Cost(totals[0], totals[1], totals[2], {k: NodeCost(*v) for k, v in parts.items()})
