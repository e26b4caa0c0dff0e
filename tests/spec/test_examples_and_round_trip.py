"""Every example and every shipped block loads, builds and round-trips through YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, ROOT

import metaformer_lab as ml
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import block_names, data_dir
from metaformer_lab.spec.yaml_io import parse_yaml
from metaformer_lab.zoo.listing import token_mixer_tags


def test_there_are_at_least_six_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_builds_to_its_declared_output(path: Path) -> None:
    spec = ml.load_spec(path)
    graph = ml.to_graph(spec)
    net = ml.build(graph).eval()
    with torch.no_grad():
        y = net(torch.randn(graph.input_type.shape(2)))
    assert tuple(y.shape) == graph.output_type.shape(2) == (2, spec.num_classes)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_round_trips(path: Path) -> None:
    spec = ml.load_spec(path)
    text = ml.dump_spec(spec)
    again = ml.load_spec(parse_yaml(text))
    assert again == spec
    assert ml.dump_spec(again) == text


def test_examples_use_every_token_mixer_family() -> None:
    used = set().union(*(token_mixer_tags(ml.load_spec(p)) for p in EXAMPLES))
    assert used == set(TOKEN_MIXERS.tags())


@pytest.mark.parametrize("name", block_names(), ids=str)
def test_shipped_block_builds_in_a_small_network(name: str) -> None:
    block: dict = {"base": name}
    shipped = ml.spec.read_spec(_probe({"base": name})).stages[0].block[0]
    if shipped.steps is not None:
        block["steps"] = {k: _small(step.token_mixer) for k, step in shipped.steps.items()
                          if _windowed(step.token_mixer)}
    elif _windowed(shipped.token_mixer):
        block.update(_small(shipped.token_mixer))
    net = ml.build(_probe(block)).eval()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def _windowed(mixer: object) -> bool:
    return getattr(mixer, "type", None) in ("window_attention", "routing_attention")


def _small(mixer: object) -> dict:
    """Windows (or routing regions) that fit the probe's 8x8 grid."""
    if getattr(mixer, "type", None) == "routing_attention":
        return {"token_mixer": {"regions": 4, "topk": 4}}
    return {"token_mixer": {"window": 4}}


def _probe(block: dict) -> dict:
    """A one-stage network on an 8x8 grid of width 96 (divisible by every head count the blocks use)."""
    return {"name": "probe", "input": {"size": 32}, "num_classes": 3, "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 2, "dim": 96, "block": block}]}


def test_blocks_folder_is_the_shipped_library() -> None:
    assert data_dir("blocks") == ROOT / "blocks" or (data_dir("blocks") / "convformer.yaml").is_file()


def test_defaults_fill_blocks_that_leave_fields_out() -> None:
    spec = ml.load_spec({"name": "d", "input": {"size": 16}, "defaults": {"layer_scale": 0.5, "norm": None},
                         "stem": {"type": "patchify", "patch": 4},
                         "stages": [{"depth": 1, "dim": 8, "block": [{"token_mixer": {"type": "pooling"}},
                                                                     {"token_mixer": {"type": "pooling"},
                                                                      "layer_scale": None}]}]})
    first, second = spec.stages[0].block
    assert (first.layer_scale, first.norm) == (0.5, None)
    assert second.layer_scale is None


def test_named_block_overrides_merge_deeply() -> None:
    spec = ml.load_spec({"name": "o", "input": {"size": 16}, "stem": {"type": "patchify", "patch": 4},
                         "stages": [{"depth": 1, "dim": 8, "block": {"base": "convformer",
                                                                     "token_mixer": {"kernel": 3}}}]})
    mixer = spec.stages[0].block[0].token_mixer
    assert (mixer.type, mixer.kernel, mixer.act) == ("sepconv", 3, "star_relu")


def test_a_mixer_of_another_type_replaces_the_base_one() -> None:
    spec = ml.load_spec({"name": "o", "input": {"size": 16}, "stem": {"type": "patchify", "patch": 4},
                         "stages": [{"depth": 1, "dim": 8, "block": {"base": "convformer",
                                                                     "token_mixer": {"type": "pooling"}}}]})
    assert spec.stages[0].block[0].token_mixer.type == "pooling"


def test_user_block_folder_next_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "blocks").mkdir()
    (tmp_path / "blocks" / "mine.yaml").write_text("token_mixer: {type: dwconv, kernel: 5}\n")
    (tmp_path / "net.yaml").write_text("name: n\ninput: {size: 16}\nstem: {type: patchify, patch: 4}\n"
                                       "stages: [{depth: 1, dim: 8, block: mine}]\n")
    assert ml.load_spec(tmp_path / "net.yaml").stages[0].block[0].token_mixer.kernel == 5


def test_schema_is_json_schema_of_the_spec() -> None:
    schema = ArchSpec.model_json_schema()
    assert schema["title"] == "ArchSpec"
    assert {"stem", "stages"} <= set(schema["required"])
    mixer_refs = str(schema["$defs"]["BlockSpec"]["properties"]["token_mixer"])
    for spec_cls in TOKEN_MIXERS.specs():
        assert spec_cls.__name__ in mixer_refs


