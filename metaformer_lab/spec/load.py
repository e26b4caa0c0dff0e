"""Reading a spec: source (file, zoo name, mapping) -> named blocks resolved -> defaults applied ->
pydantic validation. Shape rules run later, when the spec is lowered to the typed graph."""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from metaformer_lab.core.errors import Issue, SpecError
from metaformer_lab.core.names import closest
from metaformer_lab.spec.arch import INHERITED_BLOCK_FIELDS, ArchSpec, inherit_fields, map_blocks
from metaformer_lab.spec.issues import issues_from, show
from metaformer_lab.spec.partial import PartialSpec, partial_spec
from metaformer_lab.spec.yaml_io import dump_yaml, load_yaml_file

PACKAGE_DIR = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

SpecSource = ArchSpec | Mapping[str, Any] | str | os.PathLike[str]


@functools.cache  # where the package lies does not change while it runs (one stat per decoded point before)
def data_dir(name: str) -> Path:
    """A YAML folder shipped with the package (``blocks``, ``search_spaces``): inside the installed
    package, or at the top of a source checkout."""
    packaged = PACKAGE_DIR / name
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / name


def zoo_dir() -> Path:
    return PACKAGE_DIR / "zoo"


def zoo_names() -> list[str]:
    return sorted(p.stem for p in zoo_dir().glob("*.yaml"))


def example_names() -> list[str]:
    return sorted(p.stem for p in data_dir("examples").glob("*.yaml"))


def block_names(dirs: Sequence[Path] = ()) -> list[str]:
    names = {p.stem for d in [*dirs, data_dir("blocks")] for p in d.glob("*.yaml")}
    return sorted(names)


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text or Path(text).exists()


def _read_source(source: str | os.PathLike[str]) -> tuple[Any, list[Path]]:
    """(raw data, folders to search for named blocks)."""
    text = os.fspath(source)
    if _looks_like_path(text):
        path = Path(text)
        return load_yaml_file(path), [path.parent / "blocks", path.parent]
    if _NAME.match(text) and (zoo_dir() / f"{text}.yaml").is_file():
        return load_yaml_file(zoo_dir() / f"{text}.yaml"), []
    example = data_dir("examples") / f"{text}.yaml"
    if _NAME.match(text) and example.is_file():  # a shipped example, by name (after the zoo)
        return load_yaml_file(example), [example.parent / "blocks", example.parent]
    close = closest(text, [*zoo_names(), *example_names()])
    hint = f" (did you mean '{close}'?)" if close else ""
    raise SpecError.single(text, f"no such file, and no zoo model or shipped example of that name{hint}")


