"""How big a space is, and what it offers, as a tree.

The number of points is the number of distinct assignments of the active parameters: a choice of options
adds its options' counts, a mapping multiplies its parts' counts. A parameter used in several places
(a tie) is counted once, by inclusion-exclusion: the points where it never becomes active, plus for each
of its values the points where it is active with that value.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import pickle
import select
import signal
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from metaformer_lab.space.decode import InvalidPoint, draw, first_reason
from metaformer_lab.space.schema import SearchSpace
from metaformer_lab.space.tree import VARIANT, Choice, Template, all_choices, join, show_label

_NEVER = object()  # a shared parameter bound to "never active"


def _shared(template: Template) -> set[str]:
    return {name for name, n in Counter(c.name for c in all_choices(template)).items() if n > 1}


def _first_unbound(nodes: Iterable[Any], env: Mapping[str, Any], shared: set[str]) -> Choice | None:
    for node in nodes:
        if isinstance(node, Choice):
            if node.name in shared and node.name not in env:
                return node
            found = _first_unbound(node.options, env, shared)
        elif isinstance(node, dict):
            found = _first_unbound(node.values(), env, shared)
        elif isinstance(node, (list, tuple)):
            found = _first_unbound(node, env, shared)
        else:
            found = None
        if found is not None:
            return found
    return None


def _free(node: Any, env: Mapping[str, Any]) -> int:
    """Points of ``node`` given the bound shared parameters ``env`` (no unbound shared ones inside)."""
    if isinstance(node, Choice):
        if node.name in env:
            value = env[node.name]
            if value is _NEVER:
                return 0
            return _free(node.option(value), env) if node.kind == "categorical" else 1
        if node.kind == "categorical":
            return sum(_free(o, env) for o in node.options)
        return len(node.values() or [])
    if isinstance(node, dict):
        return math.prod(_free(v, env) for v in node.values())
    if isinstance(node, (list, tuple)):
        return math.prod(_free(v, env) for v in node)
    return 1


def _count(nodes: list[Any], env: Mapping[str, Any], shared: set[str]) -> int:
    tied = _first_unbound(nodes, env, shared)
    if tied is None:
        return math.prod(_free(node, env) for node in nodes)
    never = _count(nodes, {**env, tied.name: _NEVER}, shared)
    return never + sum(_count(nodes, {**env, tied.name: v}, shared) - never for v in tied.values() or [])


def continuous(space: SearchSpace) -> list[str]:
    """Names of the continuous parameters (float ranges without a step)."""
    return sorted({c.name for c in all_choices(space.template) if c.values() is None})


def count_points(space: SearchSpace) -> int | None:
    """The exact number of points (distinct assignments); None when a parameter is continuous."""
    if continuous(space):
        return None
    template = space.template
    shared = _shared(template)
    counts = [template.num_stages] if isinstance(template.num_stages, int) else template.num_stages.values() or []
    return sum(_count([*template.parts.values(), *template.stages[: int(n)]], {}, shared) for n in counts)


@dataclass(frozen=True)
class Validity:
    """The share of valid points, estimated from ``drawn`` random points (Wilson 95 % interval)."""

    drawn: int
    valid: int
    low: float
    high: float
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.valid / self.drawn if self.drawn else 0.0


BLOCK = 50
"""Draws per block of :func:`valid_share`: block ``b`` draws from its own stream (seeded ``"{seed}.{b}"``), so a
count is the same whichever process draws each block."""


def valid_share(space: SearchSpace, n: int = 200, seed: int = 0,
                progress: Callable[[int], None] | None = None, *, processes: int = 1) -> Validity:
    """Draw ``n`` random points and count the valid ones (with the reasons of the invalid ones).

    With ``processes`` > 1 (where the OS forks), forked children draw a share of the blocks beside this process,
    each sending its counts back when done: the same result, sooner (drawing is pure Python: one core each).
    ``progress`` is called in this process with the number of points drawn so far by all of them.
    """
    blocks = [(b, min(BLOCK, n - b * BLOCK)) for b in range(math.ceil(n / BLOCK))]
    workers = max(1, min(processes, len(blocks))) if hasattr(os, "fork") else 1
    drawn = mmap.mmap(-1, 8 * workers)  # points drawn per process, shared with the forked children

    def tally(i: int, report: Callable[[], None] | None) -> tuple[int, Counter[str]]:
        valid, done, reasons = 0, 0, Counter[str]()
        for b, size in blocks[i::workers]:
            for item in islice(draw(space, f"{seed}.{b}"), size):
                if isinstance(item, InvalidPoint):
                    reasons[first_reason(item)] += 1
                else:
                    valid += 1
                done += 1
                _COUNTER.pack_into(drawn, 8 * i, done)
                if report is not None:
                    report()
        return valid, reasons

    def report() -> None:
        if progress is not None:
            progress(sum(_COUNTER.unpack_from(drawn, 8 * i)[0] for i in range(workers)))

    children = [_Forked(lambda i=i: tally(i, None)) for i in range(1, workers)]
    try:
        valid, reasons = tally(0, report)
        for child in children:
            more_valid, more_reasons = child.result(report)
            valid += more_valid
            reasons.update(more_reasons)
    finally:
        for child in children:
            child.stop()
        drawn.close()
    z, p = 1.96, valid / n if n else 0.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n) if n else 0.0
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n) if n else 0.0
    return Validity(n, valid, max(0.0, centre - half), min(1.0, centre + half), dict(reasons.most_common()))


_COUNTER = struct.Struct("q")


class _Forked:
    """``work()`` run in a forked child, its pickled result sent back through a pipe."""

    def __init__(self, work: Callable[[], Any]) -> None:
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: compute, send, and leave, never returning into the parent's code
            try:
                os.close(read)
                try:
                    payload = pickle.dumps((True, work()))
                except BaseException as err:  # noqa: BLE001  (sent to the parent, which raises it)
                    payload = pickle.dumps((False, f"{type(err).__name__}: {err}"))
                with os.fdopen(write, "wb") as pipe:
                    pipe.write(payload)
            finally:
                os._exit(0)  # nothing sent: the parent says the process ended without a result
        os.close(write)
        self.pipe = os.fdopen(read, "rb")
        self.done = False

    def result(self, waiting: Callable[[], None]) -> Any:
        """The child's result; ``waiting`` is called every 50 ms until it arrives."""
        while not select.select([self.pipe], [], [], 0.05)[0]:
            waiting()
        data = self.pipe.read()
        self.pipe.close()
        _, status = os.waitpid(self.pid, 0)
        self.done = True
        if not data:
            raise RuntimeError(f"a drawing process ended without a result (wait status {status})")
        ok, value = pickle.loads(data)
        if not ok:
            raise RuntimeError(f"a drawing process failed: {value}")
        waiting()
        return value

    def stop(self) -> None:
        """Kill and reap the child if its result was never taken (this process was interrupted)."""
        if not self.done:
            self.pipe.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.done = True


