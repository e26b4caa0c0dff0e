"""Lowering: ArchSpec -> typed graph.

Nodes are ops at the registry's granularity, named by their module path in the compiled network
(``stages.2.blocks.0.token_mixer``) and carrying their spec path (``stages[2].block.token_mixer``).
Every edge carries the :class:`TensorType` flowing along it. Shape rules run in topological order;
every violation is collected, and :class:`SpecError` lists them all.

The lowering records nodes and edges as plain data (:class:`Lowered`, without networkx, so that checking a
spec's shapes is cheap and quick to import); :func:`lower` turns the records into an
:class:`~metaformer_lab.graph.arch.ArchGraph`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from metaformer_lab.core.errors import Issue, ShapeIssue, SpecError
from metaformer_lab.core.registry import CompositeDef, OpDef, Resolved
from metaformer_lab.core.types import Layout, TensorType
from metaformer_lab.graph.plan import BlockPlan, BranchPlan, NetworkPlan, StagePlan
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import layout_change_problem
from metaformer_lab.ops.prefix import routes_prefix
from metaformer_lab.spec.arch import ArchSpec, BlockSpec, StageSpec
from metaformer_lab.spec.templates import (
    MIXER_FIELDS,
    PART_FIELDS,
    RESERVED_NAMES,
    TEMPLATES,
    Branch,
    Source,
    kept_branches,
    mixer_fields,
    part_sources,
    step_part_names,
    used_fields,
)

if TYPE_CHECKING:
    from metaformer_lab.graph.arch import ArchGraph


@dataclass
class Lowered:
    """A schema-valid spec whose shapes check: its nodes' attributes by name, in the order added (a topological
    order), its edges ``(source, target, tensor type)``, its input and output types and its plan. ``graph`` is
    the :class:`~metaformer_lab.graph.arch.ArchGraph` of these records, built on first use."""

    spec: ArchSpec
    nodes: dict[str, dict[str, Any]]
    edges: list[tuple[str, str, TensorType | None]]
    input: TensorType
    output: TensorType
    plan: NetworkPlan

    @cached_property
    def graph(self) -> ArchGraph:
        from metaformer_lab.graph.arch import ArchGraph

        return ArchGraph.of(self)


def _at(path: str, field: str) -> str:
    return f"{path}.{field}" if field else path


@cache
def _stage_context_key(spec_class: type) -> Callable[[Any, Resolved], Any] | None:
    """The ``stage_context_key`` method of an op config class, if it has one (looked up once per class: pydantic
    answers a missing attribute slowly)."""
    return getattr(spec_class, "stage_context_key", None)


@dataclass(frozen=True)
class _Wiring:
    """How a block spec is wired (:mod:`metaformer_lab.spec.templates`): what configures each part, the branches
    it keeps and the block fields they read."""

    sources: dict[str, Source]
    kept: tuple[Branch, ...]
    used: set[str]


@dataclass(frozen=True)
class _BlockRecord:
    """A block lowered without a problem, kept so that the stage's next blocks, when they are the same block spec
    at the same spec path fed the same tensor type, are copies of it under their own names rather than lowered again
    (a stage's blocks are mostly one spec repeated). ``key``: (id of the block spec, its path, its input type)."""

    key: tuple[int, str, TensorType | None]
    name: str  # the block's name prefix, ``stages.1.blocks.0``
    source: str  # the node the block reads
    nodes: tuple[str, ...]  # the nodes it added, in order
    edges: tuple[tuple[str, str, TensorType | None], ...]
    plan: BlockPlan
    last: str


class _Lowering:
    def __init__(self, spec: ArchSpec, unknown: Mapping[str, bool], reuse_blocks: bool = True) -> None:
        self.spec = spec
        self.unknown = unknown
        self.reuse_blocks = reuse_blocks
        self.record: _BlockRecord | None = None  # the stage's block last lowered in full
        self.order: list[str] = []  # node names in the order added
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: list[tuple[str, str, TensorType | None]] = []
        self.stage_start = 0  # where the current stage's nodes begin in ``order``
        self.issues: list[Issue] = []
        self.last = "input"  # the output node of the block lowered last
        # where the nodes being added sit (stamped on each node)
        self.group, self.stage_index, self.block_index = "input", None, None
        self.inside: str | None = None
        self._wirings: dict[int, _Wiring] = {}  # by id() of the block spec: a stage's blocks share one

    # --- primitives -------------------------------------------------------------------------

    def wiring(self, block: BlockSpec) -> _Wiring:
        found = self._wirings.get(id(block))
        if found is None:
            sources = part_sources(block)
            kept = kept_branches(block, sources)
            found = self._wirings[id(block)] = _Wiring(sources, kept, used_fields(block, sources, kept))
        return found

    def first_block_resizes(self, stage: StageSpec) -> bool:
        """The stage's first block may change the width itself (a downsampling block): it has a shortcut op, or
        its template has a branch without a residual."""
        block = stage.block_at(0)
        wiring = self.wiring(block)
        has_shortcut = block.shortcut is not None and "shortcut" in wiring.used
        return has_shortcut or not all(b.residual for b in wiring.kept)

    def out(self, name: str) -> TensorType | None:
        return self.nodes[name]["out"]

    def node(self, name: str, kind: str, inputs: list[tuple[str, TensorType | None]], out: TensorType | None,
             path: str, spec: BaseModel | None = None, role: str | None = None, part: str | None = None) -> str:
        in_type = inputs[0][1] if inputs else None
        self.nodes[name] = {"kind": kind, "path": path, "spec": spec, "role": role, "in_type": in_type, "out": out,
                            "part": part, "group": self.group, "stage": self.stage_index, "block": self.block_index,
                            "inside": self.inside}
        self.order.append(name)
        self.edges.extend((src, name, t) for src, t in inputs)
        return name

    def op(self, name: str, part: str, role: str, spec: BaseModel, path: str, src: str, out_dim: int | None = None,
           x: TensorType | None = None) -> str:
        """A leaf op from registry ``role``; ``out_dim`` is the output width of stems and downsamplers, the
        number of classes of heads, the width a composite asks of a branch (``concat``).
        The node keeps what the op's shape rule resolved (``resolved``)."""
        x = self.out(src) if x is None else x
        if path in self.unknown:  # a config that failed validation: no shape rule, its type passed on or lost
            out = x if self.unknown[path] else None
            self.node(name, role, [(src, x)], out, path, spec, role, part)
            self.nodes[name]["resolved"] = None
            return name
        opdef = REGISTRIES[role].of_spec(spec)
        if isinstance(opdef, CompositeDef):
            return self.composite(name, part, opdef, spec, path, src, x)
        out, resolved = None, None
        if x is not None:
            try:
                resolved = opdef.resolve(spec, x, out_dim)
                out = resolved.out_type
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
                out = x if opdef.preserves_type and out_dim is None else None  # a width asked for: unknown
        self.node(name, role, [(src, x)], out, path, spec, role, part)
        self.nodes[name]["resolved"] = resolved
        return name

    def composite(self, name: str, part: str, opdef: CompositeDef[Any], spec: BaseModel, path: str, src: str,
                  x: TensorType | None) -> str:
        """A fork node, one subgraph per branch, and the join node that stands for the whole mixer."""
        inputs: list[tuple[TensorType | None, int | None]] = [(None, None)] * len(opdef.branches(spec))
        if x is not None:
            try:
                inputs = list(opdef.branch_inputs(spec, x))
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
        fork = self.node(f"{name}.fork", "fork", [(src, x)], x, path, spec)
        outer, self.inside = self.inside, name
        ends = [self.op(f"{name}.branches.{k}", str(k), "token_mixer", child, f"{path}.branches[{k}]", fork, dim,
                        x=t)
                for k, (child, (t, dim)) in enumerate(zip(opdef.branches(spec), inputs, strict=True))]
        self.inside = outer
        outs = [self.out(e) for e in ends]
        out = None
        if x is not None and all(o is not None for o in outs):
            try:
                out = opdef.join(spec, x, outs)  # type: ignore[arg-type]
            except ShapeIssue as issue:
                self.issues.append(Issue(_at(path, issue.field), issue.message))
        if out is None and x is not None and opdef.preserves_type:
            out = x
        self.node(name, "token_mixer", [(e, self.out(e)) for e in ends], out, path, spec, "token_mixer", part)
        resolved = Resolved(x, out) if x is not None and out is not None else None
        self.nodes[name].update(fork=fork, branches=ends, resolved=resolved)
        return name

    def layout(self, name: str, part: str, src: str, layout: Layout, path: str) -> str:
        x = self.out(src)
        if x is None or x.layout == layout:
            return src
        problem = layout_change_problem(x, layout)
        if problem:
            self.issues.append(Issue(path, problem))
            return self.node(name, "layout", [(src, x)], None, path, part=part)
        return self.node(name, "layout", [(src, x)], x.to(layout), path, part=part)

    def scale(self, name: str, part: str, src: str, init: float | None, path: str) -> str:
        if init is None:
            return src
        self.node(name, "scale", [(src, self.out(src))], self.out(src), path, part=part)
        self.nodes[name]["init"] = init
        return name

    def norm(self, name: str, spec: BaseModel | None, path: str, src: str) -> str:
        return src if spec is None else self.op(name, "norm", "norm", spec, path, src)

    # --- structure ----------------------------------------------------------------------------

    def lower(self) -> Lowered:
        spec = self.spec
        h, w = spec.input.hw
        x = self.node("input", "input", [], TensorType("maps", spec.input.channels, h, w), "input")
        stem_dim = getattr(spec.stem, "dim", None) or spec.stages[0].dim
        self.group = "stem"
        stem = x = self.op("stem", "stem", "stem", spec.stem, "stem", x, stem_dim)
        stages = []
        for i, stage in enumerate(spec.stages):
            self.group, self.stage_index, self.stage_start, self.record = f"stages.{i}", i, len(self.order), None
            stages.append(self.stage(i, stage, x))
            x = stages[-1].end
        self.group, self.stage_index = "head", None
        head = self.op("head", "head", "head", spec.head, "head", x, spec.num_classes)
        if self.issues:
            raise SpecError(self.issues)
        plan = NetworkPlan(stem=stem, stages=tuple(stages), head=head)
        return Lowered(spec, self.nodes, self.edges, self.out("input"), self.out(head), plan)

    def stage(self, i: int, stage: StageSpec, x: str) -> StagePlan:
        name, path = f"stages.{i}", f"stages[{i}]"
        slots: dict[str, str | None] = dict.fromkeys(
            ("downsample_layout", "downsample", "layout", "prefix", "pos_embed", "collect", "norm"))

        def added(slot: str, node: str, before: str) -> str:
            if node != before:
                slots[slot] = node
            return node

        if stage.downsample is not None:
            accepts = REGISTRIES["downsample"].of_spec(stage.downsample)
            if isinstance(accepts, OpDef) and accepts.accepts and not routes_prefix(stage.downsample, self.out(x)):
                x = added("downsample_layout", self.layout(f"{name}.downsample_layout", "downsample_layout", x,
                                                           accepts.accepts[0], f"{path}.downsample.type"), x)
            x = added("downsample", self.op(f"{name}.downsample", "downsample", "downsample", stage.downsample,
                                            f"{path}.downsample", x, stage.dim), x)
        elif (t := self.out(x)) is not None and t.channels != stage.dim and not self.first_block_resizes(stage):
            self.issues.append(Issue(f"{path}.dim", f"{stage.dim} differs from the {t.channels} channels coming in; "
                                                    "a downsample is needed to change the width"))
        x = added("layout", self.layout(f"{name}.layout", "layout", x, stage.layout, f"{path}.layout"), x)
        if stage.prefix_tokens:
            x = added("prefix", self.prefix(name, path, stage, x), x)
        pos = stage.pos_embed
        if pos is not None and pos.after_block is None:
            x = added("pos_embed", self.op(f"{name}.pos_embed", "pos_embed", "pos_embed", pos, f"{path}.pos_embed", x),
                      x)
        if pos is not None and pos.after_block is not None and pos.after_block >= stage.depth:
            self.issues.append(Issue(f"{path}.pos_embed.after_block",
                                     f"{pos.after_block} is past the last block (depth {stage.depth})"))
        blocks, block_outs = [], []
        for j in range(stage.depth):
            self.block_index = j
            blocks.append(self.block(i, j, stage, x))
            x = self.last
            block_outs.append(x)
            self.block_index = None
            if pos is not None and pos.after_block == j:
                x = added("pos_embed", self.op(f"{name}.pos_embed", "pos_embed", "pos_embed", pos,
                                               f"{path}.pos_embed", x), x)
        if stage.downsample is None and self.first_block_resizes(stage) and (t := self.out(x)) is not None \
                and t.channels != stage.dim:
            self.issues.append(Issue(f"{path}.dim", f"{stage.dim} differs from the {t.channels} channels its blocks "
                                                    "give"))
        self.stage_context(i)
        if stage.collect_prefix:
            x = added("collect", self.collect(name, path, block_outs), x)
        x = added("norm", self.norm(f"{name}.norm", stage.norm, f"{path}.norm", x), x)
        pos_after = -1 if pos is None or pos.after_block is None else pos.after_block
        return StagePlan(**slots, pos_after=pos_after, blocks=tuple(blocks), end=x)

    def stage_context(self, i: int) -> None:
        """The stage's block parts that give their stage its context (``stage_context_key``: GC-ViT's query generator)
        must give the same one: the stage runs one (:func:`metaformer_lab.compile.compiler.hoist_stage_context`)."""
        first: tuple[Any, str] | None = None
        for node in (self.nodes[n] for n in self.order[self.stage_start:]):
            if node["inside"] is not None or node.get("resolved") is None:
                continue
            key_of = _stage_context_key(type(node.get("spec")))
            if key_of is None:
                continue
            key = key_of(node["spec"], node["resolved"])
            if key is None:
                continue
            if first is None:
                first = (key, node["path"])
            elif key != first[0]:
                self.issues.append(Issue(node["path"], f"its stage context {key} differs from {first[0]} of "
                                                       f"{first[1]}; a stage has one"))

    def prefix(self, name: str, path: str, stage: StageSpec, x: str) -> str:
        t = self.out(x)
        out = None
        if t is not None:
            if t.layout != "tokens":
                self.issues.append(Issue(f"{path}.prefix_tokens", "prefix tokens need layout 'tokens'"))
            else:
                out = t.with_prefix(t.prefix + stage.prefix_tokens)
        node = self.node(f"{name}.prefix", "prefix", [(x, t)], out, f"{path}.prefix_tokens", part="prefix")
        self.nodes[node]["count"] = stage.prefix_tokens
        return node

    def collect(self, name: str, path: str, block_outs: list[str]) -> str:
        """Every block's prefix tokens, in block order, in front of the last block's grid tokens: (B, D*P + N, C)."""
        types = [self.out(b) for b in block_outs]
        t, out = types[-1], None
        if t is not None:
            if t.layout != "tokens" or not t.prefix or any(u is not None and u.prefix != t.prefix for u in types):
                self.issues.append(Issue(f"{path}.collect_prefix", f"needs blocks that keep the same prefix tokens "
                                                                   f"(layout 'tokens'); the last block gives {t}"))
            else:
                out = t.with_prefix(t.prefix * len(block_outs))
        return self.node(f"{name}.collect", "collect", [(b, u) for b, u in zip(block_outs, types, strict=True)], out,
                         f"{path}.collect_prefix")

    def block(self, i: int, j: int, stage: StageSpec, x: str) -> BlockPlan:
        """The block's nodes and plan; its output node is left in ``self.last``."""
        block = stage.block_at(j)
        name = f"stages.{i}.blocks.{j}"
        path = f"stages[{i}].{stage.block_path(j)}"
        key = (id(block), path, self.out(x))
        if self.record is not None and self.record.key == key:
            return self.copy_block(self.record, name, x)
        first_node, first_edge, issues = len(self.order), len(self.edges), len(self.issues)
        plan = self.lower_block(name, path, block, stage, x)
        if self.reuse_blocks and len(self.issues) == issues:
            self.record = _BlockRecord(key, name, x, tuple(self.order[first_node:]), tuple(self.edges[first_edge:]),
                                       plan, self.last)
        return plan

    def copy_block(self, record: _BlockRecord, name: str, x: str) -> BlockPlan:
        """``record``'s block again, as block ``name`` reading ``x``: its nodes, edges and plan renamed (the node
        attributes that hold names, ``inside``, ``fork`` and ``branches``, too), shared configs and types kept."""
        cut = len(record.name)

        def rename(node: str) -> str:
            return x if node == record.source else name + node[cut:]

        for old in record.nodes:
            attrs = {**self.nodes[old], "block": self.block_index}
            if attrs["inside"] is not None:
                attrs["inside"] = rename(attrs["inside"])
            if "fork" in attrs:
                attrs["fork"], attrs["branches"] = rename(attrs["fork"]), [rename(b) for b in attrs["branches"]]
            new = rename(old)
            self.nodes[new] = attrs
            self.order.append(new)
        self.edges.extend((rename(src), rename(dst), t) for src, dst, t in record.edges)
        self.last = rename(record.last)
        plan = record.plan
        branches = tuple(BranchPlan(tuple(map(rename, b.parts)), tuple(map(rename, b.shortcut)), b.reads_prefix,
                                    b.writes_prefix, b.residual, b.drop_path) for b in plan.branches)
        return BlockPlan(None if plan.layout is None else rename(plan.layout), branches, plan.prefix)

    def lower_block(self, name: str, path: str, block: BlockSpec, stage: StageSpec, x: str) -> BlockPlan:
        start = x
        x = self.layout(f"{name}.layout", "layout", x, block.layout or stage.layout, f"{path}.layout")
        layout = x if x != start else None
        branches, prefix = [], 0
        wired = self.unused_parts(path, block)
        for branch in self.wiring(block).kept if wired else ():
            x, plan, view = self.branch(name, path, block, branch, x)
            branches.append(plan)
            if view is not None and (t := self.out(view)) is not None:
                prefix = t.prefix
        self.last = x
        return BlockPlan(layout=layout, branches=tuple(branches), prefix=prefix)

    def unused_parts(self, path: str, block: BlockSpec) -> bool:
        """A block left without a branch computes nothing, and a shortcut op no kept branch runs is a mistake.
        Returns whether the block's branches can be lowered (its steps' module names are unique)."""
        if block.steps is not None:
            return self.step_issues(path, block)
        if not self.wiring(block).kept:
            fields = {PART_FIELDS[p] for b in TEMPLATES[block.template] for p in b.parts} & set(MIXER_FIELDS)
            wanted = " or a ".join(f.replace("_", " ") for f in MIXER_FIELDS if f in fields)
            self.issues.append(Issue(f"{path}.token_mixer", f"null leaves the '{block.template}' block without a "
                                                            f"branch; give it a {wanted}"))
        elif block.shortcut is not None and "shortcut" not in self.wiring(block).used:
            why = "its branch is left out (token_mixer: null)" if block.token_mixer is None else \
                f"the '{block.template}' template has no shortcut"
            self.issues.append(Issue(f"{path}.shortcut", f"is unused: {why}"))
        return True

    def step_issues(self, path: str, block: BlockSpec) -> bool:
        """A block wired by its steps: each step runs one mixer, module names are unique, and the template's
        fields are left out. Returns whether the names are unique."""
        for field in ("token_mixer", "channel_mixer", "shortcut"):
            if getattr(block, field) is not None:
                self.issues.append(Issue(f"{path}.{field}", "is unused: the block is wired by its steps"))
        if "template" in block.model_fields_set:
            self.issues.append(Issue(f"{path}.template", "is unused: the block is wired by its steps"))
        steps = block.steps or {}
        adds = [f"add_{key}" for key, step in steps.items() if step.residual]
        unique = True
        names = [n for own in step_part_names(block) for n in own] + adds
        for key, step in steps.items():
            at = f"{path}.steps.{key}"
            if step.token_mixer is None and step.channel_mixer is None:
                self.issues.append(Issue(at, "has no mixer; give it a token_mixer or a channel_mixer"))
            elif step.token_mixer is not None and step.channel_mixer is not None:
                self.issues.append(Issue(f"{at}.channel_mixer", "a step runs one mixer, and this one has a "
                                                                "token_mixer too"))
            if key in RESERVED_NAMES or names.count(key) > 1 or names.count(f"add_{key}") > 1:
                reserved = ", ".join(sorted(RESERVED_NAMES))
                self.issues.append(Issue(at, f"'{key}' is taken: the block's module names must be unique (its "
                                             f"norms and scales are numbered norm1, layer_scale1, ...; reserved: "
                                             f"{reserved})"))
                unique = False
        return unique

    def branch(self, name: str, path: str, block: BlockSpec, branch: Branch,
               x: str) -> tuple[str, BranchPlan, str | None]:
        """``shortcut(x) + parts(x)``; a shortcut op sizes itself to the branch's output. A branch that reads
        or writes the prefix tokens only starts from a ``prefix_view`` node (see :meth:`prefix_view`).
        Returns the branch's output node, its plan and its prefix view (or None)."""
        view = self.prefix_view(name, path, block, branch, x) if "prefix" in (branch.reads, branch.writes) else None
        start = view if branch.writes == "prefix" else x
        h = view if branch.reads == "prefix" else x
        parts: list[str] = []
        sources = self.wiring(block).sources
        for part in branch.parts:
            h = self.part(name, path, sources[part], part, h, parts)
        def plan(shortcut: tuple[str, ...] = ()) -> BranchPlan:
            return BranchPlan(tuple(parts), shortcut, reads_prefix=branch.reads == "prefix",
                              writes_prefix=branch.writes == "prefix", residual=branch.residual,
                              drop_path=branch.drop_path)

        if not branch.residual:
            return h, plan(), view
        s, target = start, self.out(h)
        shortcut: list[str] = []
        for part in branch.shortcut:
            s = self.part(name, path, sources[part], part, s, shortcut, target.channels if target else None)
        kept, mixer = self.out(s), mixer_fields(branch, block, sources)[0]
        if kept is not None and target is not None and kept != target:
            if s != start:
                self.issues.append(Issue(f"{path}.shortcut", f"gives {kept}, but the block's branch gives {target}"))
            elif branch.writes == "prefix":
                self.issues.append(Issue(f"{path}.{mixer}",
                                         f"gives {target}, but the '{block.template}' template adds it into the "
                                         f"prefix tokens only ({kept}); it must return those alone"))
            else:
                fix = ", or the block needs a shortcut" if "shortcut" in branch.shortcut else ""
                self.issues.append(Issue(f"{path}.{mixer}",
                                         f"changes the tensor type from {kept} to {target}; a residual branch must "
                                         f"keep it{fix}"))
            target = None
        inputs = [(s, kept), (h, self.out(h))]
        if branch.writes == "prefix":  # the sum replaces x's prefix tokens; x's grid tokens pass through
            inputs.append((x, self.out(x)))
            target = self.out(x) if target is not None else None
        return self.node(f"{name}.add_{branch.main}", "add", inputs, target, path), plan(tuple(shortcut)), view

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

    def part(self, name: str, path: str, source: Source, part: str, src: str, added: list[str],
             dim: int | None = None) -> str:
        """The node(s) of one part (a shortcut op may need a layout conversion first), appended to ``added``."""
        field, role, value = source.field, source.role, source.value
        if value is None:
            return src
        if role is None:  # a layer scale or res scale: its value is the init
            x = self.scale(f"{name}.{part}", part, src, value, f"{path}.{field}")
        elif role == "downsample":
            opdef = REGISTRIES[role].of_spec(value)
            if isinstance(opdef, OpDef) and opdef.accepts and not routes_prefix(value, self.out(src)):
                converted = self.layout(f"{name}.{part}_layout", f"{part}_layout", src, opdef.accepts[0],
                                        f"{path}.{field}.type")
                if converted != src:
                    added.append(converted)
                src = converted
            t = self.out(src)
            x = self.op(f"{name}.{part}", part, role, value, f"{path}.{field}", src, dim or (t.channels if t else 1))
        else:
            x = self.op(f"{name}.{part}", part, role, value, f"{path}.{field}", src)
        added.append(x)
        return x


def check_shapes(spec: ArchSpec, *, unknown: Mapping[str, bool] | None = None, reuse_blocks: bool = True) -> Lowered:
    """The lowering of a schema-valid spec as records (its ``graph`` built when asked for); raises SpecError
    listing every shape problem. ``unknown``: as for :func:`lower`. ``reuse_blocks=False`` lowers every block
    afresh instead of copying a stage's repeated blocks (the same records; tests compare the two)."""
    return _Lowering(spec, unknown or {}, reuse_blocks).lower()


def lower(spec: ArchSpec, *, unknown: Mapping[str, bool] | None = None) -> ArchGraph:
    """The typed graph of a schema-valid spec; raises SpecError listing every shape problem.

    ``unknown``: spec paths of op configs that stand in for invalid ones (a spec patched by
    :func:`metaformer_lab.spec.partial.partial_spec`, to check the rest of a spec with schema problems):
    their shape rules are skipped; the value says whether the op keeps its input type, so that what follows
    is checked, else what follows gets no type and is not checked.
    """
    return check_shapes(spec, unknown=unknown).graph


__all__ = ["Lowered", "check_shapes", "lower"]
