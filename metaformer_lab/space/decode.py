"""Decoding: an Optuna trial (or anything with its ``suggest_*`` methods) -> an exact ArchSpec.

Decoding is define-by-run: only the choices inside the options taken are suggested, so samplers see the
space's conditional structure, and ``optuna.trial.FixedTrial(params)`` decodes an assignment exactly.
A point that gives an invalid spec raises :class:`InvalidPoint` (a SpecError) whose issues keep the spec
path and name the parameters that produced them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from metaformer_lab.core.errors import Issue, SpecError
from metaformer_lab.graph.lower import Lowered, check_shapes
from metaformer_lab.space.schema import SearchSpace
from metaformer_lab.space.ties import constraint_issues
from metaformer_lab.space.tree import Choice, Decision, State, expand_once, show_label
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import read_spec

if TYPE_CHECKING:
    from metaformer_lab.graph.arch import ArchGraph


class TrialLike(Protocol):
    """What decoding needs of an ``optuna.trial.Trial`` (``FixedTrial`` and ``FrozenTrial`` have it too)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...


class InvalidPoint(SpecError):
    """A point of the space whose spec is invalid; ``params`` is the assignment, each issue names the
    parameters behind it."""

    def __init__(self, issues: Sequence[Issue], params: Mapping[str, Any]) -> None:
        super().__init__(issues)
        self.params = dict(params)


class TrialChooser:
    """Asks an Optuna trial for each choice (one value each)."""

    def __init__(self, trial: TrialLike) -> None:
        self.trial = trial

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        if choice.kind == "categorical":
            return [self.trial.suggest_categorical(choice.name, list(choice.labels))]
        if choice.kind == "int":
            return [self.trial.suggest_int(choice.name, int(choice.low), int(choice.high), step=int(choice.step or 1),
                                           log=choice.log)]
        return [self.trial.suggest_float(choice.name, float(choice.low), float(choice.high), step=choice.step,
                                         log=choice.log)]

    def accept(self, loc: str, value: Any, state: State) -> bool:
        return True


@dataclass(frozen=True)
class Point:
    """A decoded point: the spec, its lowering, the assignment, and which choice decided what."""

    spec: ArchSpec
    lowered: Lowered
    params: Mapping[str, Any]
    decisions: tuple[Decision, ...]

    @property
    def graph(self) -> ArchGraph:
        """The spec's typed graph (built on first use: drawing points to count the valid ones never needs it)."""
        return self.lowered.graph


def point_name(space: SearchSpace, params: Mapping[str, Any]) -> str:
    """A stable spec name for an assignment: ``<space>-<8 hex digits of the assignment>``."""
    text = json.dumps(dict(sorted(params.items())), sort_keys=True, default=str)
    return f"{space.name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def expand_point(space: SearchSpace, trial: TrialLike) -> tuple[dict[str, Any], State]:
    """The spec data a trial decodes to (not yet validated), with what was decided."""
    return expand_once(space.template, TrialChooser(trial))


def decode_point(space: SearchSpace, trial: TrialLike) -> Point:
    """Decode a trial into a validated, lowered point; raises InvalidPoint."""
    data, state = expand_point(space, trial)
    return finish(space, data, state)


def decode(space: SearchSpace, trial: TrialLike) -> ArchSpec:
    """The ArchSpec a trial decodes to; raises :class:`InvalidPoint` (a SpecError) for an invalid point."""
    return decode_point(space, trial).spec


def finish(space: SearchSpace, data: dict[str, Any], state: State) -> Point:
    """Name, validate and lower expanded spec data; raises InvalidPoint naming the parameters involved."""
    data = {"name": point_name(space, state.params),
            "description": f"a point of search space '{space.name}'", **data}
    try:
        spec = read_spec(data, block_dirs=space.block_dirs)
    except SpecError as err:
        raise InvalidPoint(attribute(err.issues, state), state.params) from None
    broken = constraint_issues(space, data)
    if broken:
        raise InvalidPoint(attribute(broken, state), state.params)
    try:
        lowered = check_shapes(spec)
    except SpecError as err:
        raise InvalidPoint(attribute(err.issues, state), state.params) from None
    return Point(spec, lowered, dict(state.params), state.decisions)


def _related(path: str, loc: str) -> bool:
    def under(a: str, b: str) -> bool:
        return a == b or a.startswith((b + ".", b + "["))

    return under(path, loc) or under(loc, path)


