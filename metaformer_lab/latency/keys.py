"""What a latency profile is keyed by: one entry per graph node, from the typed graph alone.

A node's key is its kind, role, op config (canonical JSON), input and output tensor types and the memory
order its input arrives in. The order matters on the CPU: a layout change is a ``permute`` (a view), so
the op after it reads a strided tensor, and element-wise ops keep whatever order their first input has.
The order each op *returns* is not a rule of ours but a fact of PyTorch's kernels; calibration records
it per key (``out_mem``) and prediction propagates it along the graph.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.ops.common import LATENCY_KEY

Mem = Literal["c", "p"]
"""Memory order of a tensor: ``c`` contiguous in its layout, ``p`` a permuted view of the other layout."""

FREE_KINDS = frozenset({"input", "fork", "prefix_view", "collect"})
"""Nodes that launch nothing of their own (views, the graph's entry, a composite's fork; a stage's collected prefix
tokens, a concatenation of a few tokens, is counted as free too)."""

ELEMENTWISE_KINDS = frozenset({"add", "scale"})


@dataclass(frozen=True)
class NodeKey:
    """One costed node: its key (a short hash), its config hash (the same op at any tensor type) and the
    features that nearest-neighbour estimates compare."""

    key: str
    config: str
    kind: str
    op: str
    in_type: TensorType | None
    out_type: TensorType | None
    in_mem: str
    text: str

    @property
    def numel_in(self) -> int:
        return self.in_type.numel() if self.in_type is not None else 0

    @property
    def numel_out(self) -> int:
        return self.out_type.numel() if self.out_type is not None else 0


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def op_name(node: dict[str, Any]) -> str:
    """The op's type tag, or the node kind for nodes without a config (add, scale, layout, prefix)."""
    spec = node.get("spec")
    return str(getattr(spec, "type", node["kind"])) if spec is not None else node["kind"]


def inside_composite(graph: ArchGraph, name: str) -> bool:
    """A branch of a composite mixer runs inside the composite's module (costed with it)."""
    return graph.nodes[name]["inside"] is not None


def node_inputs(graph: ArchGraph, name: str) -> list[str]:
    """The nodes whose outputs ``name`` reads, in argument order (a composite reads what its fork reads)."""
    if graph.is_composite(name):
        return list(graph.predecessors(graph.nodes[name]["fork"]))
    return list(graph.predecessors(name))


def make_key(graph: ArchGraph, name: str, in_mems: tuple[str, ...], batch: int) -> NodeKey:
    node = graph.nodes[name]
    in_type: TensorType | None = node["in_type"]
    if graph.is_composite(name):
        in_type = graph.nodes[node["fork"]]["in_type"]
    init = node.get("init") is not None if node["kind"] == "scale" else None
    args = (node["kind"], node.get("role"), node.get("spec"), init, in_type, node["out"], in_mems, batch)
    try:
        return _key(*args)
    except TypeError:  # a config holding a list is not hashable: computed each time
        return _key.__wrapped__(*args)


@lru_cache(maxsize=1 << 16)
def _key(kind: str, role: Any, spec: Any, init: bool | None, in_type: TensorType | None, out_type: TensorType | None,
         in_mems: tuple[str, ...], batch: int) -> NodeKey:
    """Keys are pure functions of these (frozen, hashable) values: the search asks for the same few
    thousand again and again, so they are computed once."""
    if spec is not None:
        config = spec.model_dump_json(context={LATENCY_KEY: True})
    else:
        config = json.dumps({"init": init}) if kind == "scale" else "{}"
    parts = [kind, str(role), config, repr(in_type), repr(out_type), "".join(in_mems), str(batch), str(len(in_mems))]
    text = "|".join(parts)
    op = str(getattr(spec, "type", kind)) if spec is not None else kind
    return NodeKey(key=_digest(text), config=_digest(f"{kind}|{config}"), kind=kind, op=op,
                   in_type=in_type, out_type=out_type, in_mem="".join(in_mems), text=text)


def walk_keys(graph: ArchGraph, batch: int,
              out_mem: Callable[[str, NodeKey], str]) -> Iterator[tuple[str, NodeKey]]:
    """(node name, key) for every costed node in topological order; ``out_mem(name, key)`` says in which
    memory order that node returns its output (from the profile, or a rule for keys it never saw)."""
    mems: dict[str, str] = {}
    for name, node in graph.ops():
        if inside_composite(graph, name):
            continue
        kind = node["kind"]
        inputs = node_inputs(graph, name)
        in_mems = tuple(mems.get(i, "c") for i in inputs)
        if kind in FREE_KINDS:
            mems[name] = in_mems[0] if in_mems else "c"
            continue
        key = make_key(graph, name, in_mems, batch)
        mems[name] = out_mem(name, key)
        yield name, key


def default_out_mem(name: str, key: NodeKey) -> str:
    """The order an unmeasured op returns: a permute flips it, element-wise ops keep their first input's,
    everything else returns a fresh contiguous tensor."""
    first = key.in_mem[:1] or "c"
    if key.kind == "layout":
        return "c" if first == "p" else "p"
    if key.kind in ELEMENTWISE_KINDS:
        return first
    return "c"
