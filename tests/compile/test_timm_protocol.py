"""timm's model protocol on compiled networks, against live timm modules (``pretrained=False``, nothing downloads):
``forward_intermediates``, ``feature_info``, ``forward_head(pre_logits=True)``, ``no_weight_decay``,
``group_matcher`` (through timm's ``create_optimizer_v2``), ``pretrained_cfg`` (through ``resolve_data_config``),
gradient checkpointing, ``reset_classifier`` and feature backbones (timm's ``FeatureGetterNet``).

Weights go from timm's module (perturbed, ``zoo.fixed_point.perturb``) to ours through ``convert_state_dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import EXAMPLES, TINY_SPEC, perturbed
from timm.data import resolve_data_config
from timm.models._features import FeatureGetterNet
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.compile import Network
from metaformer_lab.compile.protocol import feature_backbone
from metaformer_lab.core.meta import on_meta
from metaformer_lab.zoo import get
from metaformer_lab.zoo.keymap import invert

# The smallest zoo model of every family whose timm class has forward_intermediates.
FAMILIES = {
    "metaformer": "poolformer_s12",
    "metaformer-mlp-head": "caformer_s18",
    "convnext": "convnext_atto",
    "vit": "vit_tiny_patch16_224",
    "deit-distilled": "deit_tiny_distilled_patch16_224",
    "cait": "cait_xxs24_224",
    "swin": "swin_tiny_patch4_window7_224",
    "pvt_v2": "pvt_v2_b0",
    "twins-pcpvt": "twins_pcpvt_small",
    "twins-svt": "twins_svt_small",
    "efficientformer": "efficientformer_l1",
    "efficientvit": "efficientvit_b0",
    "focalnet": "focalnet_tiny_srf",
    "coatnet": "coatnet_0_rw_224",
    "convit": "convit_tiny",
    "mixer": "mixer_s16_224",
    "resmlp": "resmlp_12_224",
    "visformer": "visformer_tiny",
    "maxvit": "maxvit_tiny_tf_224",
}
# Over 2.5 s for the forward parity here (20M+ parameters or 26 blocks): in the slow tier.
SLOW = {"caformer_s18", "cait_xxs24_224", "swin_tiny_patch4_window7_224", "twins_pcpvt_small", "twins_svt_small",
        "focalnet_tiny_srf", "coatnet_0_rw_224", "maxvit_tiny_tf_224"}
ISOTROPIC = {"vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224", "convit_tiny",
             "mixer_s16_224", "resmlp_12_224"}
BY_EXAMPLE = {p.stem: p for p in EXAMPLES}


def _families(slow: bool = False) -> list[Any]:
    """One param per family; with ``slow``, the bigger models marked slow."""
    return [pytest.param(name, id=family, marks=[pytest.mark.slow] if slow and name in SLOW else [])
            for family, name in FAMILIES.items()]


def _pair(name: str) -> tuple[nn.Module, Network]:
    """timm's module (perturbed) and ours with its weights, both in eval mode."""
    reference = perturbed(get(name).reference())
    net = ml.create_model(name).eval()
    net.load_state_dict(ml.convert_state_dict(name, reference.state_dict()), strict=True)
    return reference, net


@functools.cache
def _meta_pair(name: str) -> tuple[nn.Module, Network]:
    """timm's module and ours on the meta device, built once per process: the tests only read them."""
    with on_meta():
        return get(name).reference(), ml.create_model(name)


def _image(batch: int = 1, size: int = 224) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(ours: list[Tensor], theirs: list[Tensor], name: str) -> None:
    """Equal within the zoo model's logit tolerance (0 for the models whose logits are bit-exact)."""
    assert len(ours) == len(theirs)
    tol = get(name).entry.tolerance
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _as_theirs(ours: Tensor, theirs: Tensor) -> Tensor:
    """Our final features in timm's layout: channels-last maps may be NCHW or (B, N, C) there."""
    if ours.shape != theirs.shape and ours.ndim == 4:
        return ours.permute(0, 3, 1, 2) if ours.permute(0, 3, 1, 2).shape == theirs.shape else ours.flatten(1, 2)
    return ours


# --- features -------------------------------------------------------------------------------------------

