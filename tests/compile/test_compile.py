"""Compiled networks are ordinary modules: train/eval, channels_last, torch.compile, torch.export, ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES

import metaformer_lab as ml
from metaformer_lab.compile import Network

BY_NAME = {p.stem: p for p in EXAMPLES}


def _net_and_input(path: Path, batch: int = 2) -> tuple[Network, torch.Tensor]:
    graph = ml.to_graph(path)
    return ml.build(graph), torch.randn(graph.input_type.shape(batch))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_train_step_reaches_every_parameter(path: Path) -> None:
    net, x = _net_and_input(path)
    net.train()
    net(x).logsumexp(-1).sum().backward()
    silent = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not silent


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_eval_is_deterministic_and_channels_last_agrees(path: Path) -> None:
    net, x = _net_and_input(path)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
        c = net(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_drop_path_is_active_in_train_mode_only() -> None:
    net, x = _net_and_input(BY_NAME["tiny_caformer"])  # drop_path_rate 0.1
    rates = [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1) and min(rates) > 0
    net.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_initialisation_follows_timm() -> None:
    net, _ = _net_and_input(BY_NAME["tiny_caformer"])
    linear = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert linear.bias is None or not linear.bias.any()
    assert 0.01 < linear.weight.std().item() < 0.03  # trunc_normal_(std=.02)
    assert linear.weight.abs().max().item() <= 2.0  # truncated at +-2


def test_module_names_follow_the_graph() -> None:
    graph = ml.to_graph(BY_NAME["tiny_inception_hilo"])
    names = dict(ml.build(graph).named_modules())
    for node, data in graph.nodes(data=True):
        if data["kind"] in ("token_mixer", "channel_mixer", "norm", "stem", "downsample", "head", "pos_embed", "scale"):
            assert node in names, node


EXPORTED_FIRST = {"tiny_caformer", "tiny_swin", "tiny_class_attention", "tiny_global_query_attention",
                  "tiny_inception_mixer", "tiny_conv_attention_hybrid", "tiny_maxvit_style", "tiny_pvt"}
"""The examples the fast tier exports, one per structure the exporter sees differently: plain MetaFormer stages,
window masks, class tokens, a stage context, a composite mixer, conv and attention stages with BatchNorm, grid
partitions, spatial reduction. The full suite exports every example (about a second each, 37 s in all)."""


def test_the_examples_exported_first_are_examples() -> None:
    assert set(BY_NAME) >= EXPORTED_FIRST


@pytest.mark.export
@pytest.mark.parametrize("path", [pytest.param(p, marks=[] if p.stem in EXPORTED_FIRST else [pytest.mark.slow])
                                  for p in EXAMPLES], ids=[p.stem for p in EXAMPLES])
def test_torch_export_round_trip(path: Path) -> None:
    net, x = _net_and_input(path)
    net.eval()
    program = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_caformer", "tiny_class_attention", "tiny_pvt", "tiny_cmt_style",
                                  "tiny_maxvit_style", "tiny_mlp_mixers", "tiny_agent_attention"])
def test_torch_fx_traces_the_generic_blocks_and_the_deploy_form(name: str) -> None:
    """fx's symbolic trace (straight-line code, what benchmarks/small_inputs.py compares against) of networks whose
    ops have no data-dependent Python: a shape unpacked in the generic block or an attention op breaks it."""
    net = ml.build(BY_NAME[name], input_size=32).eval()
    x = torch.randn(net.input_type.shape(1))
    for module in (net, ml.deploy(net)):
        traced = torch.fx.symbolic_trace(module)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)


@pytest.mark.export
@pytest.mark.parametrize("name", ["tiny_caformer", pytest.param("tiny_swin", marks=pytest.mark.slow),
                                  pytest.param("tiny_inception_hilo", marks=pytest.mark.slow)])
def test_onnx_export_round_trip(tmp_path: Path, name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    net, x = _net_and_input(BY_NAME[name])
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.export
@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """Inductor as the latency tools run it. One network: a cold Inductor compile is about 30 s, and what others
    would add is Inductor's own codegen; every example is traced whole by ``torch.export`` above, and
    tests/latency/test_measure.py checks that each network compiled for timing is compiled on its own, at static
    shapes."""
    from metaformer_lab.latency.measure import compiled

    net, x = _net_and_input(BY_NAME["tiny_caformer"])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(net, "default")(x), net(x), rtol=1e-4, atol=1e-4)
