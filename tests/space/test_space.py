"""Search spaces: loading, define-by-run decoding, references, containment, sampling, counting, bad files."""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import timm
import torch
import yaml
from invalid_spaces import INVALID_SPACES, PARTS, doc

from metaformer_lab.api import dump_spec, load_spec
from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.errors import SpaceError, SpecError
from metaformer_lab.core.meta import on_meta
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.graph.lower import lower
from metaformer_lab.space import (
    InvalidPoint,
    contains,
    count_points,
    decode,
    decode_point,
    load_space,
    sample,
    show_tree,
    space_names,
    valid_share,
)
from metaformer_lab.space.decode import RandomTrial, TrialChooser
from metaformer_lab.space.tree import Choice, State, expand_once, expand_root
from metaformer_lab.zoo import list_models

optuna.logging.set_verbosity(optuna.logging.WARNING)
ZOO_REFERENCES = [name for name in load_space("metaformer").references if name in list_models()]


def test_both_spaces_ship_and_load() -> None:
    assert space_names() == ["metaformer", "tiny"]
    for name in space_names():
        space = load_space(name)
        assert space.name == name and space.references


def test_the_metaformer_space_lists_every_metaformer_and_convnext_size() -> None:
    families = ("poolformer_", "poolformerv2_", "convformer_", "caformer_", "convnext_")
    expected = {m for m in list_models() if m.startswith(families)}
    assert expected and expected <= set(ZOO_REFERENCES)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO_REFERENCES)
def test_a_zoo_reference_decodes_to_the_zoo_spec(name: str) -> None:
    space = load_space("metaformer")
    spec = decode(space, optuna.trial.FixedTrial(dict(space.references[name])))
    zoo = load_spec(name)
    assert spec.model_copy(update={"name": zoo.name, "description": zoo.description}) == zoo
    with on_meta():
        reference = timm.create_model(name, pretrained=False)
    assert graph_cost(lower(spec)).params == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", ZOO_REFERENCES)
def test_contains_finds_the_reference_assignment(name: str) -> None:
    space = load_space("metaformer")
    found = contains(space, load_spec(name))
    assert found.found and dict(found.params) == dict(space.references[name])


@pytest.mark.parametrize("name", ["tiny", "metaformer"])
def test_every_reference_is_contained_with_its_own_assignment(name: str) -> None:
    space = load_space(name)
    for ref, params in space.references.items():
        point = decode_point(space, optuna.trial.FixedTrial(dict(params)))
        assert contains(space, point.spec).params == dict(params), ref


@pytest.mark.parametrize(("spec", "path", "part"), [
    ("vit_small_patch16_224", "stem", "the closest, 'patchify4_ln', differs at patch: the spec has 16; the space "
                                      "gives 4"),
    ("swin_tiny_patch4_window7_224", "stem", "differs at norm_after.eps: the spec has 1e-05"),
])
def test_contains_names_the_choice_that_excludes_a_spec(spec: str, path: str, part: str) -> None:
    found = contains(load_space("metaformer"), load_spec(spec))
    assert not found.found
    assert found.path == path and part in found.reason


def test_contains_reports_a_value_outside_a_range() -> None:
    space = load_space("metaformer")
    deeper = load_spec("poolformer_s12").model_dump()
    deeper["stages"][2]["depth"] = 30
    found = contains(space, load_spec(deeper))
    assert (found.path, found.reason) == ("stages[2].depth", "the spec has 30; the space offers an integer in [6, 27]")


