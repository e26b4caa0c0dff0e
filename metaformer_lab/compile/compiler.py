"""Compilation: typed graph -> ``nn.Module``. Each op node is built by its registry entry from the
tensor type the graph gives it; the containers in :mod:`.network` are wired from the graph's plan
(:mod:`metaformer_lab.graph.plan`), their submodules named by each node's ``part``."""

from __future__ import annotations

from torch import nn

from metaformer_lab.compile.network import Block, BranchPlan, Network, Stage
from metaformer_lab.core.meta import uninitialised
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.nodes import build_node
from metaformer_lab.graph.plan import BlockPlan, StagePlan
from metaformer_lab.ops.common import INITIALISED, init_weights


class _Compiler:
    def __init__(self, graph: ArchGraph) -> None:
        self.g = graph
        n = graph.spec.num_blocks
        rate = graph.spec.defaults.drop_path_rate
        self.drop_path = [rate * k / max(n - 1, 1) for k in range(n)]

    def module(self, name: str | None) -> nn.Module:
        return build_node(self.g, name)

    def block(self, plan: BlockPlan, k: int) -> Block:
        parts: dict[str, nn.Module] = {}
        branches: list[BranchPlan] = []
        for branch in plan.branches:
            for node in branch.parts + branch.shortcut:
                parts[self.g.nodes[node]["part"]] = self.module(node)
            names = [[self.g.nodes[node]["part"] for node in group] for group in (branch.parts, branch.shortcut)]
            branches.append(BranchPlan(*names, reads_prefix=branch.reads_prefix, writes_prefix=branch.writes_prefix,
                                       residual=branch.residual, drop_path=branch.drop_path))
        return Block(layout_in=self.module(plan.layout), parts=parts, branches=branches, drop_path=self.drop_path[k],
                     prefix=plan.prefix)

    def stage(self, plan: StagePlan, first_block: int) -> Stage:
        blocks = [self.block(b, first_block + j) for j, b in enumerate(plan.blocks)]
        tie_in_stage(blocks)
        return Stage(downsample_layout=self.module(plan.downsample_layout), downsample=self.module(plan.downsample),
                     layout=self.module(plan.layout), prefix=self.module(plan.prefix),
                     pos_embed=self.module(plan.pos_embed), pos_after=plan.pos_after, blocks=blocks,
                     norm=self.module(plan.norm),
                     collect=self.g.nodes[plan.collect]["in_type"].prefix if plan.collect else 0,
                     context=hoist_stage_context(blocks))

    def network(self) -> Network:
        plan = self.g.plan
        stages, first = [], 0
        for stage in plan.stages:
            stages.append(self.stage(stage, first))
            first += len(stage.blocks)
        return Network(name=self.g.spec.name, stem=self.module(plan.stem), stages=stages, head=self.module(plan.head),
                       input_type=self.g.input_type, output_type=self.g.output_type,
                       feature_types=self.g.stage_types)


def tie_in_stage(blocks: list[Block]) -> None:
    """Parameters that a block's part (not a branch inside a composite) names in its ``shared_in_stage`` (CMT's
    position bias tables) become one per stage: each block's is the first block's of the same part name and
    shape (the cost model counts them once per stage too: :func:`metaformer_lab.graph.cost.stage_shared_surplus`)."""
    first: dict[tuple[str, str, tuple[int, ...]], nn.Parameter] = {}
    for block in blocks:
        for path, module in block.named_children():
            for name in getattr(module, "shared_in_stage", ()):
                param = getattr(module, name)
                setattr(module, name, first.setdefault((path, name, tuple(param.shape)), param))


def hoist_stage_context(blocks: list[Block]) -> tuple[str, nn.Module] | None:
    """A block part (not a branch inside a composite) whose module names a submodule in ``stage_context`` (GC-ViT's
    query generator, ``global_query_attention`` with ``generator: stage``) gives it up to the stage: the first
    one's becomes the stage's (its name kept), run once on the stage's input, and its output is every such part's
    ``context`` (:class:`~metaformer_lab.compile.network.Block`); the others' are dropped. The cost model counts it
    once per stage (the op's ``stage_shared_params``). Returns (name, module), or None."""
    found: tuple[str, nn.Module] | None = None
    for block in blocks:
        for module in block.children():
            name = getattr(module, "stage_context", None)
            if not name:
                continue
            own = getattr(module, name)
            if found is None:
                found = (name, own)
            elif found[0] != name or [p.shape for p in found[1].parameters()] != [p.shape for p in own.parameters()]:
                raise ValueError(f"the stage's parts with a stage context give different {name} modules; a stage "
                                 "has one")
            setattr(module, name, None)
    return found


def initialize(net: nn.Module) -> None:
    """timm's initialisation: truncated-normal weights everywhere, then each module's own scheme.

    A network on the ``meta`` device has no values to set: nothing runs (each init op would run PyTorch's Python
    meta kernel, a third of the time a zoo model's fixed-point check spent building the meta copies it reads
    shapes from)."""
    if all(t.is_meta for t in (*net.parameters(), *net.buffers())):
        return
    net.apply(init_weights)
    for m in net.modules():
        own = getattr(m, "init_weights", None)
        if callable(own) and m is not net:
            own()


def compile_graph(graph: ArchGraph, *, init: bool = True) -> Network:
    """An ``nn.Module`` computing ``graph``, initialised as timm does (call ``.eval()`` for inference).

    ``init=False`` leaves the parameters PyTorch's modules would initialise unset
    (:func:`~metaformer_lab.core.meta.uninitialised`): for a module about to load every value from a checkpoint
    (``load_state_dict(strict=True)``), or one built on the ``meta`` device to read its shapes.
    """
    with uninitialised() as skipped:
        net = _Compiler(graph).network()
    if init:
        # the default initialisation of the weights that timm's scheme sets again is skipped; the rest runs now
        overwritten = {id(p) for m in net.modules() if isinstance(m, INITIALISED)
                       for p in m.parameters(recurse=False)}
        for call in skipped:
            if id(call.target) not in overwritten:
                call.replay()
        initialize(net)
    return net