@pytest.mark.zoo
@pytest.mark.parametrize("name", _families(slow=True))
def test_forward_intermediates_and_pre_logits_equal_timms(name: str) -> None:
    reference, net = _pair(name)
    x = _image()
    with torch.no_grad():
        for norm in (False, True):
            theirs_x, theirs = reference.forward_intermediates(x, norm=norm)
            ours_x, ours = net.forward_intermediates(x, norm=norm)
            _close(ours, theirs, name)
            _close([_as_theirs(ours_x, theirs_x)], [theirs_x], name)
        early = dict(indices=[0, 2], stop_early=True, intermediates_only=True)
        _close(net.forward_intermediates(x, **early), reference.forward_intermediates(x, **early), name)
        if name in ISOTROPIC:  # timm's token models also give NLC
            nlc = dict(indices=2, output_fmt="NLC", norm=True, intermediates_only=True)
            _close(net.forward_intermediates(x, **nlc), reference.forward_intermediates(x, **nlc), name)
        features = net.forward_features(x)
        theirs_pre = reference.forward_head(reference.forward_features(x), pre_logits=True)
        _close([net.forward_head(features, pre_logits=True)], [theirs_pre], name)
        assert torch.equal(net.forward_head(features), net(x))


@pytest.mark.zoo
@pytest.mark.parametrize("name", _families())
def test_feature_info_and_attributes_equal_timms(name: str) -> None:
    reference, net = _meta_pair(name)
    keys = ("num_chs", "reduction")
    assert [{k: f[k] for k in keys} for f in net.feature_info] == [{k: f[k] for k in keys}
                                                                    for f in reference.feature_info]
    modules = dict(net.named_modules())
    assert all(f["module"] in modules for f in net.feature_info)
    assert (net.num_classes, net.num_features, net.head_hidden_size) == (
        reference.num_classes, reference.num_features, reference.head_hidden_size)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", ml.zoo.list_models(fixed_points=True))
def test_feature_info_of_every_zoo_model_equals_timms(name: str) -> None:
    reference, net = _meta_pair(name)
    assert [(f["num_chs"], f["reduction"]) for f in net.feature_info] == [
        (f["num_chs"], f["reduction"]) for f in reference.feature_info]