def _stage_of(path: str) -> str | None:
    if path.startswith("stages["):
        return path[: path.index("]") + 1]
    return None


def responsible(path: str, decisions: Sequence[Decision]) -> list[Decision]:
    """The decisions behind a problem at spec ``path``: those at or under it or above it, and the width of
    its stage (a shape rule compares against it)."""
    stage = _stage_of(path)
    dims = {f"{stage}.dim"} if stage else set()
    seen: dict[str, Decision] = {}
    for d in decisions:
        if _related(path, d.loc) or d.loc in dims:
            seen.setdefault(d.name, d)
    return list(seen.values())


def attribute(issues: Sequence[Issue], state: State) -> list[Issue]:
    """Issues with the parameters behind each appended: ``...; parameters: a=1, b=2``."""
    out = []
    for issue in issues:
        behind = responsible(issue.path, state.decisions)
        if behind:
            names = ", ".join(f"{d.name}={show_label(d.value)}" for d in behind)
            out.append(Issue(issue.path, f"{issue.message}; parameters: {names}"))
        else:
            out.append(issue)
    return out


# ---------------------------------------------------------------------------------------------
# sampling


class RandomTrial:
    """A trial that draws every value uniformly at random (log-uniformly for log ranges), as Optuna's
    RandomSampler does, without a study or storage behind it; deterministic for a seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.params.setdefault(name, choices[self.rng.randrange(len(choices))])

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        if name not in self.params:
            if log:
                value = int(round(math.exp(self.rng.uniform(math.log(low), math.log(high + 1) - 1e-12)) - 0.5))
                self.params[name] = min(max(value, low), high)
            else:
                self.params[name] = low + step * self.rng.randrange((high - low) // step + 1)
        return int(self.params[name])

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        if name not in self.params:
            if log:
                value = math.exp(self.rng.uniform(math.log(low), math.log(high)))
            elif step is not None:
                value = low + step * self.rng.randrange(int(round((high - low) / step)) + 1)
            else:
                value = self.rng.uniform(low, high)
            self.params[name] = value
        return float(self.params[name])


@dataclass(frozen=True)
class Sample:
    """What :func:`sample` drew: distinct valid points, and how many draws were redrawn and why."""

    points: list[Point]
    invalid: int
    duplicates: int
    reasons: dict[str, int]

    @property
    def specs(self) -> list[ArchSpec]:
        return [p.spec for p in self.points]


def draw(space: SearchSpace, seed: int | str) -> Iterator[Point | InvalidPoint]:
    """An endless stream of random points (valid ones as Point, invalid ones as their InvalidPoint error); a str
    seed too gives the same stream in every process (``random.Random`` hashes it with SHA-512)."""
    rng = random.Random(seed)
    while True:
        try:
            yield decode_point(space, RandomTrial(rng))
        except InvalidPoint as err:
            yield err


def first_reason(err: SpecError) -> str:
    """A short, countable reason: the first issue's path with indices kept and the message up to ';'."""
    issue = err.issues[0]
    return f"{issue.path}: {issue.message.split(';')[0]}"


def sample(space: SearchSpace, n: int, seed: int = 0, *, distinct: bool = True, max_draws: int | None = None,
           progress: Callable[[int], None] | None = None) -> Sample:
    """``n`` valid points drawn at random with ``seed`` (invalid draws are redrawn and counted).

    Raises:
        SpecError: when ``max_draws`` (default ``100 * n + 100``) draws give fewer than ``n`` points.
    """
    limit = max_draws if max_draws is not None else 100 * n + 100
    points: list[Point] = []
    seen: set[str] = set()
    invalid = duplicates = 0
    reasons: dict[str, int] = {}
    for k, item in enumerate(draw(space, seed)):
        if len(points) == n:
            break
        if k >= limit:
            raise SpecError.single(space.name, f"found {len(points)} of {n} distinct valid points in {limit} draws "
                                               f"({invalid} invalid, {duplicates} repeated)")
        if isinstance(item, InvalidPoint):
            invalid += 1
            reason = first_reason(item)
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        key = item.spec.model_dump_json(exclude={"name", "description"})
        if distinct and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        points.append(item)
        if progress is not None:
            progress(len(points))
    return Sample(points, invalid, duplicates, reasons)