@pytest.mark.parametrize(("name", "n"), [("tiny", 200), pytest.param("metaformer", 50, marks=pytest.mark.slow)])
def test_sampled_points_validate_and_build_to_the_declared_shape(name: str, n: int) -> None:
    space = load_space(name)
    drawn = sample(space, n, seed=7)
    assert len(drawn.points) == n
    assert len({p.spec.name for p in drawn.points}) == n
    for point in drawn.points:
        again = load_spec(yaml.safe_load(dump_spec(point.spec)))
        assert again == point.spec
        if name == "tiny":  # real tensors at 32x32
            net = compile_graph(point.graph).eval()
            with torch.no_grad():
                out = net(torch.randn(point.graph.input_type.shape(2)))
        else:  # the 224x224 space is built and run on the meta device: shapes without the compute
            with on_meta():
                net = compile_graph(point.graph, init=False).eval()
            with torch.device("meta"):
                out = net(torch.empty(point.graph.input_type.shape(2)))
        assert tuple(out.shape) == point.graph.output_type.shape(2) == (2, space.template.parts["num_classes"])


def test_sampling_is_seeded_and_counts_redraws() -> None:
    space = load_space("tiny")
    a, b, c = sample(space, 30, seed=3), sample(space, 30, seed=3), sample(space, 30, seed=4)
    assert [p.spec for p in a.points] == [p.spec for p in b.points]
    assert [p.spec for p in a.points] != [p.spec for p in c.points]
    assert a.invalid > 0 and sum(a.reasons.values()) == a.invalid


def test_decoding_is_define_by_run_on_an_optuna_trial() -> None:
    space = load_space("tiny")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_families: set[str] = set()
    for _ in range(40):
        trial = study.ask()
        try:
            spec = decode(space, trial)
        except InvalidPoint:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        params = trial.params
        for i in range(len(spec.stages)):
            family = params[f"stages[{i}].variant"]
            seen_families.add(family)
            others = {"conv", "attention", "hybrid"} - {family}
            assert not [k for k in params if any(k.startswith(f"stages[{i}].variant[{o}]") for o in others)]
            # the decoded spec is exactly what the same assignment gives through FixedTrial
            assert decode(space, optuna.trial.FixedTrial(params)) == spec
        assert not [k for k in params if k.startswith(f"stages[{len(spec.stages)}]")]
        study.tell(trial, 0.0)
    assert seen_families == {"conv", "attention", "hybrid"}


def test_window_is_asked_only_for_window_attention() -> None:
    space = load_space("tiny")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    asked = []
    for _ in range(60):
        trial = study.ask()
        with contextlib.suppress(InvalidPoint):
            decode(space, trial)
        mixer = trial.params.get("stages[0].variant[attention].block.token_mixer")
        window = "stages[0].variant[attention].block.token_mixer[window_attention].window"
        if mixer is not None:
            asked.append((mixer, window in trial.params))
        study.tell(trial, 0.0)
    assert asked and all(has == (mixer == "window_attention") for mixer, has in asked)


def test_an_invalid_point_names_the_spec_path_and_the_parameters() -> None:
    space = load_space("tiny")
    params = dict(space.references["vit_tiny"])
    params["stages[0].dim"] = 24
    with pytest.raises(InvalidPoint) as err:
        decode(space, optuna.trial.FixedTrial(params))
    (issue,) = err.value.issues
    assert isinstance(err.value, SpecError)
    assert issue.path == "stages[0].block.token_mixer.head_dim"
    assert issue.message.startswith("32 does not divide dim 24; parameters: ")
    assert "stages[0].dim=24" in issue.message
    assert "stages[0].variant[attention].block.token_mixer[attention].head_dim=32" in issue.message


def test_widths_that_decrease_break_the_tie() -> None:
    space = load_space("tiny")
    params = dict(space.references["poolformer_tiny"])
    params["stages[1].dim"] = 32
    params["stages[0].dim"] = 48
    with pytest.raises(InvalidPoint) as err:
        decode(space, optuna.trial.FixedTrial(params))
    assert err.value.issues[0].path == "stages[1].dim"
    assert "must not decrease" in err.value.issues[0].message


def _space(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path)


class _Everything:
    """Expands every value of every choice (for brute-force counting)."""

    def values(self, choice: Choice, loc: str, state: State) -> Sequence[Any]:
        return choice.values() or []

    def accept(self, loc: str, value: Any, state: State) -> bool:
        return True


