"""Space files: the YAML format, its pydantic schema, and parsing into a :class:`~.tree.Template`.

A space file reads like a spec in which any value may be a choice::

    {choice: [16, 24, 32]}                      categorical; scalars label themselves
    {choice: [{type: pooling}, {type: dwconv}]} options labelled by their type (or named block, or base)
    {choice: {small: {...}, large: {...}}}      options with explicit labels
    {int: [1, 4], step: 1, log: false}          integers, both ends included
    {float: [1.0e-6, 1.0e-4], log: true}        numbers (continuous unless ``step`` is given)

Every choice node may carry ``name:``; two nodes with one name are one parameter. A mapping may hold a
``variant:`` choice whose chosen option (a mapping) is merged into it. Around the spec fields a space
adds ``num_stages``, ``ties`` and ``references``. Problems are gathered and raised together as
:class:`~metaformer_lab.core.errors.SpaceError` with the path in the space file.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaformer_lab.core.errors import Issue, SpaceError, SpecError
from metaformer_lab.space.tree import VARIANT, Choice, Label, Template, join, show_label
from metaformer_lab.spec.arch import is_first_then_cycle
from metaformer_lab.spec.issues import issues_from, show
from metaformer_lab.spec.load import BlockResolver, data_dir
from metaformer_lab.spec.yaml_io import load_yaml_file

CHOICE_KEYS = ("choice", "int", "float")
_EXTRA_KEYS = {"choice": ("name",), "int": ("name", "step", "log"), "float": ("name", "step", "log")}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-\[\]]*$")
MAX_STAGES = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TieSpec(_Model):
    """A relation between stages: ``share`` makes the choice at a stage-relative parameter path one
    parameter in every listed stage (``share: block.token_mixer``); ``non_decreasing`` requires a
    stage field not to decrease from stage to stage (``non_decreasing: dim``)."""

    share: str | None = Field(None, description="stage-relative parameter name, e.g. block.token_mixer")
    non_decreasing: str | None = Field(None, description="stage field, e.g. dim")
    stages: Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2)] = "all"


class SpaceFile(_Model):
    """The top level of a space file. The spec parts (``input`` ... ``head``) are templates: spec YAML in
    which values may be choices; they are checked option by option against the spec schema."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    input: Any = None
    num_classes: Any = None
    defaults: Any = None
    stem: Any
    num_stages: Any = Field(None, description="an integer or a choice; default: every stage template")
    stages: Annotated[list[Any], Field(min_length=1, max_length=MAX_STAGES)]
    head: Any = None
    ties: list[TieSpec] = Field(default_factory=list)
    references: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                   description="named points: parameter -> value")


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, checked space: its template, ties, references and where it came from."""

    name: str
    description: str
    template: Template
    ties: tuple[TieSpec, ...] = ()
    references: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: Path | None = None
    block_dirs: tuple[Path, ...] = ()

    @property
    def max_stages(self) -> int:
        return len(self.template.stages)


# ---------------------------------------------------------------------------------------------
# parsing


def _label_of(option: Any) -> tuple[bool, Label]:
    """(derivable, label) of an option in the list form."""
    if option is None or isinstance(option, (bool, int, float, str)):
        return True, option
    if isinstance(option, dict):
        for key in ("type", "base"):
            if isinstance(option.get(key), str):
                return True, option[key]
    return False, None


def _same_label(a: Label, b: Label) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


class _Parser:
    """Raw YAML -> template with :class:`Choice` nodes; every problem becomes an issue."""

    def __init__(self, block_dirs: Sequence[Path]) -> None:
        self.issues: list[Issue] = []
        self.blocks = BlockResolver(list(block_dirs))

    def issue(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message))

    def parse(self, node: Any, path: str, name: str, stage: bool = False) -> Any:
        """``path``: where the node is in the file; ``name``: the parameter-name prefix; ``stage``: the node is
        a stage template (or a variant option merged into one), whose ``block`` names blocks."""
        if isinstance(node, dict):
            kinds = [k for k in CHOICE_KEYS if k in node]
            if kinds:
                return self.choice(node, path, name, kinds, stage)
            return self.mapping(node, path, name, stage)
        if isinstance(node, list):
            return [self.parse(v, join(path, i), join(name, i)) for i, v in enumerate(node)]
        return node

    def mapping(self, node: dict[Any, Any], path: str, name: str, stage: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(key, str):
                self.issue(path, f"keys must be strings, got {show(key)}")
                continue
            where, prefix = join(path, key), join(name, key)
            if key == VARIANT:
                out[key] = self.variant(value, where, prefix, stage)
            elif key == "block" and stage:
                out[key] = self.blocks_of(self.parse(value, where, prefix), where)
            else:
                out[key] = self.parse(value, where, prefix)
        variant = out.get(VARIANT)
        if isinstance(variant, Choice):
            for label, option, opath in zip(variant.labels, variant.options, variant.option_paths, strict=True):
                for key in set(option) & (set(out) - {VARIANT}):
                    self.issue(f"{opath}.{key}", f"variant '{show_label(label)}' sets '{key}', which the mapping "
                                                 "around it sets already")
        return out

    def variant(self, node: Any, path: str, name: str, stage: bool) -> Choice | None:
        if not (isinstance(node, dict) and "choice" in node):
            self.issue(path, "expected a choice of mappings, {choice: {label: {...}, ...}}")
            return None
        choice = self.choice(node, path, name, ["choice"], stage)
        if not isinstance(choice, Choice):
            return None
        for option, opath in zip(choice.options, choice.option_paths, strict=True):
            if not isinstance(option, dict):
                self.issue(opath, f"a variant's option must be a mapping of fields, got {show(option)}")
        ok = all(isinstance(o, dict) for o in choice.options)
        return replace(choice, merge=True) if ok else None

    def choice(self, node: dict[Any, Any], path: str, name: str, kinds: list[str], stage: bool) -> Any:
        if len(kinds) > 1:
            self.issue(path, f"a choice has one of {', '.join(CHOICE_KEYS)}, not {' and '.join(kinds)}")
            return None
        kind = kinds[0]
        allowed = (kind, *_EXTRA_KEYS[kind])
        for key in node:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(allowed)}"
                self.issue(join(path, str(key)), f"unknown field{hint}")
        explicit = node.get("name")
        if explicit is not None and not (isinstance(explicit, str) and _NAME.match(explicit)):
            self.issue(join(path, "name"), f"{show(explicit)} is not a parameter name (letters, digits, _ . - [ ])")
            explicit = None
        pname = explicit or name
        if kind == "choice":
            return self.categorical(node["choice"], join(path, "choice"), path, pname, stage)
        return self.numeric(node, path, pname, "int" if kind == "int" else "float")

    def categorical(self, options: Any, where: str, path: str, name: str, stage: bool) -> Choice | None:
        if isinstance(options, dict):
            labelled = [(k, v, join(where, str(k))) for k, v in options.items()]
            bad = [k for k, _, _ in labelled if not isinstance(k, str)]
            for k in bad:
                self.issue(where, f"option labels must be strings, got {show(k)}")
        elif isinstance(options, list):
            labelled = []
            for i, option in enumerate(options):
                ok, label = _label_of(option)
                if not ok:
                    self.issue(f"{where}[{i}]", "this option needs a label: write the choice as a mapping "
                                                "{label: option, ...}")
                labelled.append((label, option, f"{where}[{i}]"))
        else:
            self.issue(where, f"expected a list of options or a mapping of labelled options, got {show(options)}")
            return None
        if not labelled:
            self.issue(where, "needs at least one option")
            return None
        for i, (label, _, opath) in enumerate(labelled):
            if any(_same_label(label, other) for other, _, _ in labelled[:i]):
                self.issue(opath, f"label '{show_label(label)}' is used twice; write the choice as a mapping "
                                  "{label: option, ...}")
        parsed = [self.parse(opt, opath, f"{name}[{show_label(label)}]", stage) for label, opt, opath in labelled]
        return Choice(name=name, path=path, kind="categorical", labels=tuple(lb for lb, _, _ in labelled),
                      options=tuple(parsed), option_paths=tuple(p for _, _, p in labelled))

    def numeric(self, node: dict[Any, Any], path: str, name: str, kind: Literal["int", "float"]) -> Choice | None:
        bounds, step, log = node[kind], node.get("step"), node.get("log", False)
        number = (int,) if kind == "int" else (int, float)
        where = join(path, kind)
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
            what = "integers" if kind == "int" else "numbers"
            self.issue(where, f"expected [low, high], two {what}, got {show(bounds)}")
            return None
        low, high = bounds
        problems = len(self.issues)
        if low > high:
            self.issue(where, f"the range is reversed: low {show(low)} > high {show(high)}")
        if not isinstance(log, bool):
            self.issue(join(path, "log"), f"expected true or false, got {show(log)}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
            what = "integer" if kind == "int" else "number"
            self.issue(join(path, "step"), f"{show(step)} must be a positive {what}")
        if log is True and low <= 0:
            self.issue(where, f"a log range needs low > 0, got {show(low)}")
        if log is True and step not in (None, 1):
            self.issue(join(path, "step"), "a log range takes no step")
        if len(self.issues) > problems:
            return None
        if kind == "int":
            step = step or 1
        return Choice(name=name, path=path, kind=kind, low=low, high=high, step=step, log=bool(log))

    # --- named blocks -------------------------------------------------------------------------

    def blocks_of(self, node: Any, path: str) -> Any:
        """Named blocks (``poolformer``, ``{base: caformer, ...}``) replaced by their content; choices stay."""
        if isinstance(node, Choice):
            return replace(node, options=tuple(self.blocks_of(o, p) for o, p in zip(node.options, node.option_paths,
                                                                                     strict=True)))
        if isinstance(node, list):
            return [self.blocks_of(item, join(path, i)) for i, item in enumerate(node)]
        if is_first_then_cycle(node):
            return {k: self.blocks_of(v, join(path, k)) if k in ("first", "cycle") else v for k, v in node.items()}
        if isinstance(node, str):
            return self.named(node, path)
        if isinstance(node, dict) and "base" in node:
            base = self.named(node["base"], join(path, "base"))
            if not isinstance(base, dict):
                return None
            return _merge_template(base, {k: v for k, v in node.items() if k != "base"})
        return node

    def named(self, name: Any, path: str) -> Any:
        before = len(self.blocks.issues)
        content = self.blocks.named(name, path, ())
        self.issues.extend(self.blocks.issues[before:])
        return content


def _merge_template(base: Any, override: Any) -> Any:
    """:func:`~metaformer_lab.spec.load.merge` for templates: a choice in ``override`` replaces the value."""
    if isinstance(override, Choice) or not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "type" in override and override.get("type") != base.get("type"):
        return override
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge_template(base[key], value) if key in base else value
    return out


# ---------------------------------------------------------------------------------------------
# reading a file


def spaces_dir() -> Path:
    return data_dir("search_spaces")


def space_names() -> list[str]:
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text or Path(text).exists()


def read_raw(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Any, Path | None]:
    """(raw data, file) of a space given by path, shipped name or mapping; raises SpaceError."""
    if isinstance(source, Mapping):
        return dict(source), None
    text = os.fspath(source)
    if not _looks_like_path(text):
        shipped = spaces_dir() / f"{text}.yaml"
        if shipped.is_file():
            return _load(shipped), shipped
        close = difflib.get_close_matches(text, space_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; shipped spaces: {', '.join(space_names())}"
        raise SpaceError.single(text, f"no such file, and no shipped space of that name{hint}")
    return _load(Path(text)), Path(text)


def _load(path: Path) -> Any:
    try:
        return load_yaml_file(path)
    except SpecError as err:
        raise SpaceError(err.issues) from None


def parse_space(data: Any, source: Path | None) -> tuple[SearchSpace, list[Issue]]:
    """Schema check and template parsing; returns the space and the problems found so far."""
    origin = str(source) if source else "<space>"
    if not isinstance(data, dict):
        raise SpaceError.single(origin, f"the top level must be a mapping, got {show(data)}")
    try:
        top = SpaceFile.model_validate(data)
    except ValidationError as err:
        raise SpaceError(issues_from(err, data, SpaceFile)) from None
    dirs = [source.parent / "blocks", source.parent] if source else []
    parser = _Parser(dirs)
    parts = {key: parser.parse(getattr(top, key), key, key)
             for key in ("input", "num_classes", "defaults", "stem", "head") if getattr(top, key) is not None}
    stages = tuple(parser.parse(s, f"stages[{i}]", f"stages[{i}]", stage=True) for i, s in enumerate(top.stages))
    num_stages = _num_stages(parser, top.num_stages, len(stages))
    space = SearchSpace(name=top.name, description=top.description,
                        template=Template(parts=parts, stages=stages, num_stages=num_stages),
                        ties=tuple(top.ties), references=top.references, source=source, block_dirs=tuple(dirs))
    return space, parser.issues


def _num_stages(parser: _Parser, node: Any, count: int) -> Choice | int:
    if node is None:
        return count
    parsed = parser.parse(node, "num_stages", "num_stages")
    values = parsed.values() if isinstance(parsed, Choice) else [parsed]
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values or []):
        parser.issue("num_stages", "expected an integer, or a choice of integers")
        return count
    for v in values:
        if not 1 <= v <= count:
            parser.issue("num_stages", f"{v} is outside 1..{count} (the space has {count} stage template(s))")
    return parsed if isinstance(parsed, Choice) else int(parsed)
