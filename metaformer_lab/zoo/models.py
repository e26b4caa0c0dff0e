"""The zoo's catalog: families (``zoo/families/*.yaml``), their models, key maps and references."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from metaformer_lab.core.errors import Issue, SpecError
from metaformer_lab.spec.issues import issues_from
from metaformer_lab.spec.load import zoo_dir
from metaformer_lab.spec.yaml_io import load_yaml_file
from metaformer_lab.zoo.keymap import KeyMap
from metaformer_lab.zoo.references import REFERENCES


class ModelEntry(BaseModel):
    """One zoo model's link to timm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timm: str | None = Field(None, description="timm model name; default: the zoo name")
    reference: str | None = Field(None, description="a builder in zoo/references.py, for models timm does not register")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    tolerance: float = Field(1e-5, gt=0.0, description="max |logit difference| of the fixed-point check")
    key_map: list[tuple[str, str | None]] = Field(
        default_factory=list, description="extra rules applied after the family's, for this model only")


class FamilyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    description: str = ""
    models: dict[str, ModelEntry]
    key_map: list[tuple[str, str | None]] = Field(description="timm key -> our key, applied in order")


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
        return self.entry.reference is None

    def reference(self, **kwargs: Any) -> nn.Module:
        """timm's module for this model (random weights; never downloads)."""
        args = {**self.entry.kwargs, **kwargs}
        if self.entry.reference is not None:
            return REFERENCES[self.entry.reference](**args)
        return timm.create_model(self.timm_name, pretrained=False, **args)

    def reference_keys(self, **kwargs: Any) -> dict[str, torch.Size]:
        """The reference's state_dict keys and shapes, built on the meta device (no memory, no init)."""
        with torch.device("meta"):
            module = self.reference(**kwargs)
        return {k: v.shape for k, v in module.state_dict().items()}


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


def list_models(family: str | None = None) -> list[str]:
    """Zoo model names, sorted (optionally of one family)."""
    return sorted(n for n, m in catalog().items() if family is None or m.family == family)