SMALL = """
name: small
input: {size: 32}
num_classes: 10
stem: {type: patchify, patch: {choice: [2, 4]}}
num_stages: {choice: [1, 2]}
stages:
  - depth: {int: [1, 3]}
    dim: 16
    variant:
      choice:
        conv: {block: {token_mixer: {choice: [{type: pooling, pool_size: {choice: [3, 5]}}, {type: dwconv}]}}}
        attention: {layout: tokens, block: {token_mixer: {type: attention, head_dim: {choice: [8, 16]}}}}
  - depth: {int: [1, 2]}
    dim: 32
    downsample: {type: conv}
    variant:
      choice:
        conv: {block: {token_mixer: {choice: [{type: pooling, pool_size: {choice: [3, 5]}}, {type: dwconv}]}}}
        attention: {layout: tokens, block: {token_mixer: {type: attention, head_dim: {choice: [8, 16]}}}}
ties:
  - {share: 'variant[conv].block.token_mixer'}
"""


def test_count_points_is_exact_with_variants_ties_and_optional_stages(tmp_path: Path) -> None:
    space = _space(tmp_path, SMALL)
    points = {tuple(sorted(st.params.items(), key=lambda kv: kv[0])) for _, st in
              expand_root(space.template, _Everything())}
    assert count_points(space) == len(points)
    # the tie makes the two stages' conv mixers one parameter, so it is counted once
    untied = _space(tmp_path, SMALL.split("ties:")[0])
    assert count_points(untied) > count_points(space)


@pytest.mark.parametrize("name", ["tiny", "metaformer", "small"])
def test_the_one_pass_expansion_is_the_generators_first(name: str, tmp_path: Path) -> None:
    """Decoding takes ``expand_once``; it must give exactly what the backtracking generator gives first: the same
    spec data, parameters, decisions and origins (ties, variants and optional stages included)."""
    space = _space(tmp_path, SMALL) if name == "small" else load_space(name)
    for seed in range(60):
        once = expand_once(space.template, TrialChooser(RandomTrial(random.Random(seed))))
        assert once == next(expand_root(space.template, TrialChooser(RandomTrial(random.Random(seed)))))
    assert expand_once(space.template, _Everything()) == next(expand_root(space.template, _Everything()))


def test_count_points_of_the_shipped_spaces() -> None:
    assert count_points(load_space("tiny")) > 10**15
    assert count_points(load_space("metaformer")) > 10**12


def test_a_continuous_parameter_makes_the_count_infinite(tmp_path: Path) -> None:
    space = _space(tmp_path, doc(stages="stages:\n  - {depth: 1, dim: 16, block: {token_mixer: {type: pooling}, "
                                        "layer_scale: {float: [1.0e-6, 1.0e-4], log: true}}}"))
    assert count_points(space) is None
    for spec in sample(space, 3, seed=0).specs:
        assert 1e-6 <= spec.stages[0].block[0].layer_scale <= 1e-4


def test_valid_share_is_estimated_with_an_interval() -> None:
    validity = valid_share(load_space("tiny"), 100, seed=0)
    assert validity.drawn == 100 and 0 < validity.valid < 100
    assert validity.low <= validity.share <= validity.high
    assert sum(validity.reasons.values()) == 100 - validity.valid


def test_valid_share_counts_the_same_in_any_number_of_processes() -> None:
    """Blocks of draws seeded on their own: forked children drawing some of them change nothing but the time, and
    the progress seen in this process counts every process's draws."""
    space = load_space("tiny")
    seen: list[int] = []
    alone = valid_share(space, 230, seed=4)  # not a whole number of blocks
    together = valid_share(space, 230, seed=4, processes=3, progress=seen.append)
    assert together == alone and alone.drawn == 230
    assert seen == sorted(seen) and seen[-1] == 230
    assert valid_share(space, 230, seed=5, processes=3) != alone


