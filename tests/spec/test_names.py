"""Names a user can type: zoo models first, then the shipped examples; 'did you mean' by edit distance."""

from __future__ import annotations

import pytest

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.names import closest, edit_distance
from metaformer_lab.spec.load import example_names, zoo_names


def test_a_shipped_example_resolves_by_name() -> None:
    assert "tiny_caformer" in example_names()
    assert ml.load_spec("tiny_caformer").name == "tiny_caformer"
    assert ml.load_spec("tiny_gated").stages[0].block[0].token_mixer.type == "gated"  # its blocks resolve too


def test_zoo_models_come_before_examples() -> None:
    assert not set(zoo_names()) & set(example_names())  # nothing shadows anything today
    assert ml.load_spec("poolformer_s12").name == "poolformer_s12"


@pytest.mark.parametrize(("typed", "meant"), [("caformer_s19", "caformer_s18"), ("tiny_cafromer", "tiny_caformer"),
                                              ("poolformr_s12", "poolformer_s12"), ("convnext_tinny", "convnext_tiny")])
def test_did_you_mean_ranks_every_name_by_edit_distance(typed: str, meant: str) -> None:
    with pytest.raises(SpecError) as info:
        ml.load_spec(typed)
    assert str(info.value) == (f"{typed}: no such file, and no zoo model or shipped example of that name "
                               f"(did you mean '{meant}'?)")


def test_edit_distance_and_how_far_a_hint_may_be() -> None:
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("a", "a") == 0
    assert closest("vit_smal", ["vit_small_patch16_224", "vit_small"]) == "vit_small"
    assert closest("xyzzy", ["caformer_s18", "tiny_gated"]) is None  # too far to be a typo
    assert closest("ab", []) is None
