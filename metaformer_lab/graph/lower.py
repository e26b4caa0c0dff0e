"""Lowering: ArchSpec -> typed graph.

Nodes are ops at the registry's granularity, named by their module path in the compiled network
(``stages.2.blocks.0.token_mixer``) and carrying their spec path (``stages[2].block.token_mixer``).
Every edge carries the :class:`TensorType` flowing along it. Shape rules run in topological order;
every violation is collected, and :class:`SpecError` lists them all.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
from pydantic import BaseModel

from metaformer_lab.core.errors import Issue, ShapeIssue, SpecError
from metaformer_lab.core.registry import CompositeDef, OpDef
from metaformer_lab.core.types import Layout, TensorType
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import layout_change_problem
from metaformer_lab.spec.arch import ArchSpec, BlockSpec, StageSpec
from metaformer_lab.spec.templates import PART_FIELDS, PART_ROLES, TEMPLATES, Branch


class ArchGraph(nx.DiGraph):
    """A ``networkx.DiGraph`` of typed ops. Node attributes: ``kind``, ``path`` (spec path), ``spec``
    (op config or None), ``role`` (registry role of leaf ops), ``in_type`` and ``out`` (TensorTypes).
    Scale nodes also carry ``init``. Edge attribute: ``type``. Graph attributes: ``spec``, ``input``,
    ``output``, ``stage_ends`` (the last node of each stage)."""

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
    def stage_types(self) -> list[TensorType]:
        """The output type of each stage."""
        return [self.nodes[n]["out"] for n in self.graph["stage_ends"]]

    def ops(self, kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Nodes in topological order, optionally of one kind."""
        return [(n, self.nodes[n]) for n in nx.topological_sort(self) if kind is None or self.nodes[n]["kind"] == kind]


def _at(path: str, field: str) -> str:
    return f"{path}.{field}" if field else path


def _first_block_resizes(stage: StageSpec) -> bool:
    """The stage's first block may change the width itself (a downsampling block): it has a shortcut op, or
    its template has a branch without a residual."""
    block = stage.block_at(0)
    return block.shortcut is not None or not all(b.residual for b in TEMPLATES[block.template])


