"""The deploy form (``metaformer_lab.deploy``, ``build(deploy=True)``, ``--deploy``): the same outputs in eval mode
(float32, within 1e-4) with inference-only structure folded away.

Every network is randomised first (its BatchNorm statistics, norm weights and biases, layer and res scales far from
their init), so a fold that is wrong, or missing where a test expects it, shows in the outputs or the structure."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import EXAMPLES, all_cases, case_id
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import CliRunner

import metaformer_lab
from metaformer_lab.cli import app
from metaformer_lab.compile.network import Block, Network
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.registry import Case, CompositeDef, Resolved
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.common import LayerScale
from metaformer_lab.ops.conv_mixers import DepthwiseConv
from metaformer_lab.ops.folds import fold_chain
from metaformer_lab.ops.norms import LayerNormSpec, build_norm
from metaformer_lab.spec.arch import TokenMixerSpec
from metaformer_lab.zoo import list_models
from metaformer_lab.zoo.fixed_point import perturb
from metaformer_lab.zoo.models import catalog

ATOL = 1e-4


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in eval mode with N(0, .02) noise on every weight, and per-channel parameters (norm weights and
    biases, layer and res scales) and BatchNorm statistics moved well away from their init."""
    perturb(module, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.normal_(0.0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            for p in m.parameters(recurse=False):
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def assert_same_outputs(train_form: nn.Module, deployed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = train_form.eval()(x), deployed(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count(module: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def tiny(block: str | dict[str, Any], *, layout: str = "maps", stem: dict[str, Any] | None = None,
         downsample: dict[str, Any] | None = None) -> dict[str, Any]:
    """A two-stage network on 3x32x32 around ``block`` (the second stage opens with ``downsample``, by default a
    2x2 conv)."""
    second: dict[str, Any] = {"depth": 1, "dim": 64, "layout": layout, "block": block,
                              "downsample": downsample or {"type": "conv", "kernel": 2, "stride": 2, "padding": 0}}
    return {"name": "deploy_test", "input": {"channels": 3, "size": 32}, "num_classes": 5,
            "stem": stem or {"type": "conv", "kernel": 4, "stride": 4, "padding": 0},
            "stages": [{"depth": 1, "dim": 32, "layout": layout, "block": block}, second],
            "head": {"type": "pool_norm_linear", "norm": {"type": "layernorm"}}}


def deployed_pair(spec: dict[str, Any] | str, input_size: int | None = None) -> tuple[Network, nn.Module]:
    net = randomized(metaformer_lab.build(spec, input_size=input_size))
    return net, metaformer_lab.deploy(net)  # type: ignore[return-value]


def check(spec: dict[str, Any] | str, input_size: int | None = None,
          smaller: bool = True, batch: int = 2) -> tuple[Network, nn.Module]:
    """Build, randomise and deploy ``spec``; assert the outputs agree and the deploy form is smaller (no larger
    with ``smaller=False``)."""
    net, deployed = deployed_pair(spec, input_size)
    assert_same_outputs(net, deployed, torch.randn(net.input_type.shape(batch)))
    assert num_params(deployed) < num_params(net) if smaller else num_params(deployed) <= num_params(net)
    return net, deployed


def block_parts(net: nn.Module, stage: int = 1) -> set[str]:
    block = net.stages[stage].blocks[0]  # type: ignore[index]
    assert isinstance(block, Block)
    return {name for b in block.branches for name in (*b.parts, *b.shortcut)}


# --- one test per foldable pattern ---------------------------------------------------------------


def test_batchnorm_folds_into_the_conv_before_it() -> None:
    """Stem conv stack, conv downsampler with a BN after it, an MLP with BNs on its layers (EfficientFormer)."""
    block = {"token_mixer": {"type": "dwconv", "kernel": 3}, "norm": None, "layer_scale": None,
             "channel_mixer": {"type": "mlp", "hidden_norm": {"type": "batchnorm"}, "out_norm": {"type": "batchnorm"}}}
    spec = tiny(block, stem={"type": "conv_stack", "strides": [2, 2]},
                downsample={"type": "conv", "norm_after": {"type": "batchnorm"}})
    net, deployed = check(spec)
    assert count(net, _BatchNorm) == 2 + 1 + 2 * 2
    assert count(deployed, _BatchNorm) == 0


def test_mbconv_batchnorms_fold_but_not_across_an_early_se() -> None:
    """EfficientViT's MBConv (BN after each conv) folds completely; CoAtNet's keeps the BN an early SE separates
    from its conv, and its pre-norm (an activation follows it)."""
    efficientvit = {"template": "metaformer", "channel_mixer": None, "norm": None,
                    "token_mixer": {"type": "mbconv", "norm": {"type": "batchnorm"}, "act": "hardswish",
                                    "out_norm": {"type": "batchnorm"}}}
    net, deployed = check(tiny(efficientvit))
    assert count(net, _BatchNorm) == 6 and count(deployed, _BatchNorm) == 0
    coatnet = {"template": "metaformer", "channel_mixer": None, "norm": None,
               "token_mixer": {"type": "mbconv", "pre_norm": {"type": "batchnorm"}, "pre_act": "silu",
                               "se_ratio": 0.25, "se_early": True, "norm": {"type": "batchnorm"}}}
    net, deployed = check(tiny(coatnet))
    assert count(net, _BatchNorm) == 6 and count(deployed, _BatchNorm) == 4  # expand BN folds; pre-norm, dw BN stay


@pytest.mark.parametrize("mixer", [{"type": "attention", "head_dim": 8}, {"type": "sepconv"},
                                   {"type": "dwconv", "kernel": 3}], ids=lambda m: m["type"])
def test_layer_scale_folds_into_the_last_layer_of_its_branch(mixer: dict[str, Any]) -> None:
    layout = "tokens" if mixer["type"] == "attention" else "maps"
    net, deployed = check(tiny({"token_mixer": mixer, "layer_scale": 1e-5}, layout=layout))
    assert count(net, LayerScale) == 4 and count(deployed, LayerScale) == 0
    assert {"layer_scale1", "layer_scale2"} <= block_parts(net) and not block_parts(deployed) & {
        "layer_scale1", "layer_scale2"}


def test_pooling_passes_the_norm_weight_to_its_layer_scale() -> None:
    """PoolFormer: ``pool(x) - x`` has no layer to take the scale (AvgPool without its padding is no fixed
    depthwise conv at the borders), but the norm's weight passes through it into that scale and its bias drops
    out; the MLP branch's scale and norm affine fold into the MLP."""
    net, deployed = check(tiny("poolformer"))
    assert count(net, LayerScale) == 4 and count(deployed, LayerScale) == 2
    assert "layer_scale1" in block_parts(deployed) and "layer_scale2" not in block_parts(deployed)
    norm1 = deployed.stages[1].blocks[0].norm1
    assert norm1.weight is None and norm1.bias is None


def test_res_scale_folds_into_a_shortcut_conv_only() -> None:
    """``rs * shortcut(x)``: into the shortcut's conv when there is one; an identity shortcut keeps it."""
    down = {"token_mixer": {"type": "mbconv", "stride": 2, "out_dim": 64}, "channel_mixer": None, "norm": None,
            "shortcut": {"type": "conv", "kernel": 1, "stride": 2, "padding": 0}, "res_scale": 1.0}
    spec = tiny({"token_mixer": {"type": "dwconv", "kernel": 3}, "res_scale": 1.0})
    spec["stages"][1]["block"] = [down]
    net, deployed = check(spec)
    assert "res_scale1" in block_parts(net) and "res_scale1" not in block_parts(deployed)
    assert {"res_scale1", "res_scale2"} <= block_parts(deployed, stage=0)


@pytest.mark.parametrize(("block", "layout"), [({"base": "vit", "token_mixer": {"num_heads": 2}}, "tokens"),
                                               ("convformer", "maps"), ("caformer", "tokens")],
                         ids=["vit", "convformer", "caformer"])
def test_norm_affine_folds_into_the_next_linear(block: str | dict[str, Any], layout: str) -> None:
    """A LayerNorm's weight (and bias) move into qkv / fc1 / pwconv1; the norm stays, without its affine."""
    net, deployed = check(tiny(block, layout=layout))
    for name in ("norm1", "norm2"):
        before, after = getattr(net.stages[1].blocks[0], name), getattr(deployed.stages[1].blocks[0], name)
        assert before.weight is not None and not torch.equal(before.weight, torch.ones_like(before.weight))
        assert_plain_layer_norm(after)


def assert_plain_layer_norm(norm: torch.nn.Module) -> None:
    """What a layer norm keeps once its affine moved: no parameters, and a weight of ones that is no state (torch's
    CPU layer_norm is about twice as slow without a weight), so its state_dict is empty."""
    assert norm.bias is None and not list(norm.parameters()) and not norm.state_dict()
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_the_deploy_form_runs_channels_last_maps_from_a_contiguous_input() -> None:
    """Its 4-D weights are channels-last (the training form's stay as they were), so the stem hands on channels-last
    maps though the input is contiguous; the outputs agree (``check``)."""
    net, deployed = check(tiny("poolformer"))
    convs = [m for m in deployed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(m.weight.is_contiguous() for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[torch.Tensor] = []
    deployed.stages[0].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        deployed(torch.randn(net.input_type.shape(1)))
    assert seen[0].shape[-1] > 1 and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()


def test_convnext_norm_and_layer_scale_fold_into_the_mlp() -> None:
    net, deployed = check(tiny("convnext", downsample={"type": "conv", "kernel": 2, "stride": 2, "padding": 0,
                                                       "norm_before": {"type": "layernorm"}}))
    block = deployed.stages[1].blocks[0]
    assert_plain_layer_norm(block.norm)
    assert "layer_scale" not in block_parts(deployed)
    assert_plain_layer_norm(deployed.stages[1].downsample.norm)  # into the unpadded conv after it


def test_affine_norm_folds_away_before_a_linear() -> None:
    """ResMLP's ``Aff`` is nothing but an affine: before the MLP it folds away; before the token linear (which
    mixes tokens, not channels) it stays."""
    net, deployed = check(tiny("resmlp", layout="tokens"))
    assert "norm2" in block_parts(net) and "norm2" not in block_parts(deployed) and "norm1" in block_parts(deployed)


def test_batchnorm_as_a_block_norm_folds_into_the_mlp() -> None:
    net, deployed = check(tiny({"token_mixer": {"type": "dwconv", "kernel": 3}, "norm": {"type": "batchnorm"}}))
    assert "norm2" not in block_parts(deployed) and "norm1" in block_parts(deployed)  # dwconv pads: no shift


def test_post_norm_takes_the_layer_scale() -> None:
    net, deployed = check(tiny({"template": "postnorm", "token_mixer": {"type": "dwconv", "kernel": 3},
                                "layer_scale": 1e-5}))
    assert count(deployed, LayerScale) == 0


def test_parallel_depthwise_convs_become_one() -> None:
    mixer = {"type": "parallel", "branches": [{"type": "dwconv", "kernel": 3}, {"type": "dwconv", "kernel": [1, 5]},
                                              {"type": "identity"}]}
    net, deployed = check(tiny({"token_mixer": mixer}))
    assert count(net, DepthwiseConv) == 4 and count(deployed, DepthwiseConv) == 2
    assert deployed.stages[0].blocks[0].token_mixer.dw.kernel_size == (3, 5)


def test_nothing_to_fold_leaves_the_outputs() -> None:
    """A network with nothing foldable deploys to the same function and the same size."""
    spec = tiny({"token_mixer": {"type": "pooling"}, "norm": {"type": "layernorm", "affine": False},
                 "channel_mixer": None})
    net, deployed = deployed_pair(spec)
    assert_same_outputs(net, deployed, torch.randn(net.input_type.shape(2)))
    assert num_params(deployed) == num_params(net)


def test_an_identity_part_keeps_its_name() -> None:
    """IdentityFormer's token mixer is an identity by spec, not by folding: it stays in the block."""
    net, deployed = check(tiny("identityformer"))
    assert "token_mixer" in block_parts(deployed) and isinstance(deployed.stages[1].blocks[0].token_mixer, nn.Identity)


# --- every op, as its cases build it -----------------------------------------------------------------

CASES = all_cases()


def _case_module(opdef: Any, case: Case) -> nn.Module:
    if isinstance(opdef, CompositeDef):
        from pydantic import TypeAdapter

        spec = TypeAdapter(TokenMixerSpec).validate_python({"type": opdef.tag, **case.config})
        children = [TOKEN_MIXERS.of_spec(c).make(c, t, dim) for c, (t, dim) in
                    zip(opdef.branches(spec), opdef.branch_inputs(spec, case.input), strict=True)]
        return opdef.build(spec, Resolved(case.input, case.input), children)
    spec = opdef.spec.model_validate({"type": opdef.tag, **case.config})
    return opdef.make(spec, case.input, case.out_dim)


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_every_op_deploys_to_the_same_outputs(item: tuple[str, Any, Case]) -> None:
    _, opdef, case = item
    module = randomized(_case_module(opdef, case))
    assert_same_outputs(module, metaformer_lab.deploy(module), torch.randn(case.input.shape(2)))


MIXER_CASES = [c for c in CASES if c[0] in ("token_mixer", "channel_mixer")]


@pytest.mark.parametrize("item", MIXER_CASES, ids=[case_id(c) for c in MIXER_CASES])
def test_every_mixer_takes_the_norm_before_and_the_scale_after_it(item: tuple[str, Any, Case]) -> None:
    """``layer_scale(mixer(norm(x)))`` as a block branch runs it, folded as the block folds it: each mixer's
    ``reads`` and ``writes`` are exact where declared (a LayerNorm's weight and bias into the first, a scale
    into the last)."""
    _, opdef, case = item
    mixer = _case_module(opdef, case)
    y = mixer.eval()(torch.randn(case.input.shape(1)))
    out = case.input.with_channels(y.shape[1 if case.input.layout == "maps" else -1])
    parts = [build_norm(LayerNormSpec(), case.input), mixer, LayerScale(out.channels, 1e-5, out.layout)]
    chain = randomized(nn.Sequential(*parts))
    folded = nn.Sequential(*fold_chain(copy.deepcopy(chain)))
    assert_same_outputs(chain, folded, torch.randn(case.input.shape(2)))


# --- the API ---------------------------------------------------------------------------------------


def test_deploy_leaves_the_training_module_untouched() -> None:
    net = randomized(metaformer_lab.build("poolformer_s12", input_size=64)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    deployed = metaformer_lab.deploy(net)
    assert net.training and not deployed.training
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(deployed.state_dict()) < len(before)


def test_build_deploy_gives_the_deploy_form_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = metaformer_lab.build("convnext_atto", input_size=64)
    torch.manual_seed(0)
    deployed = metaformer_lab.build("convnext_atto", input_size=64, deploy=True)
    assert not deployed.training and num_params(deployed) < num_params(net)
    assert_same_outputs(net, deployed, torch.randn(2, 3, 64, 64))


def test_deploy_form_keeps_the_timm_protocol() -> None:
    net, deployed = deployed_pair("caformer_s18", input_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net.forward_intermediates(x, intermediates_only=True),
                        deployed.forward_intermediates(x, intermediates_only=True), strict=True):
            assert (a - b).abs().max().item() <= ATOL
        a, b = net.forward_head(net.forward_features(x), pre_logits=True), deployed.forward_head(
            deployed.forward_features(x), pre_logits=True)
    assert (a - b).abs().max().item() <= ATOL
    assert deployed.feature_info == net.feature_info
    deployed.reset_classifier(3)
    assert deployed(x).shape == (1, 3)
    backbone = metaformer_lab.build("caformer_s18", input_size=64, deploy=True, features_only=True)
    assert [f.shape[1] for f in backbone(x)] == [64, 128, 320, 512]


# --- the zoo -----------------------------------------------------------------------------------------

FAST = ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18", "identityformer_s12",
        "randformer_s12", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224",
        "convit_tiny", "convnext_atto", "swin_tiny_patch4_window7_224", "pvt_v2_b0", "pvt_v2_b2_li",
        "twins_svt_small", "mixer_s16_224", "resmlp_12_224", "efficientformer_l1", "efficientvit_b0",
        "coatnet_0_rw_224", "focalnet_tiny_srf", "swinv2_tiny_window8_256", "pvt_tiny", "visformer_tiny",
        "maxvit_tiny_tf_224", "cmt_tiny", "conv2former_nano", "crossformer_tiny", "cvt_13", "deepvit_small",
        "litv2_small", "localvit_tiny", "shuffle_tiny", "t2t_vit_t_14", "cswin_tiny", "shunted_tiny", "ceit_tiny",
        "agent_pvt_tiny", "biformer_tiny", "dilateformer_tiny", "focal_tiny", "gcvit_xxtiny", "iformer_small",
        "mvit_base_16", "smt_tiny", "transnext_micro"]
"""A few zoo models, every family among them (a test checks), each at a small input where its spec allows."""
NOTHING_FOLDS = {"swinv2_tiny_window8_256"}
"""Residual post-norm everywhere: each norm's output feeds a residual sum, so no layer can take its affine."""
NEW_BIASES = {"visformer_tiny"}
"""Every norm folds, but into bias-free convs: each BatchNorm (2C values) leaves the conv a new bias as wide as its
output (qkv 3C, fc1 2C or 4C), so the deploy form runs fewer layers with a few more parameters."""


def _small(name: str) -> int | None:
    """The smallest input size the model's spec accepts among a few (None: its own)."""
    for size in (64, 96, 128, 160):
        try:
            metaformer_lab.to_graph(name, input_size=size)
        except SpecError:
            continue
        return size
    return None


def test_the_fast_zoo_models_cover_every_family() -> None:
    families = {model.family for model in catalog().values()}
    assert {catalog()[name].family for name in FAST} == families


@pytest.mark.zoo
@pytest.mark.parametrize("name", FAST)
def test_zoo_model_deploys(name: str) -> None:
    if name in NEW_BIASES:
        net, deployed = deployed_pair(name, _small(name))
        assert_same_outputs(net, deployed, torch.randn(net.input_type.shape(2)))
        norms = [sum(isinstance(m, nn.BatchNorm2d) for m in module.modules()) for module in (net, deployed)]
        assert norms[1] < norms[0]
        return
    check(name, _small(name), smaller=name not in NOTHING_FOLDS)


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in FAST])
def test_every_zoo_model_deploys(name: str) -> None:
    """A batch of one: FAST's model of the family ran a batch of two (folding never mixes samples)."""
    check(name, _small(name), batch=1)


# --- the command line ------------------------------------------------------------------------------

runner = CliRunner()


def test_build_deploy_reports_fewer_params() -> None:
    params = {}
    for flag in ([], ["--deploy"]):
        result = runner.invoke(app, ["build", "poolformer_s12", "--input-size", "64", "--json", *flag])
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["trainable_params"] == summary["params"]  # folded weights stay ordinary parameters
        params[bool(flag)] = summary["params"]
    assert params[True] < params[False] == 11_915_176


@pytest.mark.export
@pytest.mark.parametrize("name", ["efficientformer_l1", pytest.param("caformer_s18", marks=pytest.mark.slow)])
def test_export_deploy_onnx_matches_pytorch(tmp_path: Path, name: str) -> None:
    """The exported deploy form runs in onnxruntime (when installed) with the deploy form's PyTorch outputs."""
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", name, "--format", "onnx", "--out", str(out), "--input-size", "64",
                                 "--deploy", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] <= ATOL and "onnxruntime" in report["checked_with"]
    import onnx

    graph = onnx.load(str(out)).graph
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)


# --- made under inference_mode -------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_a_network_built_and_deployed_under_inference_mode_gives_the_same_outputs(path: Path) -> None:
    """Its parameters are inference tensors (no version counters, no autograd): every op and fold still runs, and
    what an op keeps between calls (a position bias, a reordered weight) is never read stale."""
    torch.manual_seed(0)
    x = torch.randn(metaformer_lab.build(path).input_type.shape(2))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = metaformer_lab.deploy(metaformer_lab.build(path).eval())(x)
    with torch.inference_mode():
        torch.manual_seed(1)
        deployed = metaformer_lab.deploy(metaformer_lab.build(path).eval())
        first, second = deployed(x), deployed(x)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)
