"""The registries in metaformer_lab.ops are the one list of ops: the spec's unions are derived from them,
and an op defined in an op file but left out of every registry fails here."""

from __future__ import annotations

import importlib
import pkgutil
import typing
from pathlib import Path
from typing import Any

import pytest

import metaformer_lab.ops as ops_package
from metaformer_lab.core.registry import CompositeDef, OpDef
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
    return set(typing.get_args(union)) or {union}


def _defined_ops() -> dict[str, list[Any]]:
    """Every OpDef / CompositeDef an op file defines at module level (alone or in a tuple), by module."""
    found: dict[str, list[Any]] = {}
    for info in pkgutil.iter_modules(ops_package.__path__):
        module = importlib.import_module(f"{ops_package.__name__}.{info.name}")
        for value in vars(module).values():
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if isinstance(item, OpDef | CompositeDef) and item not in found.setdefault(info.name, []):
                    found[info.name].append(item)
    return found


@pytest.mark.parametrize("role", sorted(REGISTRIES))
def test_union_equals_registry(role: str) -> None:
    assert _members(UNIONS[role]) == set(REGISTRIES[role].specs())


def test_every_registry_has_a_union() -> None:
    assert set(UNIONS) == set(REGISTRIES)


def test_every_op_an_op_file_defines_is_registered() -> None:
    registered = [d for registry in REGISTRIES.values() for d in registry]
    missing = [f"{module}: {d.tag}" for module, defs in _defined_ops().items() for d in defs
               if not any(d is r for r in registered)]
    assert not missing, f"defined but in no registry (add one line to metaformer_lab/ops/__init__.py): {missing}"
    assert sum(len(defs) for defs in _defined_ops().values()) >= len({id(d) for d in registered})


def test_every_op_describes_itself_and_has_examples() -> None:
    for role, registry in REGISTRIES.items():
        for d in registry:
            assert d.description, f"{role} '{d.tag}': its config class needs a docstring"
            assert d.cases, f"{role} '{d.tag}': needs example cases"


def test_tags_are_unique_within_a_role() -> None:
    for registry in REGISTRIES.values():
        assert len(registry.tags()) == len(set(registry.tags()))


def test_the_readme_op_table_is_the_registry() -> None:
    """README's op table is generated (``metaformer-lab ops --markdown``); hand edits or a new op fail here."""
    from metaformer_lab.spec.library import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    begin = readme.index("<!-- ops:begin")
    body = readme[readme.index("\n", begin) + 1: readme.index("<!-- ops:end -->")]
    assert body == markdown_table(), "regenerate README's op table with `metaformer-lab ops --markdown`"
    assert all(f"`{tag}`" in body for registry in REGISTRIES.values() for tag in registry.tags())
