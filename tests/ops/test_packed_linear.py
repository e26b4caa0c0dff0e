"""PackedLinear (ops.packed): nn.Linear's outputs, gradients, state_dict and copies, with oneDNN's reordered weight
serving the large float32 CPU calls and F.linear everything else (small calls, autograd, tracing)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaformer_lab.ops import packed as packed_module
from metaformer_lab.ops.packed import PackedLinear, gelu_of, pack_linears

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
LARGE = (1, 196, 384)  # 196 x 384 x 1536 multiply-adds: over PackedLinear.min_macs
SMALL = (1, 4, 384)


@pytest.fixture(autouse=True)
def _reordered_for_large_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's own tests run it wherever a call is large (``auto`` picks it only where it is the faster on
    this host; its tests below set ``auto`` again)."""
    monkeypatch.setattr(PackedLinear, "kernel", "reordered")


def _pair(activation: str | None = None, bias: bool = True) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536, bias=bias)
    return linear, PackedLinear.of(copy.deepcopy(linear), activation)  # type: ignore[arg-type]


def _reference(linear: nn.Linear, x: torch.Tensor, activation: str | None) -> torch.Tensor:
    y = linear(x)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [LARGE, (196, 384), (1, 14, 14, 384), SMALL], ids=["tokens", "2d", "nhwc", "small"])
def test_outputs_match_linear_and_only_large_calls_use_the_reordered_weight(shape: tuple[int, ...],
                                                                            activation: str | None) -> None:
    linear, packed = _pair(activation)
    x = torch.randn(shape)
    with torch.inference_mode():
        y = packed(x)
        reference = _reference(linear, x, activation)
    assert y.shape == reference.shape
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    large = x.numel() * packed.out_features >= packed.min_macs
    assert large == (shape != SMALL)
    assert (packed._packed is not None) == large  # the kernel ran (and cached its weight) only on a large call


@needs_onednn
def test_a_changed_weight_is_reordered_again() -> None:
    linear, packed = _pair(bias=False)
    x = torch.randn(LARGE)
    with torch.no_grad():
        packed(x)
        first = packed._packed
        packed.weight.mul_(2)  # in place: same storage, new version
        linear.weight.mul_(2)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert packed._packed is not first
        packed.load_state_dict({"weight": 0.05 * torch.randn_like(packed.weight)})  # copied into the parameter
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight), rtol=1e-5, atol=1e-5)



@needs_onednn
def test_a_weight_made_under_inference_mode_runs_f_linear() -> None:
    """An inference tensor has no version counter, so a reordered copy of it could go stale unseen."""
    x = torch.randn(LARGE)
    with torch.inference_mode():
        linear, packed = _pair("gelu")
        torch.testing.assert_close(packed(x), _reference(linear, x, "gelu"), rtol=1e-5, atol=1e-5)
        packed.weight.mul_(2)  # in place, with no version bump
        linear.weight.mul_(2)
        torch.testing.assert_close(packed(x), _reference(linear, x, "gelu"), rtol=1e-5, atol=1e-5)
    assert packed._packed is None