def merge(base: Any, override: Any) -> Any:
    """Deep-merge ``override`` into ``base``; a mapping whose ``type`` changes is replaced whole."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    if "type" in override and override.get("type") != base.get("type"):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
    return out


class BlockResolver:
    """Replaces block names (``block: convformer``, ``{base: convformer, ...}``) by their YAML."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = [*dirs, data_dir("blocks")]
        self.issues: list[Issue] = []
        self.cache: dict[str, Any] = {}

    def named(self, name: Any, path: str, chain: tuple[str, ...]) -> Any:
        if not isinstance(name, str) or not _NAME.match(name):
            self.issues.append(Issue(path, f"expected a block name, got {show(name)}"))
            return None
        if name in chain:
            self.issues.append(Issue(path, f"block '{name}' is its own base ({' -> '.join([*chain, name])})"))
            return None
        for folder in self.dirs:
            file = folder / f"{name}.yaml"
            if file.is_file():
                return self.item(self._load(file), path, (*chain, name))
        close = difflib.get_close_matches(name, block_names(self.dirs[:-1]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.issues.append(Issue(path, f"unknown block '{name}'{hint}"))
        return None

    def _load(self, file: Path) -> Any:
        key = str(file)
        if key not in self.cache:
            try:
                self.cache[key] = load_yaml_file(file)
            except SpecError as err:
                self.issues.extend(err.issues)
                self.cache[key] = None
        return copy.deepcopy(self.cache[key])

    def item(self, item: Any, path: str, chain: tuple[str, ...] = ()) -> Any:
        if isinstance(item, str):
            return self.named(item, path, chain)
        if isinstance(item, dict) and "base" in item:
            base = self.named(item["base"], f"{path}.base", chain)
            if not isinstance(base, dict):
                if base is not None:
                    self.issues.append(Issue(f"{path}.base", "the block file must hold a mapping"))
                return None
            return merge(base, {k: v for k, v in item.items() if k != "base"})
        return item


def resolve(data: dict[str, Any], block_dirs: Sequence[Path] = ()) -> tuple[dict[str, Any], list[Issue]]:
    """Named blocks replaced by their content and ``defaults`` applied to every block, plus the
    problems found (a block that cannot be resolved is left as null)."""
    # only the stages' blocks are replaced: copy the containers that hold them, share the rest (resolving copies
    # what it fills in, and validation builds new containers)
    data = dict(data)
    stages = data.get("stages")
    if isinstance(stages, list):
        stages = data["stages"] = [dict(stage) if isinstance(stage, dict) else stage for stage in stages]
    resolver = BlockResolver(block_dirs)
    raw_defaults = data.get("defaults")
    defaults: dict[str, Any] = raw_defaults if isinstance(raw_defaults, dict) else {}
    inherited = {k: defaults[k] for k in INHERITED_BLOCK_FIELDS if k in defaults}

    def resolved(item: Any, path: str) -> Any:
        return inherit_fields(resolver.item(item, path), inherited)

    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and "block" in stage:
            stage["block"] = map_blocks(stage["block"], f"stages[{i}].block", resolved)
    return data, resolver.issues


def validate(data: Any, origin: str = "") -> ArchSpec:
    """pydantic validation of resolved data; raises SpecError with every problem."""
    if not isinstance(data, dict):
        raise SpecError.single(origin, f"the top level must be a mapping, got {show(data)}")
    try:
        return ArchSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(issues_from(err, data, ArchSpec)) from None


def with_input_size(spec: ArchSpec, size: int | tuple[int, int] | list[int] | None) -> ArchSpec:
    """``spec`` with another input size (an int: square; None: unchanged)."""
    if size is None:
        return spec
    value = size if isinstance(size, int) else [int(size[0]), int(size[1])]
    return spec.model_copy(update={"input": spec.input.model_copy(update={"size": value})})


def _resolved_source(source: SpecSource, block_dirs: Sequence[str | os.PathLike[str]]) -> tuple[Any, list[Issue]]:
    """(resolved data, problems resolving named blocks) of a source that is not an ArchSpec."""
    dirs = [Path(d) for d in block_dirs]
    if isinstance(source, Mapping):
        data, origin = dict(source), "<spec>"  # resolve() changes nothing it was given
    else:
        data, found = _read_source(source)
        dirs, origin = [*dirs, *found], os.fspath(source)
    if not isinstance(data, dict):
        raise SpecError.single(origin, f"the top level must be a mapping, got {show(data)}")
    return resolve(data, dirs)


def _schema_issues(err: ValidationError, data: Any, issues: list[Issue]) -> list[Issue]:
    """pydantic's problems after the resolver's: a block that could not be resolved is already reported, and
    pydantic would add "expected a mapping" there."""
    failed = tuple(i.path.removesuffix(".base") for i in issues)
    return [*issues, *(i for i in issues_from(err, data, ArchSpec) if not (failed and i.path.startswith(failed)))]


def read_spec(source: SpecSource, *, block_dirs: Sequence[str | os.PathLike[str]] = ()) -> ArchSpec:
    """A schema-valid ArchSpec from a file path, zoo name, mapping or ArchSpec; raises SpecError."""
    if isinstance(source, ArchSpec):
        return source
    data, issues = _resolved_source(source, block_dirs)
    try:
        spec = ArchSpec.model_validate(data)
    except ValidationError as err:
        issues = _schema_issues(err, data, issues)
    if issues:
        raise SpecError(issues)
    return spec


def read_spec_partial(source: SpecSource, *, block_dirs: Sequence[str | os.PathLike[str]] = (),
                      ) -> tuple[ArchSpec | PartialSpec | None, list[Issue]]:
    """Like :func:`read_spec`, without raising for schema problems: (the spec, []) when it is valid, else
    (the spec patched so its shape rules can check the rest, or None where that is not safe; the schema
    problems). See :mod:`metaformer_lab.spec.partial`. Unreadable input still raises SpecError."""
    if isinstance(source, ArchSpec):
        return source, []
    data, issues = _resolved_source(source, block_dirs)
    try:
        spec = ArchSpec.model_validate(data)
    except ValidationError as err:
        return (None if issues else partial_spec(data, err)), _schema_issues(err, data, issues)
    return (None, issues) if issues else (spec, [])


# ---------------------------------------------------------------------------------------------
# dumping


def _compact(model: BaseModel, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Fields that differ from their defaults, plus ``type`` tags (first, as people write them) and ``keep``."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if name != "type" and name not in keep and not field.is_required():
            data = dict(model) if field.default_factory_takes_validated_data else None
            if value == field.get_default(call_default_factory=True, validated_data=data):
                continue
        out[name] = _plain(value)
    return {"type": out.pop("type"), **out} if "type" in out else out


def _plain(value: Any) -> Any:
    from metaformer_lab.spec.arch import BlockSpec, FirstThenCycleSpec, StageSpec, StepSpec

    if isinstance(value, StageSpec):
        return {**_compact(value), "block": _plain(value.block)}
    if isinstance(value, FirstThenCycleSpec):
        return {"first": _plain(value.first), "cycle": _plain(value.cycle)}
    if isinstance(value, list) and value and all(isinstance(b, BlockSpec) for b in value):
        blocks = [_plain(b) for b in value]  # a list of one block is written as the block
        return blocks[0] if len(blocks) == 1 else blocks
    if isinstance(value, BlockSpec):
        out = _compact(value, INHERITED_BLOCK_FIELDS)
        if value.steps is not None:  # the mixers come from the steps (``token_mixer: null`` goes without saying)
            out = {k: v for k, v in out.items() if k not in ("token_mixer", "channel_mixer") or v is not None}
            out["steps"] = {name: _step(step, value) for name, step in value.steps.items()}
        return out
    if isinstance(value, StepSpec):  # inherited fields written out: reading back must not inherit them anew
        return _compact(value, INHERITED_BLOCK_FIELDS)
    if isinstance(value, BaseModel):
        return _compact(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):  # a block's steps
        return {k: _plain(v) for k, v in value.items()}
    return value


def _step(step: BaseModel, block: BaseModel) -> dict[str, Any]:
    """A step without the fields it inherits from ``block`` unchanged (reading back fills them again)."""
    return {k: v for k, v in _compact(step, INHERITED_BLOCK_FIELDS).items()
            if k not in INHERITED_BLOCK_FIELDS or getattr(step, k) != getattr(block, k)}


def compact(value: Any) -> Any:
    """A spec part (any config model, or a list of them) as the YAML a person would write: fields at their
    defaults left out, ``type`` first."""
    return _plain(value)


def spec_to_dict(spec: ArchSpec) -> dict[str, Any]:
    """A plain mapping that reads back to ``spec`` (blocks inlined, defaults left out)."""
    return _plain(spec)


def dump_spec(spec: ArchSpec) -> str:
    """YAML text such that ``read_spec(parse_yaml(dump_spec(s))) == s``."""
    return dump_yaml(spec_to_dict(spec))
