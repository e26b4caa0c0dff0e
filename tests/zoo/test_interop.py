"""timm weights in and out: create_model from a checkpoint file, from_timm, to_timm_state_dict, errors."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import metaformer_lab as ml
from metaformer_lab import SpecError
from metaformer_lab.zoo import CheckpointError, convert_state_dict, create_model, from_timm, to_timm_state_dict
from metaformer_lab.zoo.fixed_point import perturb

pytestmark = pytest.mark.zoo


@functools.cache
def _timm(name: str, **kwargs: object) -> torch.nn.Module:
    """timm's model, perturbed, in eval mode; built once per process: the tests only read it."""
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    perturb(model, seed=3)
    return model


def _image(size: int = 224) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("wrap", ["plain", "nested", "safetensors"])
def test_create_model_from_a_timm_checkpoint_gives_timms_logits(tmp_path: Path, wrap: str) -> None:
    reference = _timm("vit_small_patch16_224")
    path = tmp_path / ("vit.safetensors" if wrap == "safetensors" else "vit.pth")
    state = reference.state_dict()
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if wrap == "nested" else state, path)
    net = create_model("vit_small_patch16_224", checkpoint_path=path).eval()
    x = _image()
    with torch.no_grad():
        assert (net(x) - reference(x)).abs().max().item() <= 1e-5


def test_num_classes_resets_only_the_classifier(tmp_path: Path) -> None:
    reference = _timm("poolformer_s12")
    torch.save(reference.state_dict(), tmp_path / "p.pth")
    net = create_model("poolformer_s12", checkpoint_path=tmp_path / "p.pth", num_classes=10).eval()
    x = _image()
    with torch.no_grad():
        assert net(x).shape == (2, 10)
        assert torch.equal(net.forward_features(x), reference.forward_features(x))
    features = create_model("poolformer_s12", checkpoint_path=tmp_path / "p.pth", num_classes=0).eval()
    with torch.no_grad():
        assert features(x).shape == (2, 512)


def test_from_timm_keeps_weights_and_class_count() -> None:
    reference = _timm("caformer_s18", num_classes=7)
    net = from_timm(reference).eval()
    x = _image()
    with torch.no_grad():
        assert net(x).shape == (2, 7)
        assert (net(x) - reference(x)).abs().max().item() <= 1e-5


def test_a_model_trained_here_loads_into_timm() -> None:
    net = ml.build("convformer_s18").eval()
    perturb(net, seed=5)
    theirs = timm.create_model("convformer_s18", pretrained=False).eval()
    theirs.load_state_dict(to_timm_state_dict("convformer_s18", net.state_dict()), strict=True)
    x = _image()
    with torch.no_grad():
        assert torch.equal(net(x), theirs(x))


def test_round_trip_of_a_resized_classifier() -> None:
    net = create_model("poolformerv2_s12", num_classes=5)
    back = to_timm_state_dict("poolformerv2_s12", net.state_dict())
    assert back["head.fc.weight"].shape == (5, 512)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    torch.save(_timm("poolformer_s12").state_dict(), tmp_path / "p.pth")
    with pytest.raises(CheckpointError) as info:
        create_model("poolformerv2_s12", checkpoint_path=tmp_path / "p.pth")
    assert any("which the model does not have" in i.message or "does not fit" in i.message
               for i in info.value.issues)


def test_convert_reports_every_bad_key() -> None:
    state = _timm("poolformer_s12").state_dict()
    state["stranger.weight"] = torch.zeros(3)
    del state["stem.conv.bias"]
    with pytest.raises(CheckpointError) as info:
        convert_state_dict("poolformer_s12", state)
    paths = {i.path for i in info.value.issues}
    assert {"stranger.weight", "stem.conv.bias"} <= paths


def test_weight_errors_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such checkpoint file"):
        create_model("poolformer_s12", checkpoint_path=tmp_path / "missing.pth")
    with pytest.raises(SpecError, match="timm has no pretrained weights"):
        create_model("identityformer_s12", pretrained=True)
    with pytest.raises(SpecError, match="timm has no pretrained weights for mixer_s16_224"):
        create_model("mixer_s16_224", pretrained=True)
    with pytest.raises(SpecError, match="weights load into zoo models only"):
        create_model(Path(__file__).parents[2] / "examples" / "tiny_caformer.yaml", checkpoint_path=tmp_path / "x")
    with pytest.raises(SpecError, match="no zoo model of that name"):
        convert_state_dict("poolformer_s13", {})


def test_create_model_without_weights_is_build() -> None:
    net = create_model("poolformer_s12", num_classes=3)
    assert net(_image(64)[:1]).shape == (1, 3)
