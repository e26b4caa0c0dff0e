"""Declarative state_dict key maps: timm key -> our key by an ordered list of regex substitutions.

Every rule is applied in order (``re.sub``); a rule whose replacement is null drops the key. Tensors
are reshaped where the shapes differ but the sizes agree (a 1x1 conv and a Linear, a (1, 1, C)
affine and a (C,) one). The reverse direction (ours -> timm) is the same table read backwards, built
from the reference model's own keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metaformer_lab.core.errors import Issue, MetaformerLabError


class CheckpointError(MetaformerLabError):
    """A state_dict does not fit the model it is loaded into; issues are ``key: problem``."""


@dataclass(frozen=True)
class KeyMap:
    rules: tuple[tuple[re.Pattern[str], str | None], ...]

    @classmethod
    def of(cls, rules: Sequence[Sequence[str | None]]) -> KeyMap:
        return cls(tuple((re.compile(str(pattern)), replacement) for pattern, replacement in rules))

    def __call__(self, key: str) -> str | None:
        for pattern, replacement in self.rules:
            if pattern.search(key):
                if replacement is None:
                    return None
                key = pattern.sub(replacement, key)
        return key


def _fit(key: str, value: Tensor, shape: torch.Size, issues: list[Issue]) -> Tensor | None:
    if value.shape == shape:
        return value
    if value.numel() == shape.numel():
        return value.reshape(shape)
    issues.append(Issue(key, f"shape {tuple(value.shape)} does not fit {tuple(shape)}"))
    return None


def convert(keymap: KeyMap, source: Mapping[str, Tensor], target: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """``source`` renamed by ``keymap`` and reshaped to ``target``'s shapes; every key of ``target`` must
    be filled exactly once, else CheckpointError lists each unmapped, missing or clashing key."""
    out: dict[str, Tensor] = {}
    issues: list[Issue] = []
    for key, value in source.items():
        new = keymap(key)
        if new is None:
            continue
        if new not in target:
            issues.append(Issue(key, f"maps to '{new}', which the model does not have"))
        elif new in out:
            issues.append(Issue(key, f"maps to '{new}', which another key already filled"))
        elif (fitted := _fit(key, value, target[new], issues)) is not None:
            out[new] = fitted
    issues += [Issue(k, "missing from the checkpoint") for k in target if k not in out]
    if issues:
        raise CheckpointError(issues)
    return out


def invert(keymap: KeyMap, reference_keys: Sequence[str]) -> dict[str, str]:
    """Our key -> the reference (timm) key, from the reference model's own key list."""
    table: dict[str, str] = {}
    for key in reference_keys:
        ours = keymap(key)
        if ours is not None:
            table[ours] = key
    return table