# ---------------------------------------------------------------------------------------------
# the tree of choices


@dataclass
class ShowNode:
    """One line of ``space show``: a label and the lines under it."""

    label: str
    children: list[ShowNode] = field(default_factory=list)


def _rel(loc: str, base: str) -> str:
    if base and loc.startswith(base):
        return loc[len(base):].lstrip(".") or loc
    return loc


def _choice_nodes(node: Any, loc: str, base: str, shared: set[str]) -> list[ShowNode]:
    """The choices inside ``node`` (at spec location ``loc``), labelled relative to ``base``."""
    if isinstance(node, Choice):
        tied = f"  (parameter '{node.name}', shared)" if node.name in shared else ""
        what = "variant" if node.merge else _rel(loc, base)
        line = ShowNode(f"{what}: {node.describe()}{tied}")
        for label, option in zip(node.labels, node.options, strict=True):
            inner = _choice_nodes(option, loc, loc if not node.merge else base, shared)
            if inner:
                line.children.append(ShowNode(f"[{show_label(label)}]", inner))
        return [line]
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out += _choice_nodes(value, loc if key == VARIANT else join(loc, key), base, shared)
        return out
    if isinstance(node, list):
        return [n for i, v in enumerate(node) for n in _choice_nodes(v, join(loc, i), base, shared)]
    return []


def show_tree(space: SearchSpace) -> ShowNode:
    """The space's choices as a tree: network-wide ones, the number of stages, each stage, ties, references."""
    template = space.template
    shared = _shared(template)
    root = ShowNode(f"{space.name}" + (f": {space.description}" if space.description else ""))
    for key, part in template.parts.items():
        inner = _choice_nodes(part, key, "", shared)
        root.children += inner if inner else [ShowNode(f"{key}: fixed")]
    stages = template.num_stages
    root.children.append(ShowNode(f"num_stages: {stages.describe() if isinstance(stages, Choice) else stages}"))
    for i, stage in enumerate(template.stages):
        loc = f"stages[{i}]"
        root.children.append(ShowNode(loc, _choice_nodes(stage, loc, loc, shared) or [ShowNode("fixed")]))
    if space.ties:
        root.children.append(ShowNode("ties", [ShowNode(_tie_text(t)) for t in space.ties]))
    if space.references:
        root.children.append(ShowNode("references", [ShowNode(name) for name in space.references]))
    return root


def _tie_text(tie: Any) -> str:
    stages = "all stages" if tie.stages == "all" else "stages " + ", ".join(map(str, tie.stages))
    if tie.share is not None:
        return f"{tie.share} is one parameter over {stages}"
    return f"{tie.non_decreasing} does not decrease over {stages}"
