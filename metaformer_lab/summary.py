"""What ``metaformer-lab build`` reports: size, FLOPs, activation memory, shapes, per-stage costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.folding import deploy_form
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.cost import count_flops, count_params, graph_cost


@dataclass(frozen=True)
class PartSummary:
    name: str
    output: str
    params: int
    flops: int
    activation_bytes: int


@dataclass(frozen=True)
class BuildSummary:
    name: str
    params: int
    trainable_params: int
    flops: int
    activation_bytes: int
    batch_size: int
    input_shape: list[int]
    output_shape: list[int]
    parts: list[PartSummary]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(graph: ArchGraph, batch_size: int = 1, *, deploy: bool = False) -> BuildSummary:
    """Build the network, run it once on zeros (counting FLOPs), and read the rest off the graph.

    ``deploy``: measure the deploy form (params, FLOPs, output) instead; the per-part costs stay the graph's.

    Raises:
        RuntimeError: when the module's output shape differs from the graph's (a bug, never bad input).
    """
    net = compile_graph(graph).eval()
    if deploy:
        net = deploy_form(net)
    x = torch.zeros(graph.input_type.shape(batch_size))
    outputs: list[torch.Tensor] = []
    flops, _ = count_flops(lambda: outputs.append(net(x)))
    expected = graph.output_type.shape(batch_size)
    if tuple(outputs[0].shape) != expected:
        got = tuple(outputs[0].shape)
        raise RuntimeError(f"{graph.spec.name}: the module returns {got}, the graph says {expected}")
    cost = graph_cost(graph, batch_size)
    outputs_of = graph.group_types()
    parts = [PartSummary(name, str(outputs_of[name]), c.params, c.flops, c.activation_bytes)
             for name, c in cost.parts.items()]
    return BuildSummary(
        name=graph.spec.name, params=count_params(net),
        trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad), flops=flops,
        activation_bytes=cost.activation_bytes, batch_size=batch_size, input_shape=list(x.shape),
        output_shape=list(outputs[0].shape), parts=parts,
    )