def test_a_failing_drawing_process_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    size = sys.modules["metaformer_lab.space.size"]  # the module (the package re-exports its functions)
    real = size.draw

    def draw(space: Any, seed: int | str) -> Any:
        if str(seed).endswith(".1"):  # the second block: the forked child's
            raise ValueError("broken stream")
        return real(space, seed)

    monkeypatch.setattr(size, "draw", draw)
    with pytest.raises(RuntimeError, match="a drawing process failed: ValueError: broken stream"):
        valid_share(load_space("tiny"), 100, seed=0, processes=2)


def test_show_lists_every_choice_under_its_option() -> None:
    root = show_tree(load_space("tiny"))
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        lines.append("  " * depth + node.label)
        for child in node.children:
            walk(child, depth + 1)

    walk(root, 0)
    text = "\n".join(lines)
    assert "num_stages: one of 1, 2, 3" in text
    assert "[window_attention]" in text and "window: one of 2, 4" in text
    assert "stages[2]" in text and "references" in text


def test_the_base_of_the_invalid_table_is_valid(tmp_path: Path) -> None:
    assert _space(tmp_path, doc()).name == "small"
    assert set(PARTS) >= {"stages", "ties", "references"}


@pytest.mark.parametrize(("text", "path", "message"), INVALID_SPACES)
def test_invalid_space_files_name_the_path(tmp_path: Path, text: str, path: str, message: str) -> None:
    with pytest.raises(SpaceError) as err:
        _space(tmp_path, text)
    assert any(i.path == path and message in i.message for i in err.value.issues), [str(i) for i in err.value.issues]


def test_unknown_space_names_suggest_the_shipped_ones() -> None:
    with pytest.raises(SpaceError) as err:
        load_space("tiy")
    assert str(err.value) == "tiy: no such file, and no shipped space of that name (did you mean 'tiny'?)"


def test_covering_checks_every_option_not_just_the_first(tmp_path: Path) -> None:
    text = doc().replace("{type: dwconv, kernel: {choice: [3, 5]}}", "{type: dwconv, kernel: {choice: [3, 99, 5]}}")
    with pytest.raises(SpaceError) as err:
        _space(tmp_path, text)
    assert [str(i) for i in err.value.issues] == [
        "stages[0].block.token_mixer.choice[1].kernel.choice[1]: 99 must be <= 63"]


def test_all_assignments_of_a_tiny_space_decode_or_explain(tmp_path: Path) -> None:
    space = _space(tmp_path, SMALL)
    for _, st in itertools.islice(expand_root(space.template, _Everything()), 50):
        try:
            decode(space, optuna.trial.FixedTrial(dict(st.params)))
        except InvalidPoint as err:
            assert "; parameters: " in err.issues[0].message


FIRST_THEN_CYCLE = """
name: cycled
input: {size: 32}
num_classes: 10
stem: {type: patchify, patch: 4}
stages:
  - depth: {int: [2, 5]}
    dim: 16
    block:
      first: {base: poolformer, token_mixer: {pool_size: {choice: [3, 5]}}}
      cycle:
        - {token_mixer: {type: dwconv, kernel: 3, groups: {choice: [null, 1, 4]}}}
        - token_mixer: {choice: [null, {type: pooling}]}
          channel_mixer: {type: conv_ffn, dw_residual: {choice: [false, true]}}
"""


def test_a_stage_with_first_then_cycle_blocks_decodes_and_is_contained(tmp_path: Path) -> None:
    """Choices inside ``first`` and ``cycle`` (a null token mixer among them) are parameters like any other; a
    decoded point is contained with its own assignment."""
    space = _space(tmp_path, FIRST_THEN_CYCLE)
    drawn = sample(space, 24, seed=3)
    assert any(p.params["stages[0].block.cycle[1].token_mixer"] is None for p in drawn.points)
    for point in drawn.points:
        stage = point.spec.stages[0]
        assert stage.block_at(0).token_mixer.type == "pooling"
        assert [stage.block_path(j) for j in range(1, stage.depth)] == \
            ["block.cycle[0]", "block.cycle[1]", "block.cycle[0]", "block.cycle[1]"][: stage.depth - 1]
        assert contains(space, point.spec).params == dict(point.params)