@pytest.mark.zoo
@pytest.mark.parametrize(("name", "out_indices", "norm"), [
    ("deit_tiny_distilled_patch16_224", (2, 5), False),
    ("cait_xxs24_224", (3, 7), True),  # pruned before the class-attention stage, the final norm kept
    ("convit_tiny", (4,), True),       # pruned before the class token is inserted
    ("efficientvit_b0", (0, 2, 3), False),  # timm's stages 0-3 are our stages 1-4
])
def test_feature_backbone_equals_timms_feature_getter(name: str, out_indices: tuple[int, ...], norm: bool) -> None:
    reference, net = _pair(name)
    theirs = FeatureGetterNet(reference, out_indices=out_indices, norm=norm).eval()
    ours = feature_backbone(net, out_indices, norm=norm).eval()
    x = _image()
    with torch.no_grad():
        maps = ours(x)
        _close(maps, theirs(x), name)
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [m.shape[1] for m in maps]
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_build_features_only_gives_nchw_maps_with_the_reported_channels(path: Any) -> None:
    full = ml.build(path)
    last = len(full.feature_info) - 1
    backbone = ml.build(path, features_only=True, out_indices=(0, last)).eval()
    x = torch.randn(2, *full.input_type.shape(1)[1:])
    with torch.no_grad():
        maps = backbone(x)
    info = backbone.feature_info
    assert [m.shape[1] for m in maps] == info.channels() == [full.feature_info[0]["num_chs"],
                                                             full.feature_info[last]["num_chs"]]
    assert [x.shape[-1] // m.shape[-1] for m in maps] == info.reduction()
    assert all(m.ndim == 4 for m in maps)


def test_forward_intermediates_of_a_spec_end_in_forward_features() -> None:
    net = ml.build(TINY_SPEC).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = net.forward_intermediates(x)
        assert torch.equal(final, net.forward_features(x))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert net.prune_intermediate_layers(indices=[0]) == [0]
    assert len(net.stages) == 1 and isinstance(net.head, nn.Identity)
    assert net.output_type == net.feature_types[0]
    with torch.no_grad():
        assert torch.equal(net(x), net.forward_intermediates(x, indices=[0], intermediates_only=True)[0])
    with pytest.raises(ValueError, match="pruned"):
        net.forward_intermediates(x, indices=[1])


# --- the head -------------------------------------------------------------------------------------------

HEADS = {"pool_norm_linear": "tiny_gated", "distilled": "tiny_focal_efficient", "class_token": "tiny_class_attention",
         "mlp_head": "tiny_caformer", "conv_mlp_head": "tiny_conv_attention_hybrid"}


@pytest.mark.parametrize("example", list(HEADS.values()), ids=list(HEADS))
def test_reset_classifier_changes_the_output_for_every_head(example: str) -> None:
    net = ml.build(BY_EXAMPLE[example]).eval()
    x = torch.randn(2, *net.input_type.shape(1)[1:])
    with torch.no_grad():
        pre = net.forward_head(net.forward_features(x), pre_logits=True)
        assert pre.shape == (2, net.head_hidden_size)
        net.reset_classifier(0)
        assert torch.equal(net(x), pre)  # no classifier: the head gives its pre-logit features
        assert net.num_classes == 0 and net.output_type.shape(2) == (2, net.head_hidden_size)
        assert net.pretrained_cfg["num_classes"] == 0
        net.reset_classifier(7)
        assert net(x).shape == (2, 7) == net.output_type.shape(2)
        classifiers = net.get_classifier()
        for fc in classifiers if isinstance(classifiers, tuple) else (classifiers,):
            assert isinstance(fc, nn.Linear) and fc.out_features == 7 and not fc.bias.any()
        assert net.pretrained_cfg["num_classes"] == 7
        assert torch.equal(net.forward_head(net.forward_features(x), pre_logits=True), pre)
        net.reset_classifier(0, "")
        assert torch.equal(net(x), net.forward_features(x)) and net.output_type == net.feature_types[-1]


def test_an_mlp_head_is_rebuilt_as_an_mlp_and_pooling_can_change() -> None:
    net = ml.build(BY_EXAMPLE["tiny_caformer"]).eval()
    hidden = net.head.fc1.out_features
    net.reset_classifier(0)
    net.reset_classifier(10, global_pool="max")
    assert isinstance(net.head.fc1, nn.Linear) and net.head.fc1.out_features == hidden
    assert net.head.pool.mode == "max"
    with pytest.raises(ValueError):
        net.reset_classifier(10, global_pool="")
    token_net = ml.build(BY_EXAMPLE["tiny_class_attention"])
    with pytest.raises(ValueError, match="token"):
        token_net.reset_classifier(10, global_pool="avg")


def test_forward_stays_the_plain_composition() -> None:
    """``forward`` is ``head(stages(stem(x)))`` with checkpointing off (the zoo fixed points check the values)."""
    net = ml.build(BY_EXAMPLE["tiny_caformer"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net.head(net.stages(net.stem(x))))


# --- optimisation ---------------------------------------------------------------------------------------

def _optimizer_groups(model: nn.Module, **kwargs: Any) -> dict[str, tuple[float, float]]:
    """Parameter name -> (weight decay, lr scale) in timm's create_optimizer_v2."""
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups
            for p in g["params"]}


@pytest.mark.zoo
@pytest.mark.parametrize("name", _families())
def test_no_weight_decay_maps_to_what_timm_marks(name: str) -> None:
    reference, net = _meta_pair(name)
    table = invert(get(name).key_map, list(reference.state_dict()))
    theirs = set(getattr(reference, "no_weight_decay", set)()) & {n for n, _ in reference.named_parameters()}
    assert {table[n] for n in net.no_weight_decay()} == theirs


@pytest.mark.zoo
@pytest.mark.parametrize("layer_decay", [None, 0.75], ids=["weight_decay", "layer_decay"])
@pytest.mark.parametrize("name", _families())
def test_create_optimizer_v2_groups_parameters_as_for_timms_model(name: str, layer_decay: float | None) -> None:
    """Weight decay for every parameter, and layer-wise lr scales (timm's group_matcher mapped onto ours).

    Left out: parameters that timm keeps with more dimensions (ResMLP's (1, 1, C) Affine is (C,) here, so timm's
    1-D rule does not exempt it there), and layer scales of the MetaFormer family, whose timm class has no
    group_matcher (timm falls back to 12 parameters per group, ours groups by block)."""
    reference, net = _meta_pair(name)
    table = invert(get(name).key_map, list(reference.state_dict()))
    kwargs = {} if layer_decay is None else {"layer_decay": layer_decay}
    ours, theirs = _optimizer_groups(net, **kwargs), _optimizer_groups(reference, **kwargs)
    dims = {n: p.ndim for n, p in reference.named_parameters()}
    ours_dims = {table[n]: p.ndim for n, p in net.named_parameters()}
    mapped = {table[n]: v for n, v in ours.items()}
    assert mapped.keys() == theirs.keys()
    same_shape = [k for k in theirs if dims[k] == ours_dims[k]]
    assert {k: mapped[k][0] for k in same_shape} == {k: theirs[k][0] for k in same_shape}
    if layer_decay is not None and hasattr(reference, "group_matcher"):
        assert {k: mapped[k][1] for k in theirs} == pytest.approx({k: theirs[k][1] for k in theirs})


def test_group_matcher_of_a_spec_gives_a_layer_per_block() -> None:
    net = ml.build(BY_EXAMPLE["tiny_linear_vit"])
    groups = _optimizer_groups(net, layer_decay=0.5)
    scales = {n: s for n, (_, s) in groups.items()}
    blocks = len(net.stages[0].blocks)
    assert scales["stem.conv.weight"] == scales["stages.0.prefix.tokens.0"] == scales["stages.0.pos_embed.weight"]
    per_block = [scales[f"stages.0.blocks.{j}.norm1.weight"] for j in range(blocks)]
    assert per_block == sorted(set(per_block)) and scales["stem.conv.weight"] < per_block[0]
    assert max(per_block) < max(scales.values()) == scales["head.fc.0.weight"]
    assert net.no_weight_decay() == {"stages.0.prefix.tokens.0", "stages.0.pos_embed.weight"}


@pytest.mark.parametrize("example", ["tiny_caformer", "tiny_linear_vit"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(example: str) -> None:
    def step(net: Network, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        net.zero_grad()
        torch.manual_seed(seed)  # drop path draws the same masks in both runs
        loss = net(x).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    net = ml.build(BY_EXAMPLE[example], input_size=None).train()
    x = torch.randn(2, *net.input_type.shape(1)[1:], generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = step(net)
    calls = _count_calls(net.stages[-1].blocks[0])
    net.set_grad_checkpointing(True)
    loss, grads = step(net)
    assert calls() == 2  # forward, then recomputed in the backward pass
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-6, atol=1e-7)


def _count_calls(module: nn.Module) -> Callable[[], int]:
    """A counter of ``module``'s forward calls from now on."""
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1

    module.register_forward_pre_hook(hook)  # a recomputation may stop early, before a forward hook
    return functools.partial(lambda c: c[0], count)


# --- the data config ------------------------------------------------------------------------------------

@pytest.mark.zoo
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "coatnet_0_rw_224",
                                  "caformer_s18"])
def test_resolve_data_config_gives_timms_data_config_for_zoo_models(name: str) -> None:
    reference, net = _meta_pair(name)
    ours, theirs = resolve_data_config({}, model=net), resolve_data_config({}, model=reference)
    assert ours == theirs
    assert ours["input_size"] == (3, *ml.load_spec(name).input.hw)
    cfg = net.pretrained_cfg
    assert cfg is net.default_cfg and cfg["url"] == "" and cfg["num_classes"] == net.num_classes
    modules = dict(net.named_modules())
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    assert all(c in modules for c in (cfg["first_conv"], *classifiers))


def test_resolve_data_config_of_a_spec_gives_its_input_size_and_imagenet_statistics() -> None:
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    net = ml.build(TINY_SPEC)
    config = resolve_data_config({}, model=net)
    assert config["input_size"] == (3, 32, 32)
    assert (config["mean"], config["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert net.pretrained_cfg["first_conv"] == "stem.conv" and net.pretrained_cfg["classifier"] == "head.fc"
