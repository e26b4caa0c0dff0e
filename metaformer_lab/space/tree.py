"""The parsed form of a search space: a spec-shaped template whose positions may hold :class:`Choice` nodes,
and the engine that expands it into concrete spec data.

A template is plain YAML data (mappings, lists, scalars) in which some values are :class:`Choice` objects.
Expanding it walks the template in spec order and asks a :class:`Chooser` for the value of every choice
it meets; only the choices inside the options actually taken are asked (the conditional structure a
define-by-run sampler sees). Expansion is a generator, written for three callers:

- decoding an Optuna trial (one value per choice, :mod:`.decode`);
- covering every option once when a space file is validated (:mod:`.load`);
- finding the assignment that gives a known spec, with backtracking (:mod:`.contains`).

Only containment backtracks. The other two take :func:`expand_once`, the first value of each choice in one
plain pass (the generator's first result; a test holds the two together): a space is drawn from thousands of
times (``space size``, a search), and generators cost more than the rest of a draw's expansion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol

Label = str | int | float | bool | None
"""A categorical option as the sampler sees it (Optuna's categorical choices are such primitives)."""

Kind = Literal["categorical", "int", "float"]

VARIANT = "variant"
"""Key of a choice whose chosen option (a mapping) is merged into the mapping that holds it, so one decision
can set several fields at once (a stage's layout together with its block)."""

ROOT_ORDER = ("input", "num_classes", "defaults", "stem", "stages", "head")
"""Spec fields in the order they are decided (a stage's choices come after the network-wide ones)."""


@dataclass(frozen=True, eq=False)
class Choice:
    """One decision of the space.

    Attributes:
        name: the parameter name the sampler sees (Optuna's ``trial.params`` key); two choices with the
            same name are one parameter (a tie).
        path: where the node is written in the space file (``stages[0].block.token_mixer``).
        kind: categorical, int or float.
        labels: categorical option labels (the values passed to ``suggest_categorical``).
        options: categorical option templates, one per label.
        option_paths: the space-file path of each option (``....choice.attention``).
        low, high, step, log: the range of an int or float choice (inclusive).
        merge: a ``variant``: the chosen option's keys join the enclosing mapping.
    """

    name: str
    path: str
    kind: Kind
    labels: tuple[Label, ...] = ()
    options: tuple[Any, ...] = ()
    option_paths: tuple[str, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    merge: bool = False

    def option(self, label: Label) -> Any:
        return self.options[self._index(label)]

    def option_path(self, label: Label) -> str:
        return self.option_paths[self._index(label)] if self.kind == "categorical" else self.path

    def _index(self, label: Label) -> int:
        """The position of ``label`` among the labels (``True`` and ``1`` are different labels, ``1`` and ``1.0``
        the same); raises KeyError, for a value no label can be (a list, a mapping) too."""
        try:
            return self._positions[(isinstance(label, bool), label)]
        except TypeError:  # unhashable: not a label
            raise KeyError(label) from None

    @cached_property
    def _positions(self) -> dict[tuple[bool, Label], int]:
        positions: dict[tuple[bool, Label], int] = {}
        for i, own in enumerate(self.labels):
            positions.setdefault((isinstance(own, bool), own), i)
        return positions

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of this choice's values."""
        if self.kind == "categorical":
            try:
                self._index(value)
            except KeyError:
                return False
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is not None and not self.log:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def values(self) -> list[Any] | None:
        """Every value of a finite choice, in order; None for a continuous range."""
        if self.kind == "categorical":
            return list(self.labels)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = int(round((self.high - self.low) / self.step))
        return [self.low + k * self.step for k in range(n + 1)]

    def same_distribution(self, other: Choice) -> bool:
        return (self.kind, self.labels, self.low, self.high, self.step, self.log) == \
            (other.kind, other.labels, other.low, other.high, other.step, other.log)

    def describe(self) -> str:
        """The values in words: ``one of 16, 24, 32`` or ``an integer in [1, 4]``."""
        if self.kind == "categorical":
            return "one of " + ", ".join(show_label(lb) for lb in self.labels)
        what = "an integer" if self.kind == "int" else "a number"
        extra = f" step {self.step:g}" if self.step not in (None, 1) else ""
        return f"{what} in [{self.low:g}, {self.high:g}]{extra}{' (log)' if self.log else ''}"


def show_label(label: Label) -> str:
    if label is None:
        return "null"
    if isinstance(label, bool):
        return "true" if label else "false"
    return f"{label:g}" if isinstance(label, float) else str(label)


def join(loc: str, key: str | int) -> str:
    """``loc`` extended by a mapping key or a list index, as spec paths are written."""
    if isinstance(key, int):
        return f"{loc}[{key}]"
    return f"{loc}.{key}" if loc else key


@dataclass(frozen=True)
class Decision:
    """A choice taken during one expansion: its parameter, value, concrete spec location and the space-file
    path of what it put there."""

    name: str
    value: Any
    loc: str
    source: str


@dataclass(frozen=True)
class State:
    """What an expansion has decided so far (immutable, so backtracking is free)."""

    params: Mapping[str, Any] = field(default_factory=dict)
    decisions: tuple[Decision, ...] = ()
    origins: tuple[tuple[str, str], ...] = ()  # (spec location, space-file path of what was put there)

    # (the constructor, not dataclasses.replace: a space's every choice makes a State, and replace is slow)
    def bind(self, name: str, value: Any, loc: str, source: str) -> State:
        return State({**self.params, name: value}, (*self.decisions, Decision(name, value, loc, source)),
                     (*self.origins, (loc, source)))

    def note(self, name: str, value: Any, loc: str, source: str) -> State:
        """Record where an already bound (tied) parameter was used again."""
        return State(self.params, (*self.decisions, Decision(name, value, loc, source)), (*self.origins, (loc, source)))

    def came_from(self, pairs: Sequence[tuple[str, str]]) -> State:
        return State(self.params, self.decisions, (*self.origins, *pairs))


class Chooser(Protocol):
    """Supplies the values of the choices an expansion meets."""

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        """Values to try for ``choice`` (first that works wins); one for a sampler."""

    def accept(self, loc: str, value: Any, state: State) -> bool:
        """Whether the expanded ``value`` at spec location ``loc`` may stand (False backtracks)."""


@dataclass(frozen=True)
class Template:
    """A whole space as a template: the spec parts, the stage templates and the number of stages."""

    parts: Mapping[str, Any]  # input, num_classes, defaults, stem, head (each possibly a Choice)
    stages: tuple[Any, ...]
    num_stages: Choice | int


def expand_root(template: Template, chooser: Chooser, state: State | None = None) -> Iterator[tuple[dict[str, Any],
                                                                                                    State]]:
    """Every spec mapping the chooser allows (a sampler: exactly one), with what was decided."""

    def rest(i: int, acc: dict[str, Any], st: State) -> Iterator[tuple[dict[str, Any], State]]:
        if i == len(ROOT_ORDER):
            yield acc, st
            return
        key = ROOT_ORDER[i]
        if key == "stages":
            for n, st2 in _count(template.num_stages, st, chooser):
                for stages, st3 in expand_list(list(template.stages[:n]), "stages", st2, chooser):
                    yield from rest(i + 1, {**acc, "stages": stages}, st3)
        elif key in template.parts:
            for value, st2 in expand(template.parts[key], key, st, chooser):
                yield from rest(i + 1, {**acc, key: value}, st2)
        else:
            yield from rest(i + 1, acc, st)

    yield from rest(0, {}, state or State())


def expand_once(template: Template, chooser: Chooser) -> tuple[dict[str, Any], State]:
    """``next(expand_root(template, chooser))`` for a chooser that gives at least one value for every choice and
    accepts everything (a sampler, a fixed assignment): the first value of each choice is taken, so there is
    nothing to backtrack, and one plain pass (no generators) gives the same spec mapping and state."""
    acc: dict[str, Any] = {}
    st = State()
    for key in ROOT_ORDER:
        if key == "stages":
            num = template.num_stages
            if isinstance(num, Choice):
                chosen, st = _once(num, "num_stages", st, chooser)
                num = int(chosen)
            acc["stages"], st = _once(list(template.stages[:num]), "stages", st, chooser)
        elif key in template.parts:
            acc[key], st = _once(template.parts[key], key, st, chooser)
    return acc, st


def _once(node: Any, loc: str, st: State, chooser: Chooser) -> tuple[Any, State]:
    """What ``node`` expands to with the first value of each choice (see :func:`expand_once`)."""
    if isinstance(node, Choice):
        bound = node.name in st.params
        value = st.params[node.name] if bound else chooser.values(node, loc, st)[0]
        source = node.option_path(value)
        st = st.note(node.name, value, loc, source) if bound else st.bind(node.name, value, loc, source)
        if node.kind != "categorical":
            return value, st
        option = node.option(value)
        if node.merge:
            return _once(option, loc, st.came_from([(join(loc, key), f"{source}.{key}") for key in option]), chooser)
        return _once(option, loc, st, chooser)
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(value, _NESTED):  # most values: taken as they are
                out[key] = value
            elif key == VARIANT and isinstance(value, Choice) and value.merge:
                merged, st = _once(value, loc, st, chooser)
                out.update(merged)
            else:
                out[key], st = _once(value, join(loc, key), st, chooser)
        return out, st
    if isinstance(node, list):
        items = []
        for i, value in enumerate(node):
            item, st = _once(value, join(loc, i), st, chooser)
            items.append(item)
        return items, st
    return node, st


def _count(num: Choice | int, st: State, chooser: Chooser) -> Iterator[tuple[int, State]]:
    if isinstance(num, int):
        yield num, st
        return
    for n, st2 in expand(num, "num_stages", st, chooser):
        yield int(n), st2


def expand(node: Any, loc: str, st: State, chooser: Chooser) -> Iterator[tuple[Any, State]]:
    """The values ``node`` (at spec location ``loc``) expands to, each with the state after it."""
    if isinstance(node, Choice):
        yield from _expand_choice(node, loc, st, chooser)
        return
    if isinstance(node, dict):
        gen: Iterator[tuple[Any, State]] = expand_mapping(node, loc, st, chooser)
    elif isinstance(node, list):
        gen = expand_list(node, loc, st, chooser)
    else:
        gen = iter([(node, st)])
    for value, st2 in gen:
        if chooser.accept(loc, value, st2):
            yield value, st2


def _expand_choice(choice: Choice, loc: str, st: State, chooser: Chooser) -> Iterator[tuple[Any, State]]:
    bound = choice.name in st.params
    for value in [st.params[choice.name]] if bound else chooser.values(choice, loc, st):
        source = choice.option_path(value)
        st2 = st.note(choice.name, value, loc, source) if bound else st.bind(choice.name, value, loc, source)
        if choice.kind != "categorical":
            if chooser.accept(loc, value, st2):
                yield value, st2
            continue
        option = choice.option(value)
        if choice.merge:  # a variant's option is checked key by key where it lands
            st2 = st2.came_from([(join(loc, key), f"{source}.{key}") for key in option])
            yield from expand_mapping(option, loc, st2, chooser)
        else:
            yield from expand(option, loc, st2, chooser)


_NESTED = (Choice, dict, list)
"""What a template value with something inside to expand can be; any other value expands to itself."""


def _plain(node: Any) -> bool:
    return not isinstance(node, _NESTED)


def expand_mapping(node: Mapping[str, Any], loc: str, st: State, chooser: Chooser) -> Iterator[tuple[dict[str, Any],
                                                                                                     State]]:
    items = list(node.items())

    def rest(i: int, acc: dict[str, Any], st: State) -> Iterator[tuple[dict[str, Any], State]]:
        if i < len(items) and _plain(items[i][1]):  # nothing to choose: taken here, not one generator level each
            acc = dict(acc)
            while i < len(items) and _plain(items[i][1]):
                key, value = items[i]
                if not chooser.accept(join(loc, key), value, st):
                    return
                acc[key] = value
                i += 1
        if i == len(items):
            yield acc, st
            return
        key, value = items[i]
        if key == VARIANT and isinstance(value, Choice) and value.merge:
            for merged, st2 in _expand_choice(value, loc, st, chooser):
                yield from rest(i + 1, {**acc, **merged}, st2)
            return
        for out, st2 in expand(value, join(loc, key), st, chooser):
            yield from rest(i + 1, {**acc, key: out}, st2)

    yield from rest(0, {}, st)


def expand_list(node: Sequence[Any], loc: str, st: State, chooser: Chooser) -> Iterator[tuple[list[Any], State]]:
    def rest(i: int, acc: list[Any], st: State) -> Iterator[tuple[list[Any], State]]:
        if i == len(node):
            yield acc, st
            return
        for out, st2 in expand(node[i], join(loc, i), st, chooser):
            yield from rest(i + 1, [*acc, out], st2)

    yield from rest(0, [], st)


def walk(node: Any) -> Iterator[Choice]:
    """Every choice in a template, options included, in template order."""
    if isinstance(node, Choice):
        yield node
        for option in node.options:
            yield from walk(option)
    elif isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from walk(value)


def all_choices(template: Template) -> list[Choice]:
    nodes: list[Any] = [*template.parts.values(), *template.stages]
    if isinstance(template.num_stages, Choice):
        nodes.insert(0, template.num_stages)
    return [c for node in nodes for c in walk(node)]
