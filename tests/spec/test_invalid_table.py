"""Every entry of the invalid-spec table fails with its exact path; problems are gathered, not first-only."""

from __future__ import annotations

import pytest
from invalid_specs import INVALID, block, doc, stages

from metaformer_lab import SpecError, load_spec
from metaformer_lab.spec.yaml_io import parse_yaml


@pytest.mark.parametrize(("text", "path", "message"), INVALID)
def test_invalid_spec_reports_its_path(text: str, path: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(parse_yaml(text, "spec.yaml"))
    lines = [str(i) for i in info.value.issues]
    assert any(line.startswith(f"{path}: ") and message in line for line in lines), lines


def test_the_table_is_large_enough() -> None:
    assert len(INVALID) >= 30


def test_the_base_spec_is_valid() -> None:
    load_spec(parse_yaml(doc(), "spec.yaml"))


def test_every_problem_is_reported_at_once() -> None:
    text = doc(
        num_classes="num_classes: -1",
        stages=stages(block("{token_mixer: {type: pooling, pool_size: 4}}"),
                      "{depth: 1, dim: 40, downsample: {type: conv}, layout: tokens, block: "
                      "{token_mixer: {type: attention, num_heads: 3, head_dim: null}}}"),
    )
    with pytest.raises(SpecError) as info:
        load_spec(parse_yaml(text, "spec.yaml"))
    paths = {i.path for i in info.value.issues}
    assert {"num_classes", "stages[0].block.token_mixer.pool_size"} <= paths


def test_shape_problems_in_several_stages_are_reported_at_once() -> None:
    text = doc(stages=stages(
        block("{token_mixer: {type: window_attention, window: 3, num_heads: 2}}", "depth: 1, dim: 16, layout: tokens"),
        "{depth: 1, dim: 40, downsample: {type: conv}, layout: tokens, block: "
        "{token_mixer: {type: attention, num_heads: 3, head_dim: null}}}"))
    with pytest.raises(SpecError) as info:
        load_spec(parse_yaml(text, "spec.yaml"))
    assert [i.path for i in info.value.issues] == ["stages[0].block.token_mixer.window",
                                                    "stages[1].block.token_mixer.num_heads"]
