"""The structure of a lowered network, as data the lowering writes and everything downstream reads.

The lowering names nodes by their module path in the compiled network, but nothing downstream takes a
name apart: a node's ``stage``, ``block``, ``part`` (its module name inside its container) and
``group`` (``stem``, ``stages.i``, ``head``: how costs are broken down) are node attributes, and the
containers' wiring is the plan below, a graph attribute. The compiler builds a network from the plan
alone; the cost model and the latency estimators group nodes by their attributes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BranchPlan:
    """One residual branch of a block: the nodes its parts and its shortcut run, in order (layout
    conversions included), which tokens it reads and writes, whether it has a residual and whether its sum takes
    stochastic depth (see ``spec.templates.Branch``)."""

    parts: tuple[str, ...]
    shortcut: tuple[str, ...]
    reads_prefix: bool = False
    writes_prefix: bool = False
    residual: bool = True
    drop_path: bool = True


@dataclass(frozen=True)
class BlockPlan:
    """One block: its input layout conversion (node or None), its branches, and the number of prefix
    tokens its prefix-only branches see."""

    layout: str | None
    branches: tuple[BranchPlan, ...]
    prefix: int = 0


@dataclass(frozen=True)
class StagePlan:
    """One stage: ``downsample_layout -> downsample -> layout -> prefix -> [pos_embed] -> blocks -> [collect] -> norm``;
    each slot is a node or None (absent). ``pos_after``: the block the position encoding follows (-1: before the
    first). ``collect``: the node that puts every block's prefix tokens in front of the last block's grid tokens
    (``StageSpec.collect_prefix``; its inputs are the blocks' outputs)."""

    downsample_layout: str | None
    downsample: str | None
    layout: str | None
    prefix: str | None
    pos_embed: str | None
    pos_after: int
    blocks: tuple[BlockPlan, ...]
    norm: str | None
    end: str
    """The stage's last node (its output)."""
    collect: str | None = None


@dataclass(frozen=True)
class NetworkPlan:
    """The whole network: the stem node, the stages, the head node."""

    stem: str
    stages: tuple[StagePlan, ...]
    head: str


__all__ = ["BlockPlan", "BranchPlan", "NetworkPlan", "StagePlan"]
