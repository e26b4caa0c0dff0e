"""Compilation: typed graph -> ``nn.Module``. Each op node is built by its registry entry from the
tensor type the graph gives it; the containers in :mod:`.network` assemble them by module path."""

from __future__ import annotations

from torch import nn

from metaformer_lab.compile.network import Block, BranchPlan, Network, PrefixTokens, Stage
from metaformer_lab.graph.lower import ArchGraph
from metaformer_lab.graph.nodes import build_node
from metaformer_lab.ops.common import init_weights
from metaformer_lab.spec.arch import StageSpec
from metaformer_lab.spec.templates import PART_FIELDS, TEMPLATES


class _Compiler:
    def __init__(self, graph: ArchGraph) -> None:
        self.g = graph
        self.spec = graph.spec
        n = self.spec.num_blocks
        rate = self.spec.defaults.drop_path_rate
        self.drop_path = [rate * k / max(n - 1, 1) for k in range(n)]

    def has(self, name: str) -> bool:
        return name in self.g.nodes

    def module(self, name: str) -> nn.Module:
        return build_node(self.g, name)

    def block(self, i: int, j: int, stage: StageSpec, k: int) -> nn.Module:
        name = f"stages.{i}.blocks.{j}"
        spec = stage.block_at(j)
        parts: dict[str, nn.Module] = {}
        branches: list[BranchPlan] = []
        prefix = 0
        for branch in TEMPLATES[spec.template]:
            if getattr(spec, PART_FIELDS[branch.main]) is None:
                continue
            # a shortcut op that takes another layout is preceded by its (parameter-free) conversion
            names = [[q for p in group for q in (f"{p}_layout", p) if self.has(f"{name}.{q}")]
                     for group in (branch.parts, branch.shortcut)]
            for p in names[0] + names[1]:
                parts[p] = self.module(f"{name}.{p}")
            view = f"{name}.{branch.main}_prefix"  # branches on the prefix tokens only (lower.prefix_view)
            if self.has(view):
                prefix = self.g.nodes[view]["out"].prefix
            branches.append(BranchPlan(names[0], names[1], reads_prefix=branch.reads == "prefix",
                                       writes_prefix=branch.writes == "prefix", residual=branch.residual))
        return Block(layout_in=self.module(f"{name}.layout"), parts=parts, branches=branches,
                     drop_path=self.drop_path[k], prefix=prefix)

    def stage(self, i: int, stage: StageSpec, first_block: int) -> Stage:
        name = f"stages.{i}"
        prefix: nn.Module = nn.Identity()
        if self.has(f"{name}.prefix"):
            node = self.g.nodes[f"{name}.prefix"]
            prefix = PrefixTokens(stage.prefix_tokens, node["out"].channels, had_prefix=node["in_type"].prefix > 0)
        pos = stage.pos_embed
        pos_after = -1 if pos is None or pos.after_block is None else pos.after_block
        blocks = [self.block(i, j, stage, first_block + j) for j in range(stage.depth)]
        return Stage(down_layout=self.module(f"{name}.down_layout"), down=self.module(f"{name}.down"),
                     layout=self.module(f"{name}.layout"), prefix=prefix, pos_embed=self.module(f"{name}.pos_embed"),
                     pos_after=pos_after, blocks=blocks, norm=self.module(f"{name}.norm"))

    def network(self) -> Network:
        stages, first = [], 0
        for i, stage in enumerate(self.spec.stages):
            stages.append(self.stage(i, stage, first))
            first += stage.depth
        return Network(name=self.spec.name, stem=self.module("stem"), stages=stages, head=self.module("head"),
                       input_type=self.g.input_type, output_type=self.g.output_type,
                       feature_types=self.g.stage_types)


def initialize(net: nn.Module) -> None:
    """timm's initialisation: truncated-normal weights everywhere, then each module's own scheme."""
    net.apply(init_weights)
    for m in net.modules():
        own = getattr(m, "init_weights", None)
        if callable(own) and m is not net:
            own()


def compile_graph(graph: ArchGraph, *, init: bool = True) -> Network:
    """An ``nn.Module`` computing ``graph``, initialised as timm does (call ``.eval()`` for inference).

    ``init=False`` leaves PyTorch's default initialisation (for a module about to load a checkpoint, or one
    built on the ``meta`` device to read its shapes).
    """
    net = _Compiler(graph).network()
    if init:
        initialize(net)
    return net
