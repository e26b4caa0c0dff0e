"""The zoo's catalog: families (``zoo/families/*.yaml``), their models, key maps and references."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from metaformer_lab.core.errors import Issue, SpecError
from metaformer_lab.core.meta import on_meta
from metaformer_lab.spec.issues import issues_from
from metaformer_lab.spec.load import zoo_dir
from metaformer_lab.spec.yaml_io import load_yaml_file
from metaformer_lab.zoo.keymap import KeyMap
from metaformer_lab.zoo.references import REFERENCES


class Paper(BaseModel):
    """A published model timm does not have: what its zoo YAML is checked against instead of timm's module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arxiv: str = Field(pattern=r"^\d{4}\.\d{4,5}$", description="the paper's arXiv id")
    code: str = Field(description="the authors' official implementation (URL)")
    params: int = Field(gt=0, description="parameters of the authors' model, built by their code")
    gmacs: float = Field(gt=0.0, description="multiply-adds (1e9) in the paper's table, at the model's input size")
    note: str = Field("", description="where the YAML follows the code rather than the paper, and why")
    code_gmacs: float | None = Field(
        None, gt=0.0, description="multiply-adds (1e9) of the authors' model, built by their code: recorded only where "
                                  "the paper's table disagrees with that code beyond the tolerance (the note says "
                                  "where), and then checked in place of the paper's figure, which is still reported")

    @model_validator(mode="after")
    def _code_gmacs_explained(self) -> Paper:
        if self.code_gmacs is not None and not self.note:
            raise ValueError("code_gmacs needs a note: where the paper's table and the authors' code disagree")
        return self


class ModelEntry(BaseModel):
    """One zoo model's link to timm (a fixed point), or to its paper."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timm: str | None = Field(None, description="timm model name; default: the zoo name")
    reference: str | None = Field(None, description="a builder in zoo/references.py, for models timm does not register")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    tolerance: float = Field(1e-5, gt=0.0, description="max |logit difference| of the fixed-point check")
    key_map: list[tuple[str, str | None]] = Field(
        default_factory=list, description="extra rules applied after the family's, for this model only")
    paper: Paper | None = Field(None, description="a model timm does not have: checked against its paper and its "
                                                  "authors' code instead (no timm link, no reference)")

    @model_validator(mode="after")
    def _one_link(self) -> ModelEntry:
        if self.paper is not None and (self.timm or self.reference or self.kwargs or self.key_map):
            raise ValueError("a paper model has no timm link: leave out timm, reference, kwargs and key_map")
        return self


class FamilyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    description: str = ""
    models: dict[str, ModelEntry]
    key_map: list[tuple[str, str | None]] = Field(default_factory=list,
                                                  description="timm key -> our key, applied in order")


class ZooModel(BaseModel):
    """A zoo model: its name, family, timm counterpart and key map."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    family: str
    entry: ModelEntry
    key_map: KeyMap

    @property
    def timm_name(self) -> str:
        return self.entry.timm or self.name

    @property
    def in_timm_registry(self) -> bool:
        return self.entry.reference is None and self.entry.paper is None

    @property
    def fixed_point(self) -> bool:
        """Checked against timm's module (weights in and out); False: against its paper (``entry.paper``)."""
        return self.entry.paper is None

    def reference(self, **kwargs: Any) -> nn.Module:
        """timm's module for this model (random weights; never downloads)."""
        if self.entry.paper is not None:
            raise SpecError.single(self.name, f"has no timm module: it is checked against its paper "
                                              f"(arXiv {self.entry.paper.arxiv}) and its authors' code")
        args = {**self.entry.kwargs, **kwargs}
        if self.entry.reference is not None:
            return REFERENCES[self.entry.reference](**args)
        return timm.create_model(self.timm_name, pretrained=False, **args)

    def reference_keys(self, **kwargs: Any) -> dict[str, torch.Size]:
        """The reference's state_dict keys and shapes, built on the meta device (no memory, no initialisation:
        :func:`~metaformer_lab.core.meta.on_meta`) once per process for each set of hashable arguments."""
        args = tuple(sorted(kwargs.items()))
        try:
            hash(args)
        except TypeError:  # a list or dict among them: built each time
            return dict(_reference_keys.__wrapped__(self.name, args))
        return dict(_reference_keys(self.name, args))


@functools.lru_cache(maxsize=32)
def _reference_keys(name: str, kwargs: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, torch.Size], ...]:
    with on_meta():
        module = get(name).reference(**dict(kwargs))
    return tuple((k, v.shape) for k, v in module.state_dict().items())


def families_dir() -> Path:
    return zoo_dir() / "families"


@functools.cache
def catalog() -> dict[str, ZooModel]:
    """Zoo name -> ZooModel, from every family file; raises SpecError for a broken family file."""
    models: dict[str, ZooModel] = {}
    issues: list[Issue] = []
    for path in sorted(families_dir().glob("*.yaml")):
        data = load_yaml_file(path)
        try:
            family = FamilyFile.model_validate(data)
        except ValidationError as err:
            issues += [Issue(f"{path.name}:{i.path}", i.message) for i in issues_from(err, data, FamilyFile)]
            continue
        for name, entry in family.models.items():
            key_map = KeyMap.of([*family.key_map, *entry.key_map])
            if name in models:
                issues.append(Issue(f"{path.name}:models.{name}", f"already listed by family '{models[name].family}'"))
            if not (zoo_dir() / f"{name}.yaml").is_file():
                issues.append(Issue(f"{path.name}:models.{name}", "has no zoo YAML"))
            models[name] = ZooModel(name=name, family=family.family, entry=entry, key_map=key_map)
    if issues:
        raise SpecError(issues)
    return models


def get(name: str) -> ZooModel:
    """The zoo model ``name``; SpecError with a close match when there is none."""
    import difflib

    models = catalog()
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError.single(name, f"no zoo model of that name{hint}")
    return models[name]


def list_models(family: str | None = None, *, fixed_points: bool = False) -> list[str]:
    """Zoo model names, sorted (optionally of one family; with ``fixed_points``, only those checked against timm)."""
    return sorted(n for n, m in catalog().items()
                  if (family is None or m.family == family) and (m.fixed_point or not fixed_points))
