"""Every entry of the invalid-spec table fails with its exact path; problems are gathered, not first-only."""

from __future__ import annotations

import pytest
from invalid_specs import INVALID, POOL, block, doc, stages

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


HEADS_40 = ("{depth: 1, dim: 40, downsample: {type: conv}, layout: tokens, block: "
            "{token_mixer: {type: attention, num_heads: 3, head_dim: null}}}")
SHAPE = "stages[1].block.token_mixer.num_heads: 3 does not divide dim 40"


@pytest.mark.parametrize(("parts", "expected"), [
    (dict(head="head: {type: pool_norm_linear, dropp: 0.1}"),
     ["head.dropp: unknown field (did you mean 'drop'?)", SHAPE]),
    (dict(name="name: my model!"), ["name: 'my model!' may contain only letters, digits, '_', '-' and '.'", SHAPE]),
    (dict(s0=block("{token_mixer: {type: pooling}, layer_scale: -1.0}")),
     ["stages[0].block.layer_scale: -1 must be >= 0", SHAPE]),
    (dict(s0=block("{token_mixer: {type: pooling}, layer_scal: 0.1}")),
     ["stages[0].block.layer_scal: unknown field (did you mean 'layer_scale'?)", SHAPE]),
    (dict(s0=block("{token_mixer: {type: pooling, pool_size: 4}}")),
     ["stages[0].block.token_mixer.pool_size: 4 must be odd", SHAPE]),
    (dict(s0=block("{token_mixer: {type: parallel, branches: [{type: identity}, {type: pooling, pool_sise: 3}]}}")),
     ["stages[0].block.token_mixer.branches[1].pool_sise: unknown field (did you mean 'pool_size'?)", SHAPE]),
    (dict(head="head: {type: pool_norm_linear, norm: {type: layernorm, epss: 1.0e-6}}"),
     ["head.norm.epss: unknown field (did you mean 'eps'?)", SHAPE]),
    # an op whose type is unknown, or that changes the tensor type, leaves what follows unchecked
    (dict(s0=block("{token_mixer: {type: poolin}}")),
     ["stages[0].block.token_mixer.type: unknown 'poolin' (did you mean 'pooling'?)"]),
    (dict(s1=HEADS_40.replace("{type: conv}", "{type: conv, kernl: 3}")),
     ["stages[1].downsample.kernl: unknown field (did you mean 'kernel'?)"]),
    # a field the shapes need: the schema problem alone
    (dict(s0=block(POOL, "depth: 0, dim: 16")), ["stages[0].depth: 0 must be >= 1"]),
], ids=["head-field", "name", "layer-scale", "block-field", "op-value", "composite-branch", "nested-op", "unknown-type",
        "type-changing-op", "depth"])
def test_schema_and_shape_problems_are_reported_in_one_run(parts: dict[str, str], expected: list[str]) -> None:
    """A schema problem hides no shape problem in a part it leaves checkable."""
    stage_parts = {"s0": block(POOL), "s1": HEADS_40}
    stage_parts.update({k: parts.pop(k) for k in list(parts) if k in stage_parts})
    text = doc(stages=stages(stage_parts["s0"], stage_parts["s1"]), **parts)
    with pytest.raises(SpecError) as info:
        load_spec(parse_yaml(text, "spec.yaml"))
    assert [str(i) for i in info.value.issues] == expected
