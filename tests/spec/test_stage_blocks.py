"""A stage's blocks: one block, a list cycled over the depth, or the first block(s) then a cycled list."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

import metaformer_lab as ml
from metaformer_lab.spec.yaml_io import parse_yaml

POOL: dict[str, Any] = {"token_mixer": {"type": "pooling"}}
CONV: dict[str, Any] = {"token_mixer": {"type": "dwconv", "kernel": 3}}
IDENT: dict[str, Any] = {"token_mixer": {"type": "identity"}}


def _spec(block: Any, depth: int) -> dict[str, Any]:
    return {"name": "blocks", "input": {"size": 16}, "num_classes": 4,
            "stem": {"type": "conv", "kernel": 2, "stride": 2, "padding": 0},
            "stages": [{"depth": depth, "dim": 8, "block": block}]}


@pytest.mark.parametrize(("block", "depth", "paths"), [
    (POOL, 3, ["block", "block", "block"]),
    ([POOL, CONV], 3, ["block[0]", "block[1]", "block[0]"]),
    ({"first": POOL, "cycle": [CONV, IDENT]}, 5,
     ["block.first", "block.cycle[0]", "block.cycle[1]", "block.cycle[0]", "block.cycle[1]"]),
    ({"first": [POOL, IDENT], "cycle": CONV}, 4, ["block.first[0]", "block.first[1]", "block.cycle", "block.cycle"]),
    ({"first": [POOL, IDENT, CONV], "cycle": CONV}, 2, ["block.first[0]", "block.first[1]"]),
], ids=["one", "list", "first-then-cycle", "first-list", "first-longer-than-depth"])
def test_each_block_has_its_spec_and_its_path(block: Any, depth: int, paths: list[str]) -> None:
    spec = ml.load_spec(_spec(block, depth))
    stage = spec.stages[0]
    assert [stage.block_path(j) for j in range(depth)] == paths
    graph = ml.to_graph(spec)
    mixers = [d for _, d in graph.nodes(data=True) if d["part"] == "token_mixer"]
    assert [d["path"] for d in mixers] == [f"stages[0].{p}.token_mixer" for p in paths]
    assert [d["spec"] for d in mixers] == [stage.block_at(j).token_mixer for j in range(depth)]
    assert ml.load_spec(parse_yaml(ml.dump_spec(spec), "spec.yaml")) == spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic warns when it serialises a union member as another
        assert ml.load_spec(spec.model_dump()) == spec
        assert ml.load_spec(json.loads(spec.model_dump_json())) == spec


def test_a_block_list_may_be_as_long_as_the_depth() -> None:
    """Every block its own spec, past the 16 entries a list used to be capped at."""
    blocks = [{"token_mixer": {"type": "pooling", "pool_size": 3 + 2 * (j % 3)}} for j in range(20)]
    spec = ml.load_spec(_spec(blocks, 20))
    assert [spec.stages[0].block_at(j).token_mixer.pool_size for j in range(20)] == [3 + 2 * (j % 3) for j in range(20)]


def test_named_blocks_and_defaults_reach_first_and_cycle() -> None:
    block = {"first": "poolformer", "cycle": ["convformer", {"base": "poolformer", "layer_scale": 0.5}, IDENT]}
    spec = ml.load_spec({**_spec(block, 4), "defaults": {"layer_scale": 0.25, "norm": {"type": "groupnorm"}}})
    stage = spec.stages[0]
    assert stage.block_at(0).token_mixer.type == "pooling"
    assert stage.block_at(1).token_mixer.type == "sepconv"
    assert stage.block_at(2).layer_scale == 0.5
    assert stage.block_at(3).layer_scale == 0.25 and stage.block_at(3).norm.type == "groupnorm"
