"""Each union in metaformer_lab.spec is written out in full; it must equal its registry."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.norms import NormSpec
from metaformer_lab.spec import arch

UNIONS = {
    "token_mixer": arch.TokenMixerSpec,
    "channel_mixer": arch.ChannelMixerSpec,
    "norm": NormSpec,
    "stem": arch.StemSpec,
    "downsample": arch.DownsampleSpec,
    "head": arch.HeadSpec,
    "pos_embed": arch.PosEmbedSpec,
}


def _members(annotation: Any) -> set[type]:
    union = typing.get_args(annotation)[0]
    return set(typing.get_args(union))


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_union_equals_registry(role: str) -> None:
    assert _members(UNIONS[role]) == set(REGISTRIES[role].specs())


def test_every_registry_has_a_union() -> None:
    assert set(UNIONS) == set(REGISTRIES)


def test_tags_are_unique_within_a_role() -> None:
    for registry in REGISTRIES.values():
        assert len(registry.tags()) == len(set(registry.tags()))
