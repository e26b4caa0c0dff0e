"""Ecosystem entry points: torch.hub (hubconf.py) and timm's own create_model / list_models."""

from __future__ import annotations

from pathlib import Path

import torch

import metaformer_lab as ml
from metaformer_lab.compile.network import Network

ROOT = Path(__file__).resolve().parents[1]


def test_torch_hub_loads_a_zoo_model_from_the_checkout() -> None:
    net = torch.hub.load(str(ROOT), "poolformer_s12", source="local", num_classes=10)
    assert isinstance(net, Network) and net.num_classes == 10
    ours = ml.create_model("poolformer_s12", num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ours.parameters())


def test_timm_create_model_builds_ours_under_the_mfl_prefix() -> None:
    import timm

    import metaformer_lab.timm_models as registered

    assert "mfl_poolformer_s12" in timm.list_models("mfl_*")
    assert set(timm.list_models("mfl_*")) == set(registered.REGISTERED) and len(registered.REGISTERED) == len(
        ml.zoo.list_models())
    net = timm.create_model("mfl_poolformer_s12", num_classes=10).eval()
    reference = timm.create_model("poolformer_s12", num_classes=10)
    assert isinstance(net, Network) and net.default_cfg["input_size"] == (3, 224, 224)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    features = timm.create_model("mfl_convnext_atto", features_only=True, out_indices=(1, 3))
    assert features.feature_info.channels() == [80, 320]