class _Lowering:
    def __init__(self, spec: ArchSpec) -> None:
        self.spec = spec
        self.g = ArchGraph(spec=spec)
        self.issues: list[Issue] = []

    # --- primitives -------------------------------------------------------------------------

    def out(self, name: str) -> TensorType | None:
        return self.g.nodes[name]["out"]

    def node(self, name: str, kind: str, inputs: list[tuple[str, TensorType | None]], out: TensorType | None,
             path: str, spec: BaseModel | None = None, role: str | None = None) -> str:
        in_type = inputs[0][1] if inputs else None
        self.g.add_node(name, kind=kind, path=path, spec=spec, role=role, in_type=in_type, out=out)
        for src, t in inputs:
            self.g.add_edge(src, name, type=t)
        return name

    def op(self, name: str, role: str, spec: BaseModel, path: str, src: str, *args: int,
           x: TensorType | None = None) -> str:
        """A leaf op from registry ``role``; ``args`` is the output width of stems, downsamplers, heads."""
        x = self.out(src) if x is None else x
        opdef = REGISTRIES[role].of_spec(spec)
        if isinstance(opdef, CompositeDef):
            return self.composite(name, opdef, spec, path, src, x)
        out = None
        if x is not None:
            try:
                out = opdef.infer(spec, x, *args)
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
                out = x if opdef.preserves_type else None
        return self.node(name, role, [(src, x)], out, path, spec, role)

    def composite(self, name: str, opdef: CompositeDef[Any], spec: BaseModel, path: str, src: str,
                  x: TensorType | None) -> str:
        """A fork node, one subgraph per branch, and the join node that stands for the whole mixer."""
        branch_types: list[TensorType | None] = [None] * len(opdef.branches(spec))
        if x is not None:
            try:
                branch_types = list(opdef.split(spec, x))
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
        fork = self.node(f"{name}.fork", "fork", [(src, x)], x, path, spec)
        ends = [self.op(f"{name}.branches.{k}", "token_mixer", child, f"{path}.branches[{k}]", fork, x=t)
                for k, (child, t) in enumerate(zip(opdef.branches(spec), branch_types, strict=True))]
        outs = [self.out(e) for e in ends]
        out = None
        if x is not None and all(o is not None for o in outs):
            try:
                out = opdef.join(spec, x, outs)  # type: ignore[arg-type]
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
        if out is None and x is not None and opdef.preserves_type:
            out = x
        return self.node(name, "token_mixer", [(e, self.out(e)) for e in ends], out, path, spec, "token_mixer")

    def layout(self, name: str, src: str, layout: Layout, path: str) -> str:
        x = self.out(src)
        if x is None or x.layout == layout:
            return src
        problem = layout_change_problem(x, layout)
        if problem:
            self.issues.append(Issue(path, problem))
            return self.node(name, "layout", [(src, x)], None, path)
        return self.node(name, "layout", [(src, x)], x.to(layout), path)

    def scale(self, name: str, src: str, init: float | None, path: str) -> str:
        if init is None:
            return src
        self.node(name, "scale", [(src, self.out(src))], self.out(src), path)
        self.g.nodes[name]["init"] = init
        return name

    def norm(self, name: str, spec: BaseModel | None, path: str, src: str) -> str:
        return src if spec is None else self.op(name, "norm", spec, path, src)

    # --- structure ----------------------------------------------------------------------------

    def lower(self) -> ArchGraph:
        spec = self.spec
        h, w = spec.input.hw
        x = self.node("input", "input", [], TensorType("maps", spec.input.channels, h, w), "input")
        stem_dim = getattr(spec.stem, "dim", None) or spec.stages[0].dim
        x = self.op("stem", "stem", spec.stem, "stem", x, stem_dim)
        stage_ends = []
        for i, stage in enumerate(spec.stages):
            x = self.stage(i, stage, x)
            stage_ends.append(x)
        x = self.op("head", "head", spec.head, "head", x, spec.num_classes)
        if self.issues:
            raise SpecError(self.issues)
        self.g.graph.update(input=self.out("input"), output=self.out(x), stage_ends=stage_ends)
        return self.g

    def stage(self, i: int, stage: StageSpec, x: str) -> str:
        name, path = f"stages.{i}", f"stages[{i}]"
        if stage.downsample is not None:
            accepts = REGISTRIES["downsample"].of_spec(stage.downsample)
            if isinstance(accepts, OpDef) and accepts.accepts:
                x = self.layout(f"{name}.down_layout", x, accepts.accepts[0], f"{path}.downsample.type")
            x = self.op(f"{name}.down", "downsample", stage.downsample, f"{path}.downsample", x, stage.dim)
        elif (t := self.out(x)) is not None and t.channels != stage.dim and not _first_block_resizes(stage):
            self.issues.append(Issue(f"{path}.dim", f"{stage.dim} differs from the {t.channels} channels coming in; "
                                                    "a downsample is needed to change the width"))
        x = self.layout(f"{name}.layout", x, stage.layout, f"{path}.layout")
        if stage.prefix_tokens:
            x = self.prefix(name, path, stage, x)
        pos = stage.pos_embed
        if pos is not None and pos.after_block is None:
            x = self.op(f"{name}.pos_embed", "pos_embed", pos, f"{path}.pos_embed", x)
        if pos is not None and pos.after_block is not None and pos.after_block >= stage.depth:
            self.issues.append(Issue(f"{path}.pos_embed.after_block",
                                     f"{pos.after_block} is past the last block (depth {stage.depth})"))
        for j in range(stage.depth):
            x = self.block(i, j, stage, x)
            if pos is not None and pos.after_block == j:
                x = self.op(f"{name}.pos_embed", "pos_embed", pos, f"{path}.pos_embed", x)
        if stage.downsample is None and _first_block_resizes(stage) and (t := self.out(x)) is not None \
                and t.channels != stage.dim:
            self.issues.append(Issue(f"{path}.dim", f"{stage.dim} differs from the {t.channels} channels its blocks "
                                                    "give"))
        return self.norm(f"{name}.norm", stage.norm, f"{path}.norm", x)

    def prefix(self, name: str, path: str, stage: StageSpec, x: str) -> str:
        t = self.out(x)
        out = None
        if t is not None:
            if t.layout != "tokens":
                self.issues.append(Issue(f"{path}.prefix_tokens", "prefix tokens need layout 'tokens'"))
            else:
                out = t.with_prefix(t.prefix + stage.prefix_tokens)
        return self.node(f"{name}.prefix", "prefix", [(x, t)], out, f"{path}.prefix_tokens")

    def block(self, i: int, j: int, stage: StageSpec, x: str) -> str:
        block = stage.block_at(j)
        name = f"stages.{i}.blocks.{j}"
        path = f"stages[{i}].block" + (f"[{j % len(stage.block)}]" if len(stage.block) > 1 else "")
        x = self.layout(f"{name}.layout", x, block.layout or stage.layout, f"{path}.layout")
        for branch in TEMPLATES[block.template]:
            if getattr(block, PART_FIELDS[branch.main]) is not None:
                x = self.branch(name, path, block, branch, x)
        return x

    def branch(self, name: str, path: str, block: BlockSpec, branch: Branch, x: str) -> str:
        """``shortcut(x) + parts(x)``; a shortcut op sizes itself to the branch's output. A branch that reads
        or writes the prefix tokens only starts from a ``prefix_view`` node (see :meth:`prefix_view`)."""
        prefix = self.prefix_view(name, path, block, branch, x) if "prefix" in (branch.reads, branch.writes) else x
        start = prefix if branch.writes == "prefix" else x
        h = prefix if branch.reads == "prefix" else x
        for part in branch.parts:
            h = self.part(name, path, block, part, h)
        if not branch.residual:
            return h
        s, target = start, self.out(h)
        for part in branch.shortcut:
            s = self.part(name, path, block, part, s, target.channels if target else None)
        kept = self.out(s)
        if kept is not None and target is not None and kept != target:
            if s != start:
                self.issues.append(Issue(f"{path}.shortcut", f"gives {kept}, but the block's branch gives {target}"))
            elif branch.writes == "prefix":
                self.issues.append(Issue(f"{path}.{PART_FIELDS[branch.main]}",
                                         f"gives {target}, but the '{block.template}' template adds it into the "
                                         f"prefix tokens only ({kept}); it must return those alone"))
            else:
                fix = ", or the block needs a shortcut" if "shortcut" in branch.shortcut else ""
                self.issues.append(Issue(f"{path}.{PART_FIELDS[branch.main]}",
                                         f"changes the tensor type from {kept} to {target}; a residual branch must "
                                         f"keep it{fix}"))
            target = None
        inputs = [(s, kept), (h, self.out(h))]
        if branch.writes == "prefix":  # the sum replaces x's prefix tokens; x's grid tokens pass through
            inputs.append((x, self.out(x)))
            target = self.out(x) if target is not None else None
        return self.node(f"{name}.add_{branch.main}", "add", inputs, target, path)

    def prefix_view(self, name: str, path: str, block: BlockSpec, branch: Branch, x: str) -> str:
        """The prefix tokens of ``x`` alone, ``x[:, :P]`` of shape (B, P, C): a tokens type with an empty grid."""
        t = self.out(x)
        out = None
        if t is not None:
            if t.layout == "tokens" and t.prefix:
                out = t.with_grid(0, 0)
            else:
                self.issues.append(Issue(f"{path}.template", f"'{block.template}' updates the prefix tokens only, "
                                                             f"but the block gets {t} without any; use it in a stage "
                                                             "with prefix_tokens"))
        return self.node(f"{name}.{branch.main}_prefix", "prefix_view", [(x, t)], out, path)

    def part(self, name: str, path: str, block: BlockSpec, part: str, src: str, dim: int | None = None) -> str:
        field = PART_FIELDS[part]
        value = getattr(block, field)
        if value is None:
            return src
        role = PART_ROLES.get(field)
        if role is None:  # a layer scale or res scale: its value is the init
            return self.scale(f"{name}.{part}", src, value, f"{path}.{field}")
        if role == "downsample":
            opdef = REGISTRIES[role].of_spec(value)
            if isinstance(opdef, OpDef) and opdef.accepts:
                src = self.layout(f"{name}.{part}_layout", src, opdef.accepts[0], f"{path}.{field}.type")
            t = self.out(src)
            return self.op(f"{name}.{part}", role, value, f"{path}.{field}", src, dim or (t.channels if t else 1))
        return self.op(f"{name}.{part}", role, value, f"{path}.{field}", src)


def lower(spec: ArchSpec) -> ArchGraph:
    """The typed graph of a schema-valid spec; raises SpecError listing every shape problem."""
    return _Lowering(spec).lower()


__all__ = ["ArchGraph", "lower"]
