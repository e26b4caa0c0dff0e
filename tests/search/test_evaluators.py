"""Evaluators: every proxy on example specs, the caller's module untouched, training curves, failures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_SPEC as TINY
from torch import Tensor, nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.network import Network
from metaformer_lab.core.errors import StudyError
from metaformer_lab.graph.lower import lower
from metaformer_lab.search.datasets import Dataset, DatasetError, load_dataset
from metaformer_lab.search.evaluators import (
    PROXIES,
    EvalResult,
    Evaluator,
    NonFiniteLoss,
    ProxyUndefined,
    TrainEvaluator,
    ZeroCostEvaluator,
    make_evaluator,
    synflow_score,
)
from metaformer_lab.spec.load import read_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

"""A net that trains on digits in a second or two on one CPU thread."""

FAST: dict[str, Any] = {"batch_size": 32, "lr": 5e-3}


def _net(source: str | dict[str, Any]) -> Network:
    spec = read_spec(str(EXAMPLES / source) if isinstance(source, str) else source)
    return compile_graph(lower(spec))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", input_size=32)


def _snapshot(net: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[Tensor | None]]:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return state, [m.training for m in net.modules()], [p.grad for p in net.parameters()]


def _assert_unchanged(net: nn.Module, before: tuple[dict[str, Tensor], list[bool], list[Tensor | None]]) -> None:
    state, modes, grads = before
    after = net.state_dict()
    assert state.keys() == after.keys()
    assert all(v.dtype == after[k].dtype and torch.equal(v, after[k]) for k, v in state.items())
    assert [m.training for m in net.modules()] == modes
    assert all(g is None for g in grads) and all(p.grad is None for p in net.parameters())


# --- zero-cost ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("proxy", PROXIES)
@pytest.mark.parametrize("example", ["tiny_caformer.yaml", "tiny_metaformer_baselines.yaml", "tiny_linear_vit.yaml"])
def test_proxy_is_finite_and_leaves_the_module(example: str, proxy: str, digits: Dataset) -> None:
    net = _net(example)
    before = _snapshot(net)
    rng = torch.get_rng_state()
    result = ZeroCostEvaluator(proxy=proxy, batch_size=32).evaluate(net, digits)  # type: ignore[arg-type]
    assert isinstance(result, EvalResult) and math.isfinite(result.score)
    assert result.metrics["num_params"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert result.seconds > 0 and result.history == [] and result.details["proxy"] == proxy
    _assert_unchanged(net, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_params_proxy_is_the_log_count(digits: Dataset) -> None:
    net = _net(TINY)
    result = ZeroCostEvaluator(proxy="params").evaluate(net, digits)
    assert result.score == pytest.approx(math.log(sum(p.numel() for p in net.parameters())))


def test_naswot_tells_nets_apart_and_is_seeded(digits: Dataset) -> None:
    evaluator = ZeroCostEvaluator(proxy="naswot", batch_size=32)
    small, other = _net(TINY), _net("tiny_metaformer_baselines.yaml")
    a = evaluator.evaluate(small, digits, seed=0)
    assert evaluator.evaluate(small, digits, seed=0).score == a.score
    assert evaluator.evaluate(other, digits, seed=0).score != pytest.approx(a.score, rel=1e-3)
    assert evaluator.evaluate(small, digits, seed=1).score != a.score  # another batch
    assert a.metrics["naswot_units"] > 0


def test_naswot_floor_without_codes(digits: Dataset) -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    result = ZeroCostEvaluator(proxy="naswot", batch_size=8).evaluate(linear, digits)
    assert result.score == 0.0 and result.metrics["naswot_units"] == 0
    fc = nn.Linear(3 * 32 * 32, 10)
    always_on = nn.Sequential(nn.Flatten(), fc, nn.ReLU())  # every code the same
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.fill_(1.0)
    result = ZeroCostEvaluator(proxy="naswot", batch_size=8).evaluate(always_on, digits)
    assert result.metrics["naswot_units"] == 10 and 0 < result.score < 8 * math.log(10 * 8 + 1)


def test_synflow_undefined_without_gradients(digits: Dataset) -> None:
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    frozen.requires_grad_(False)
    with pytest.raises(ProxyUndefined) as info:
        ZeroCostEvaluator(proxy="synflow").evaluate(frozen, digits)
    assert info.value.reason == "proxy_undefined"


def _deep_relu_mlp(depth: int, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(3 * 32 * 32, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def test_synflow_does_not_overflow_on_deep_nets(digits: Dataset) -> None:
    mlp = _deep_relu_mlp(120)
    with torch.no_grad():  # this net overflows float32 once its weights are made positive
        positive = _deep_relu_mlp(120)
        positive.load_state_dict(mlp.state_dict())
        for p in positive.parameters():
            p.abs_()
        assert not torch.isfinite(positive(torch.ones(1, 3, 32, 32)).sum())
    score = ZeroCostEvaluator(proxy="synflow").evaluate(mlp, digits).score
    assert math.isfinite(score) and score > math.log(torch.finfo(torch.float32).max)
    deep = {**TINY, "name": "deep", "stages": [{**stage, "depth": 8} for stage in TINY["stages"]]}
    assert math.isfinite(ZeroCostEvaluator(proxy="synflow").evaluate(_net(deep), digits).score)


def test_synflow_works_on_a_copy_only() -> None:
    net = _net(TINY)
    work = _net(TINY)
    work.load_state_dict(net.state_dict())
    assert math.isfinite(synflow_score(work, (1, 3, 32, 32)))
    assert all(p.dtype == torch.float64 and (p >= 0).all() for p in work.parameters())


def test_grad_norm_nan_at_init(digits: Dataset) -> None:
    with pytest.raises(NonFiniteLoss) as info:
        ZeroCostEvaluator(proxy="grad_norm", batch_size=8).evaluate(_NaNNet(), digits)
    assert info.value.reason == "nan_loss"


def test_data_must_fit_the_network() -> None:
    small = load_dataset("synthetic:20", input_size=16)
    with pytest.raises(DatasetError) as info:
        ZeroCostEvaluator(proxy="params").evaluate(_net(TINY), small)
    assert [str(i) for i in info.value.issues] == [
        "--dataset: images are 3x16x16, but the network takes 3x32x32; load the data at the network's input size "
        "and channels"]


# --- short training ----------------------------------------------------------------------------------

class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1)) * float("nan")


def test_training_learns_digits_and_reports_each_epoch(digits: Dataset) -> None:
    net = _net(TINY)
    before = _snapshot(net)
    calls: list[tuple[int, float]] = []
    result = TrainEvaluator(epochs=2, **FAST).evaluate(net, digits, report=lambda e, a: calls.append((e, a)))
    assert [e for e, _ in calls] == [1, 2] and calls[-1][1] == result.score
    assert result.score > 0.5  # chance is 0.1; this net reaches about 0.75 after 2 epochs
    assert result.score == result.metrics["val_acc"] == result.history[-1]["val_acc"]
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    assert result.metrics["epochs"] == 2 and result.metrics["steps"] == 2 * (digits.num_train // 32)
    assert result.metrics["samples_per_s"] > 0 and result.metrics["train_loss"] < math.log(10)
    assert result.details["precision"] == "float32"
    _assert_unchanged(net, before)


def test_training_is_seeded(digits: Dataset) -> None:
    net = _net(TINY)
    evaluator = TrainEvaluator(epochs=1, max_batches_per_epoch=6, **FAST)
    first, again, other = (evaluator.evaluate(net, digits, seed=s) for s in (3, 3, 4))
    assert again.score == first.score and _curve(again) == _curve(first)
    assert _curve(other) != _curve(first)
    assert first.metrics["steps"] == 6


def _curve(result: EvalResult) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]


class _Pruned(Exception):
    pass


def test_an_exception_from_report_propagates(digits: Dataset) -> None:
    calls: list[int] = []

    def report(epoch: int, value: float) -> None:
        calls.append(epoch)
        raise _Pruned

    with pytest.raises(_Pruned):
        TrainEvaluator(epochs=3, max_batches_per_epoch=2, **FAST).evaluate(_net(TINY), digits, report=report)
    assert calls == [1]


@pytest.mark.parametrize("case", ["nan-module", "huge-lr"])
def test_nan_loss_raises(case: str, digits: Dataset) -> None:
    net, lr = (_NaNNet(), 1e-3) if case == "nan-module" else (_net(TINY), 1e6)
    with pytest.raises(NonFiniteLoss) as info:
        TrainEvaluator(epochs=2, batch_size=32, lr=lr, warmup_fraction=0,
                       max_batches_per_epoch=10).evaluate(net, digits)
    assert info.value.reason == "nan_loss" and "epoch 1" in str(info.value)


def test_out_of_memory_propagates(digits: Dataset) -> None:
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

        def forward(self, x: Tensor) -> Tensor:
            raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        TrainEvaluator(epochs=1, max_batches_per_epoch=1).evaluate(Hungry(), digits)


def test_threads_are_restored(digits: Dataset) -> None:
    before = torch.get_num_threads()
    TrainEvaluator(epochs=1, max_batches_per_epoch=1, threads=2, **FAST).evaluate(_net(TINY), digits)
    assert torch.get_num_threads() == before


# --- by name -----------------------------------------------------------------------------------------

def test_make_evaluator() -> None:
    zero = make_evaluator("zero-cost", proxy="synflow")
    assert isinstance(zero, ZeroCostEvaluator) and zero.proxy == "synflow" and isinstance(zero, Evaluator)
    train = make_evaluator("train", epochs=5)
    assert isinstance(train, TrainEvaluator) and train.epochs == 5
    assert train.options()["evaluator"] == "train" and train.options()["epochs"] == 5


@pytest.mark.parametrize(("name", "options", "line"), [
    pytest.param("trian", {}, "--evaluator: unknown 'trian' (did you mean 'train'?); use zero-cost, train",
                 id="name"),
    pytest.param("zero-cost", {"proxi": "naswot"}, "--evaluator zero-cost: unknown option 'proxi' (did you mean "
                                                   "'proxy'?); zero-cost takes proxy, batch_size, threads, max_memory",
                 id="option"),
    pytest.param("zero-cost", {"proxy": "synflw"}, "--proxy: unknown 'synflw' (did you mean 'synflow'?); use naswot, "
                                                   "synflow, grad_norm, params", id="proxy"),
    pytest.param("train", {"epochs": 0}, "--epochs: 0 is not positive", id="epochs"),
    pytest.param("train", {"warmup_fraction": 1.0}, "--warmup-fraction: 1 must lie in [0, 1)", id="warmup"),
    pytest.param("train", {"amp": "fp8"}, "--amp: unknown 'fp8'; use auto, off, bf16, fp16", id="amp"),
])
def test_make_evaluator_errors(name: str, options: dict[str, Any], line: str) -> None:
    with pytest.raises(StudyError) as info:
        make_evaluator(name, **options)
    assert [str(i) for i in info.value.issues] == [line]