def test_gradients_and_state_dict_are_linears() -> None:
    linear, packed = _pair("gelu")
    assert list(packed.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    x = torch.randn(LARGE)
    _reference(linear, x, "gelu").square().sum().backward()
    packed(x).square().sum().backward()  # autograd on: F.linear, whose gradients torch knows
    assert packed._packed is None
    torch.testing.assert_close(packed.weight.grad, linear.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed.bias.grad, linear.bias.grad, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_copies_and_pickles_leave_the_reordered_weight_out_and_still_run() -> None:
    linear, packed = _pair()
    x = torch.randn(LARGE)
    with torch.inference_mode():
        expected = packed(x)
    assert packed._packed is not None  # oneDNN's opaque tensor: neither copyable nor picklable
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(packed), torch.load(buffer, weights_only=False)):
        assert twin._packed is None and twin.activation == packed.activation
        with torch.inference_mode():
            torch.testing.assert_close(twin(x), expected)


@pytest.mark.parametrize("trace", ["fx", "export"])
def test_traced_forms_call_f_linear(trace: str) -> None:
    """torch.fx and torch.export (which torch.compile and the ONNX exporter build on) see F.linear and F.gelu."""
    linear, packed = _pair("gelu")
    x = torch.randn(2, 4, 384)  # under min_macs at batch 2, over it from batch 4: the choice hangs on the batch
    module = nn.Sequential(packed).eval()
    with torch.no_grad():
        if trace == "fx":
            traced = torch.fx.symbolic_trace(module)
        else:  # with a dynamic batch, as the ONNX exporter does: the call's size is symbolic
            traced = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        calls = {str(node.target) for node in traced.graph.nodes if node.op == "call_function"}
        assert any("linear" in c for c in calls) and any("gelu" in c for c in calls), calls
        assert not any("mkldnn" in c for c in calls), calls
        torch.testing.assert_close(traced(x), _reference(linear, x, "gelu"), rtol=1e-5, atol=1e-5)


def test_pack_linears_replaces_plain_linears_only_and_gelu_of_names_the_fusable_activations() -> None:
    class Custom(nn.Linear):
        pass

    module = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), Custom(8, 8)), nn.Conv2d(8, 8, 1))
    weight = module[0].weight
    pack_linears(module)
    assert type(module[0]) is PackedLinear and module[0].weight is weight
    assert type(module[1][0]) is PackedLinear and type(module[1][1]) is Custom and type(module[2]) is nn.Conv2d
    assert gelu_of(nn.GELU()) == "gelu" and gelu_of(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert gelu_of(nn.ReLU()) is None


def test_the_deploy_form_runs_an_mlps_gelu_in_fc1s_kernel() -> None:
    """timm's Mlp (ViT's) in the deploy form: fc1 a PackedLinear with the GELU, act gone, the same outputs; the
    other Linears packed plainly."""
    from timm.layers import Mlp

    import metaformer_lab as ml

    net = ml.build("vit_tiny_patch16_224").eval()
    deployed = ml.deploy(net)
    mlps = [m for m in deployed.modules() if type(m) is Mlp]
    assert mlps and all(type(m.fc1) is PackedLinear and m.fc1.activation == "gelu" and type(m.act) is nn.Identity
                        for m in mlps)
    assert all(type(m.fc2) is PackedLinear and m.fc2.activation is None for m in mlps)
    assert not [m for m in deployed.modules() if type(m) is nn.Linear]
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), net(x), rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("reordered_faster", [True, False])
def test_auto_runs_the_kernel_timed_the_faster_for_each_shape(monkeypatch: pytest.MonkeyPatch,
                                                              reordered_faster: bool) -> None:
    """``auto`` times both kernels on a shape's first large call (here the race's verdict is given), keeps the
    verdict for every later call of that shape in the process, and keeps no reordered copy where F.linear won."""
    monkeypatch.setattr(PackedLinear, "kernel", "auto")
    monkeypatch.setattr(packed_module, "CHOICES", {})
    races: list[int] = []

    def race(first: object, second: object) -> bool:
        races.append(1)
        return reordered_faster

    monkeypatch.setattr(packed_module, "_faster", race)
    linear, packed = _pair("gelu")
    other = PackedLinear.of(copy.deepcopy(linear), "gelu")
    x = torch.randn(LARGE)
    with torch.inference_mode():
        reference = _reference(linear, x, "gelu")
        torch.testing.assert_close(packed(x), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other(x), reference, rtol=1e-5, atol=1e-5)  # same shape: no second race
        packed(torch.randn(SMALL))  # small calls never race
    assert races == [1]
    assert list(packed_module.CHOICES.values()) == [reordered_faster]
    assert (packed._packed is not None) == reordered_faster and (other._packed is not None) == reordered_faster


@needs_onednn
def test_the_race_times_both_kernels_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real race: each kernel runs (warm-up and rounds) and the verdict is recorded for the call's shape."""
    monkeypatch.setattr(PackedLinear, "kernel", "auto")
    monkeypatch.setattr(packed_module, "CHOICES", {})
    calls = {"reordered": 0, "plain": 0}
    _, packed = _pair()
    for name in calls:
        real = getattr(packed, f"_{name}_call")
        monkeypatch.setattr(packed, f"_{name}_call", lambda x, real=real, name=name: calls.__setitem__(
            name, calls[name] + 1) or real(x))
    with torch.inference_mode():
        packed(torch.randn(LARGE))
    assert calls["reordered"] >= 6 and calls["plain"] >= 6  # a warm-up call and five rounds each, then the call
    ((rows, width, out, act, threads), _), = packed_module.CHOICES.items()
    assert (rows, width, out, act, threads) == (196, 384, 1536, None, torch.get_num_threads())


def test_plain_never_runs_the_reordered_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PackedLinear, "kernel", "plain")
    linear, packed = _pair()
    x = torch.randn(LARGE)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed._packed is None
