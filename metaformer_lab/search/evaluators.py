"""Evaluators: score a compiled candidate on a dataset, higher is better.

Two kinds, chosen by name with :func:`make_evaluator`:

- ``zero-cost`` (:class:`ZeroCostEvaluator`): a training-free proxy computed at initialisation — NASWOT,
  SynFlow, grad-norm, or the (log) parameter count every proxy has to beat;
- ``train`` (:class:`TrainEvaluator`): a few epochs of AdamW with a cosine schedule, scored by the final
  validation accuracy and reported after every epoch, so a pruner can stop it early.

Evaluators know nothing of Optuna: a caller that prunes raises from its ``report`` callback, and the
exception goes through untouched.

Both bound their memory before allocating: given ``max_memory``, an evaluator estimates its step on the meta
device (:mod:`metaformer_lab.search.memory`) before it copies or runs the candidate, splits a batch that does
not fit into micro-batches over the same images (the score is the same quantity, so candidates stay
comparable), and raises :class:`MemoryLimitExceeded` (reason ``out_of_memory``) for a candidate that does not
fit even one image at a time, with nothing allocated for it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast, get_args

import torch
import torch.nn.functional as F
from timm.layers import DropPath, QuickGELU
from timm.models.metaformer import SquaredReLU, StarReLU
from torch import Tensor, nn

from metaformer_lab.core.errors import Issue, StudyError
from metaformer_lab.core.sizes import format_bytes
from metaformer_lab.search.datasets import Dataset, DatasetError
from metaformer_lab.search.memory import MemoryEstimate, estimate_step
from metaformer_lab.search.study import Outcome

Report = Callable[[int, float], None]
"""``report(epoch, value)``: called by an evaluator as it goes; may raise (``optuna.TrialPruned``) to stop it."""

Proxy = Literal["naswot", "synflow", "grad_norm", "params"]
PROXIES: tuple[str, ...] = get_args(Proxy)
Amp = Literal["auto", "off", "bf16", "fp16"]

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, QuickGELU,
    StarReLU, SquaredReLU,
)
"""The modules whose inputs give NASWOT's binary codes (``input > 0``: the unit is "on")."""

_STOCHASTIC: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, DropPath)


# --- results and failures ------------------------------------------------------------------------

class EvaluationFailed(Exception):
    """A candidate could not be scored. Not an input error: the search records :attr:`reason` for the trial
    and goes on with the next one."""

    reason: ClassVar[Outcome] = Outcome.EVALUATION_FAILED


class NonFiniteLoss(EvaluationFailed):
    """The loss became NaN or infinite (a diverging or broken candidate)."""

    reason: ClassVar[Outcome] = Outcome.NAN_LOSS

    def __init__(self, where: str, value: float) -> None:
        super().__init__(f"the loss is {value} at {where}")
        self.where, self.value = where, value


class ProxyUndefined(EvaluationFailed):
    """A zero-cost proxy has no value for this candidate (SynFlow overflows float64, no weight gets a gradient)."""

    reason: ClassVar[Outcome] = Outcome.PROXY_UNDEFINED


class MemoryLimitExceeded(EvaluationFailed):
    """Even one image at a time, a step would need more than ``max_memory``: raised before anything is
    allocated for the candidate (no copy, no forward).

    Attributes:
        estimate: the step's estimate at the smallest micro-batch tried (one image).
        limit: ``max_memory``, in bytes.
    """

    reason: ClassVar[Outcome] = Outcome.OUT_OF_MEMORY

    def __init__(self, what: str, estimate: MemoryEstimate, limit: int) -> None:
        super().__init__(f"{what} needs {estimate.describe()} > limit {format_bytes(limit)} (--max-memory)")
        self.what, self.estimate, self.limit = what, estimate, limit

    def __reduce__(self) -> tuple[Any, ...]:  # picklable to and from worker processes
        return type(self), (self.what, self.estimate, self.limit)


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation gives.

    Attributes:
        score: what the search maximises.
        metrics: numbers worth recording (``num_params`` always; ``val_acc``, ``train_loss``, ... for training).
        seconds: wall time of the evaluation, copying the module included.
        history: one mapping per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_acc``, ``lr``, ``seconds``);
            empty for zero-cost proxies.
        details: strings worth recording (``proxy``, ``device``, ``precision``).
    """

    score: float
    metrics: dict[str, float]
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)


class Evaluator(ABC):
    """Scores a candidate module on a dataset.

    Contract, for every evaluator:

    - ``net`` is the caller's module (a compiled ``Network``: ``net.input_type`` is its input type). It is
      never changed: the evaluator works on a deep copy (parameters, buffers, modes and gradients stay as
      they were), so one module can be scored by several evaluators in turn.
    - ``score`` is higher-is-better and finite.
    - ``report(epoch, value)``, when given, is called with increasing epochs as intermediate values become
      known; whatever it raises propagates unchanged (the evaluation stops there).
    - A candidate that cannot be scored raises an :class:`EvaluationFailed` subclass with a ``reason``;
      running out of memory propagates as ``torch.OutOfMemoryError``; data that does not fit the network
      raises :class:`~metaformer_lab.search.datasets.DatasetError`.
    - With ``max_memory`` (bytes), memory is bounded before anything is allocated for the candidate: the step
      is estimated on the meta device, a batch that does not fit is split into micro-batches (the largest
      power-of-two split that fits, ``details["micro_batch"]`` such as ``"16x4"``) whose gradients add up to
      the whole batch's, and a candidate that does not fit one image at a time raises
      :class:`MemoryLimitExceeded`; ``metrics["est_peak_bytes"]`` is the estimate. None: no estimate.
    - ``seed`` fixes every random choice (the batch, the shuffling, dropout); on CPU the same seed gives the
      same score. The global torch RNG is left as it was.
    - Evaluators are plain, picklable values (options only), so they can be sent to worker processes.
    """

    name: ClassVar[str]

    @abstractmethod
    def evaluate(self, net: nn.Module, data: Dataset, *, report: Report | None = None, seed: int = 0,
                 device: str | torch.device = "cpu") -> EvalResult:
        """Score ``net`` on ``data``; see the class docstring for the contract."""

    def options(self) -> dict[str, Any]:
        """The evaluator's name and options (JSON-ready), for a run's provenance."""
        values: dict[str, Any] = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"evaluator": self.name, **values}


# --- shared steps --------------------------------------------------------------------------------

def check_fits(net: nn.Module, data: Dataset) -> None:
    """Raise DatasetError if ``data``'s images or classes do not fit ``net`` (a module without
    ``input_type``/``output_type`` is not checked)."""
    issues = []
    want = getattr(net, "input_type", None)
    if want is not None and (want.channels, want.height, want.width) != (data.channels, *data.input_size):
        issues.append(Issue("--dataset", f"images are {data.channels}x{data.input_size[0]}x{data.input_size[1]}, "
                                         f"but the network takes {want.channels}x{want.height}x{want.width}; "
                                         f"load the data at the network's input size and channels"))
    out = getattr(net, "output_type", None)
    if out is not None and out.channels < data.num_classes:
        issues.append(Issue("--dataset", f"{data.num_classes} classes, but the network has {out.channels} outputs; "
                                         f"set num_classes to {data.num_classes}"))
    if issues:
        raise DatasetError(issues)


def num_params(net: nn.Module) -> int:
    """Trainable parameters (a parameter shared between modules counts once)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block, and give the caller's RNG state back afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _deterministic_train_mode(net: nn.Module) -> nn.Module:
    """Train mode (BatchNorm normalises with batch statistics) with dropout and drop path off."""
    net.train()
    for m in net.modules():
        if isinstance(m, _STOCHASTIC):
            m.eval()
    return net


@contextlib.contextmanager
def _modes(net: nn.Module, set_mode: Callable[[nn.Module], Any]) -> Iterator[None]:
    """``set_mode(net)`` for the block, every module's ``training`` flag restored afterwards (to estimate the
    caller's module in the mode its copy will run in)."""
    before = [(m, m.training) for m in net.modules()]
    try:
        set_mode(net)
        yield
    finally:
        for m, training in before:
            m.training = training


@dataclass(frozen=True)
class _Plan:
    """How an evaluation splits ``batch`` images: micro-batches of ``micro`` (the last one may be smaller)."""

    batch: int
    micro: int
    estimate: MemoryEstimate | None = None  # None: no limit, nothing estimated

    def split(self) -> str:
        return f"{self.micro}x{-(-self.batch // self.micro)}"


def _fit(what: str, batch: int, need: Callable[[int], MemoryEstimate], limit: int | None) -> _Plan:
    """The largest micro-batch, ``ceil(batch / 2**k)``, whose step ``need(micro)`` fits under ``limit``; the
    whole batch without a limit. Each try is a meta run (a second for the largest networks): one image is
    tried right after the whole batch, so a candidate that cannot fit fails after two.

    Raises:
        MemoryLimitExceeded: one image does not fit.
    """
    if limit is None:
        return _Plan(batch, batch)
    estimate = need(batch)
    if estimate.total <= limit:
        return _Plan(batch, batch, estimate)
    smallest = need(1) if batch > 1 else estimate
    if smallest.total > limit:
        raise MemoryLimitExceeded(what, smallest, limit)
    parts = 2
    while (micro := -(-batch // parts)) > 1:
        if (estimate := need(micro)).total <= limit:
            return _Plan(batch, micro, estimate)
        parts *= 2
    return _Plan(batch, 1, smallest)


def _image_bytes(data: Dataset) -> int:
    return data.channels * data.input_size[0] * data.input_size[1] * torch.float32.itemsize


def _probe_batch(data: Dataset, batch_size: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``batch_size`` train images chosen by ``seed`` (all of them when there are fewer)."""
    images, labels = data.train.tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return images[order].to(device, torch.float32), labels[order].to(device)


# --- zero-cost proxies ---------------------------------------------------------------------------

def naswot_score(net: nn.Module, images: Tensor, micro_batch: int | None = None) -> tuple[float, int]:
    """NASWOT (Mellor et al. 2021, "Neural Architecture Search without Training"): ``log det(K + I)`` with
    ``K[i, j] = N_A - hamming(c_i, c_j)``, where ``c_i`` is the binary code of image i over all N_A units.

    The paper reads the codes of ReLU units. Our networks use GELU, StarReLU, SiLU, ...: a unit's code is the
    sign of its pre-activation, ``input > 0``, at every module of :data:`ACTIVATIONS` (an activation inside
    another, StarReLU's ReLU, is read once). Activations called as functions are not seen. ``net`` runs as
    given (the caller sets its mode) under ``no_grad``.

    The paper takes ``log |det K|``; we add the identity (as if each image had one more unit of its own), so
    the score is finite and at least 0 even when codes coincide: a network whose units all agree on every
    image (no activation at all, or only GLU gates, which timm initialises open) scores 0, the floor. For
    the usual ``N_A`` of thousands of units the identity changes the other scores very little.

    ``micro_batch`` runs the images that many at a time (to bound memory): the codes of every micro-batch are
    kept, as bool, until the last one, and K is formed from all of them, so it is the whole batch's K (exactly,
    where nothing mixes images: BatchNorm in train mode normalises each micro-batch by its own statistics).

    Returns:
        (the score, N_A).
    """
    batch = images.shape[0]
    step = micro_batch or batch
    kernel = torch.zeros(batch, batch, dtype=torch.float64, device=images.device)
    kept: list[list[Tensor]] = []  # per activation call, the codes of each micro-batch so far
    at = {"rows": batch, "call": 0, "chunk": 0}
    units = [0]

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or x.numel() % at["rows"]:
            return
        codes = (x.detach() > 0).reshape(at["rows"], -1)  # (B, units): the unit is on
        if at["chunk"] == 0:
            units[0] += codes.shape[1]
        if step >= batch:
            _add_gram(kernel, codes)
        elif at["chunk"] == 0:
            kept.append([codes])
        elif at["call"] >= len(kept) or kept[at["call"]][0].shape[1] != codes.shape[1]:
            raise ProxyUndefined("naswot: the network's activations differ between micro-batches")
        else:
            kept[at["call"]].append(codes)
        at["call"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in _outer_activations(net)]
    try:
        with torch.no_grad():
            for chunk, first in enumerate(range(0, batch, step)):
                at.update(rows=min(step, batch - first), call=0, chunk=chunk)
                net(images[first:first + step])
    finally:
        for h in handles:
            h.remove()
    while kept:  # K from the codes of all micro-batches, each call's freed once added
        parts = kept.pop()
        if len(parts) != -(-batch // step):
            raise ProxyUndefined("naswot: the network's activations differ between micro-batches")
        _add_gram(kernel, torch.cat(parts))
    eye = torch.eye(batch, dtype=torch.float64, device=images.device)
    logdet = torch.linalg.slogdet((kernel + units[0]) / 2 + eye)[1]  # K = N_A - hamming, positive definite + I
    return logdet.item(), units[0]


_GRAM_CHUNK = 1 << 18
"""Float64 signs formed at a time by :func:`_add_gram` (2 MB). With its temporaries and the freed slices the
allocator keeps, this costs up to eight slices of memory (14 MB measured on CPU), whatever the batch."""


def _add_gram(kernel: Tensor, codes: Tensor) -> None:
    """``kernel += S S^T`` for the signs ``S = 2 codes - 1`` of bool ``codes`` (B, units), a slice of columns at a
    time so the float64 signs stay within :data:`_GRAM_CHUNK` elements. Exact whatever the slicing: every
    partial sum is an integer far below 2**53."""
    step = max(_GRAM_CHUNK // codes.shape[0], 1)
    for i in range(0, codes.shape[1], step):
        signs = codes[:, i:i + step].to(torch.float64) * 2 - 1  # in {-1, +1}
        kernel.addmm_(signs, signs.T)  # N_A - 2 * hamming, summed over modules


def _outer_activations(net: nn.Module) -> list[nn.Module]:
    found: list[str] = []
    modules = []
    for name, m in net.named_modules():
        if isinstance(m, ACTIVATIONS) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
            modules.append(m)
    return modules


def synflow_score(net: nn.Module, input_shape: tuple[int, ...]) -> float:
    """SynFlow (Tanaka et al. 2020, "Pruning neural networks without any data"): ``log sum |θ ⊙ ∂R/∂θ|`` with
    ``R = sum(f_|θ|(1))``, the output summed for an all-ones input through the network with every parameter
    replaced by its absolute value.

    Changes ``net`` (its parameters, dtype and mode): pass a copy. The network runs in float64 and in eval mode,
    so BatchNorm applies its (initial) running statistics, close to the identity, as the reference
    implementations remove BatchNorm; dropout and drop path are off. The sum is taken as a log-sum-exp of the
    logs of its terms, so it cannot overflow.

    Raises:
        ProxyUndefined: the float64 forward overflows, or no parameter gets a gradient.
    """
    net.double().eval()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ProxyUndefined("synflow: the network has no trainable parameter")
    with torch.no_grad():
        for p in params:
            p.abs_()
    net.zero_grad(set_to_none=True)
    out = net(torch.ones(input_shape, dtype=torch.float64, device=params[0].device))
    total = out.sum()
    if not torch.isfinite(total):
        raise ProxyUndefined("synflow: the all-ones forward overflows float64")
    if not total.requires_grad:
        raise ProxyUndefined("synflow: no parameter gets a gradient")
    total.backward()
    sums = []  # each parameter's log-sum-exp in turn: one parameter's terms in memory at a time, and no graph
    for p in params:
        if p.grad is None:
            continue
        with torch.no_grad():
            logs = (p * p.grad).abs_().log_().flatten()
            logs = logs[logs > -math.inf]  # zero terms add nothing to the sum
        if not torch.isfinite(logs).all():
            raise ProxyUndefined("synflow: no parameter gets a finite, nonzero gradient")
        if logs.numel():
            sums.append(torch.logsumexp(logs, dim=0))
    if not sums:
        raise ProxyUndefined("synflow: no parameter gets a finite, nonzero gradient")
    return torch.logsumexp(torch.stack(sums), dim=0).item()


def grad_norm_score(net: nn.Module, images: Tensor, labels: Tensor, micro_batch: int | None = None) -> float:
    """grad-norm (Abdelfattah et al. 2021, "Zero-Cost Proxies for Lightweight NAS"): the sum over conv and
    linear layers of the L2 norm of the weight's gradient of the cross-entropy loss on one batch. ``net``
    runs as given (the caller sets its mode); its gradients are overwritten.

    ``micro_batch`` runs the images that many at a time (to bound memory), each micro-batch's mean loss
    weighted by its share of the batch, so the gradients add up to that of the whole batch's mean loss (up to
    rounding, where nothing mixes images: BatchNorm in train mode normalises each micro-batch by its own
    statistics).

    Raises:
        NonFiniteLoss: the loss at initialisation is NaN or infinite.
        ProxyUndefined: no conv or linear weight gets a gradient.
    """
    net.zero_grad(set_to_none=True)
    batch = len(labels)
    step = micro_batch or batch
    for first in range(0, batch, step):
        loss = F.cross_entropy(net(images[first:first + step]), labels[first:first + step])
        if not torch.isfinite(loss):
            raise NonFiniteLoss("initialisation", loss.item())
        if not loss.requires_grad:
            raise ProxyUndefined("grad_norm: no parameter gets a gradient")
        (loss * (len(labels[first:first + step]) / batch)).backward()
    norms = [m.weight.grad.double().norm() for m in net.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.grad is not None]
    if not norms:
        raise ProxyUndefined("grad_norm: no conv or linear weight gets a gradient")
    return torch.stack(norms).sum().item()


@dataclass(frozen=True)
class ZeroCostEvaluator(Evaluator):
    """A training-free proxy at initialisation, on one batch of train images chosen by the seed.

    Proxies (the score; the raw value is in ``metrics[proxy]``):

    - ``naswot``: :func:`naswot_score`, in train mode with batch statistics, dropout and drop path off;
    - ``synflow``: :func:`synflow_score` (data-free: only the data's image shape is used);
    - ``grad_norm``: :func:`grad_norm_score`, in the same mode as NASWOT;
    - ``params``: ``log(num_params)``, the baseline a proxy must beat to be worth its cost.

    ``report`` is never called: there is nothing to prune.

    Memory, bounded before anything is allocated when ``max_memory`` is set (the class docstring of
    :class:`Evaluator`): grad-norm is estimated as a forward and backward at the batch, NASWOT as a forward
    plus its codes, SynFlow as a float64 forward and backward of one image (it cannot be split), ``params``
    needs nothing. grad-norm and NASWOT split the batch into micro-batches when it does not fit: the same
    images, the same gradient or kernel (``details["micro_batch"]``, such as ``"16x4"``).

    Attributes:
        proxy: which proxy; ``grad_norm`` by default, the one that ranked 30 trained architectures of the tiny
            space best (Spearman 0.70 against 0.51 for ``params``; README).
        batch_size: images in the batch NASWOT and grad-norm read.
        threads: ``torch.set_num_threads`` for the evaluation (None: unchanged).
        max_memory: bytes one evaluation may use (None: no limit, nothing estimated).
    """

    proxy: Proxy = "grad_norm"  # the best-ranking proxy on the tiny space (benchmarks/zero_cost_vs_trained.py)
    batch_size: int = 64
    threads: int | None = None
    max_memory: int | None = None
    name: ClassVar[str] = "zero-cost"

    def __post_init__(self) -> None:
        issues = _choice_issues("--proxy", self.proxy, PROXIES) + _positive_issues({
            "--batch-size": self.batch_size, "--threads": self.threads, "--max-memory": self.max_memory})
        if issues:
            raise StudyError(issues)

    def evaluate(self, net: nn.Module, data: Dataset, *, report: Report | None = None, seed: int = 0,
                 device: str | torch.device = "cpu") -> EvalResult:
        start = time.perf_counter()
        check_fits(net, data)
        dev = torch.device(device)
        count = num_params(net)
        metrics: dict[str, float] = {"num_params": float(count)}
        details = {"proxy": self.proxy, "device": str(dev)}
        if self.proxy == "params":
            score = math.log(max(count, 1))
            metrics["params"] = float(count)
        else:
            plan = self.plan(net, data)  # before anything is allocated for the candidate
            details["micro_batch"] = plan.split()
            if plan.estimate is not None:
                metrics["est_peak_bytes"] = float(plan.estimate.total)
            with _threads(self.threads), _seeded(seed, dev):
                score = self._score(net, data, seed, dev, metrics, plan.micro)
            metrics[self.proxy] = score
        return EvalResult(score=score, metrics=metrics, seconds=time.perf_counter() - start, details=details)

    def plan(self, net: nn.Module, data: Dataset) -> _Plan:
        """The micro-batch that keeps the proxy under ``max_memory``, from meta runs of ``net`` (unchanged).

        Raises:
            MemoryLimitExceeded: one image does not fit.
        """
        image = (data.channels, *data.input_size)
        if self.proxy == "synflow":
            widest = max((p.numel() for p in net.parameters() if p.requires_grad), default=0)

            def synflow(micro: int) -> MemoryEstimate:  # and the terms of one parameter at a time, in float64
                with _modes(net, nn.Module.eval):
                    step = estimate_step(net, (micro, *image), backward=True, dtype=torch.float64)
                return dataclasses.replace(step, workspace=step.workspace + 3 * widest * torch.float64.itemsize)

            return _fit("synflow", 1, synflow, self.max_memory)
        batch = min(self.batch_size, len(data.train.tensors[1]))

        def need(micro: int) -> MemoryEstimate:
            with _modes(net, _deterministic_train_mode):
                if self.proxy == "grad_norm":
                    step = estimate_step(net, (micro, *image), backward=True)
                    return dataclasses.replace(step, activations=step.activations  # and the rest of the batch
                                               + (batch - micro) * _image_bytes(data))
                return _naswot_estimate(net, data, batch, micro)

        return _fit(self.proxy, batch, need, self.max_memory)

    def _score(self, net: nn.Module, data: Dataset, seed: int, device: torch.device,
               metrics: dict[str, float], micro: int) -> float:
        work = copy.deepcopy(net).to(device)
        if self.proxy == "synflow":
            return synflow_score(work, (1, data.channels, *data.input_size))
        images, labels = _probe_batch(data, self.batch_size, seed, device)
        _deterministic_train_mode(work)
        if self.proxy == "grad_norm":
            return grad_norm_score(work, images, labels, micro)
        score, units = naswot_score(work, images, micro)
        metrics["naswot_units"] = float(units)
        return score


def _naswot_estimate(net: nn.Module, data: Dataset, batch: int, micro: int) -> MemoryEstimate:
    """NASWOT's memory at ``micro`` of ``batch`` images: the forward's peak, plus the widest module's codes
    (bool), eight float64 slices of :func:`_add_gram` and the kernel, plus, when split, the codes of the whole
    batch kept until the end (twice the widest one's, while it is concatenated) and the rest of the batch."""
    widths: list[int] = []

    def count(_: nn.Module, args: tuple[Any, ...]) -> None:  # the units naswot_score reads, per image
        if args and isinstance(args[0], Tensor) and args[0].numel() % micro == 0:
            widths.append(args[0].numel() // micro)

    handles = [m.register_forward_pre_hook(count) for m in _outer_activations(net)]
    try:
        step = estimate_step(net, (micro, data.channels, *data.input_size), backward=False)
    finally:
        for h in handles:
            h.remove()
    if step.analytic:  # the hooks may not all have run: every activation taken as a unit
        widths = [step.activations // micro // torch.float32.itemsize]
    widest = max(widths, default=0)
    extra = micro * widest + (8 * _GRAM_CHUNK + 3 * batch * batch) * torch.float64.itemsize
    if micro < batch:
        extra += batch * (sum(widths) + widest) + (batch - micro) * _image_bytes(data)
    return dataclasses.replace(step, workspace=step.workspace + extra)


# --- short training ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainEvaluator(Evaluator):
    """A short training run: AdamW, a per-step cosine schedule after a linear warm-up, cross-entropy.

    The score is the validation top-1 accuracy after the **last** epoch (not the best one: the maximum over
    epochs is biased upwards, and a pruner sees the same curve). ``report(epoch, val_acc)`` follows every
    epoch, epochs counted from 1. Weight decay applies to weights of rank 2 and more (not to biases, norms,
    scales or tokens, as timm does). Dropout and drop path are active while training, as the spec sets them.

    On CUDA, ``amp`` picks autocast: ``auto`` is bf16 where supported, else fp16 with a GradScaler; on CPU
    training runs in float32 whatever ``amp`` says. The data is moved to the device once.

    Memory, bounded before anything is allocated when ``max_memory`` is set (the class docstring of
    :class:`Evaluator`): a train step (forward, backward, AdamW's two states) at ``batch_size`` and a
    validation forward at ``eval_batch_size`` (the gradients and states still held) are estimated in float32
    (autocast only makes them smaller), with the data when it is moved to an accelerator. A train batch that
    does not fit is split into micro-batches whose gradients accumulate into one optimiser step over the same
    images (``details["micro_batch"]``; BatchNorm sees micro-batch statistics), a validation batch into
    smaller forwards (``details["eval_micro_batch"]``, exact).

    Attributes:
        epochs: passes over the train split (at most ``max_batches_per_epoch`` batches each).
        batch_size: train batch; the last partial batch is dropped (a batch of one breaks BatchNorm).
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        warmup_fraction: the share of all steps spent warming up linearly to ``lr``.
        label_smoothing: of the train loss (the validation loss has none).
        amp: ``auto``, ``off``, ``bf16`` or ``fp16`` (CUDA only).
        max_batches_per_epoch: a cap on train batches per epoch (None: the whole split).
        max_val_batches: a cap on validation batches (None: the whole split).
        eval_batch_size: validation batch.
        clip_grad: max gradient norm (None: no clipping).
        threads: ``torch.set_num_threads`` for the evaluation (None: unchanged).
        max_memory: bytes one evaluation may use (None: no limit, nothing estimated).
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.0
    amp: Amp = "auto"
    max_batches_per_epoch: int | None = None
    max_val_batches: int | None = None
    eval_batch_size: int = 256
    clip_grad: float | None = None
    threads: int | None = None
    max_memory: int | None = None
    name: ClassVar[str] = "train"

    def __post_init__(self) -> None:
        issues = _positive_issues({
            "--epochs": self.epochs, "--batch-size": self.batch_size, "--lr": self.lr,
            "--max-batches-per-epoch": self.max_batches_per_epoch, "--max-val-batches": self.max_val_batches,
            "--eval-batch-size": self.eval_batch_size, "--clip-grad": self.clip_grad, "--threads": self.threads,
            "--max-memory": self.max_memory,
        }) + _choice_issues("--amp", self.amp, get_args(Amp))
        if self.weight_decay < 0:
            issues.append(Issue("--weight-decay", f"{self.weight_decay:g} is negative"))
        if not 0 <= self.warmup_fraction < 1:
            issues.append(Issue("--warmup-fraction", f"{self.warmup_fraction:g} must lie in [0, 1)"))
        if not 0 <= self.label_smoothing < 1:
            issues.append(Issue("--label-smoothing", f"{self.label_smoothing:g} must lie in [0, 1)"))
        if issues:
            raise StudyError(issues)

    def evaluate(self, net: nn.Module, data: Dataset, *, report: Report | None = None, seed: int = 0,
                 device: str | torch.device = "cpu") -> EvalResult:
        start = time.perf_counter()
        check_fits(net, data)
        dev = torch.device(device)
        train, val = self.plan(net, data, dev)  # before anything is allocated for the candidate
        with _threads(self.threads), _seeded(seed, dev):
            run = _TrainRun(self, copy.deepcopy(net).to(dev), data, dev, seed, train.micro, val.micro)
            for epoch in range(1, self.epochs + 1):
                acc = run.epoch(epoch)
                if report is not None:
                    report(epoch, acc)
        result = run.result(time.perf_counter() - start)
        result.details.update(micro_batch=train.split(), eval_micro_batch=val.split())
        if train.estimate is not None and val.estimate is not None:
            result.metrics["est_peak_bytes"] = float(max(train.estimate.total, val.estimate.total))
        return result

    def plan(self, net: nn.Module, data: Dataset, device: torch.device) -> tuple[_Plan, _Plan]:
        """The train and validation micro-batches that keep the run under ``max_memory``, from meta runs of
        ``net`` (unchanged).

        Raises:
            MemoryLimitExceeded: one image does not fit.
        """
        image = (data.channels, *data.input_size)
        batch = min(self.batch_size, len(data.train.tensors[1]))
        val_batch = min(self.eval_batch_size, len(data.val.tensors[1]))
        if self.max_memory is None:
            return _Plan(batch, batch), _Plan(val_batch, val_batch)
        moved = 0 if device.type == "cpu" else sum(t.nbytes for t in (*data.train.tensors, *data.val.tensors))

        def train_step(micro: int) -> MemoryEstimate:
            with _modes(net, nn.Module.train):
                step = estimate_step(net, (micro, *image), backward=True, optimizer_states=2)
            gathered = batch * _image_bytes(data)  # the batch indexed out of the data, and the data if moved
            return dataclasses.replace(step, activations=step.activations + moved + gathered)

        train = _fit("training", batch, train_step, self.max_memory)
        held = cast(MemoryEstimate, train.estimate)  # the gradients and states held during validation

        def val_step(micro: int) -> MemoryEstimate:
            with _modes(net, nn.Module.eval):
                step = estimate_step(net, (micro, *image), backward=False)
            return dataclasses.replace(step, grads=held.grads, optimizer=held.optimizer,
                                       activations=step.activations + moved)  # its batches are views

        return train, _fit("validation", val_batch, val_step, self.max_memory)


class _TrainRun:
    """The state of one :class:`TrainEvaluator` run."""

    def __init__(self, options: TrainEvaluator, net: nn.Module, data: Dataset, device: torch.device,
                 seed: int, micro: int, eval_micro: int) -> None:
        self.options, self.net, self.device = options, net, device
        self.micro, self.eval_micro = micro, eval_micro  # images per forward, to bound memory
        self.train_x, self.train_y = (t.to(device) for t in data.train.tensors)
        self.val_x, self.val_y = (t.to(device) for t in data.val.tensors)
        self.generator = torch.Generator().manual_seed(seed)
        n = len(self.train_y)
        full = n // options.batch_size if n >= options.batch_size else 1
        self.steps_per_epoch = min(full, options.max_batches_per_epoch or full)
        self.total_steps = self.steps_per_epoch * options.epochs
        self.warmup_steps = math.ceil(options.warmup_fraction * self.total_steps)
        self.step = 0
        self.dtype = _autocast_dtype(options.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(_param_groups(net, options.weight_decay), lr=options.lr)
        self.history: list[dict[str, float]] = []
        self.train_seconds, self.samples = 0.0, 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` over the first steps, then a cosine to zero at the last step."""
        if step < self.warmup_steps:
            return self.options.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.options.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def epoch(self, epoch: int) -> float:
        """Train one epoch, validate, record; returns the validation accuracy."""
        start = time.perf_counter()
        train_loss = self.train_epoch(epoch)
        self.train_seconds += time.perf_counter() - start
        val_acc, val_loss = self.validate(epoch)
        self.history.append({"epoch": float(epoch), "train_loss": train_loss, "val_loss": val_loss,
                             "val_acc": val_acc, "lr": self.lr_at(max(self.step - 1, 0)),
                             "seconds": time.perf_counter() - start})
        return val_acc

    def train_epoch(self, epoch: int, check_every: int = 8) -> float:
        """One pass; the loss is checked for NaN/inf every ``check_every`` steps (each check waits for the
        device) and at the end. Returns the mean train loss."""
        self.net.train()
        n, bs = len(self.train_y), min(self.options.batch_size, len(self.train_y))
        order = torch.randperm(n, generator=self.generator).to(self.device)
        window = torch.zeros((), device=self.device)
        total = 0.0
        for i in range(self.steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            window = window + self.train_step(self.train_x[idx].float(), self.train_y[idx])
            if (i + 1) % check_every == 0 or i + 1 == self.steps_per_epoch:
                value = window.item()
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"epoch {epoch}, step {self.step}", value)
                total, window = total + value, torch.zeros((), device=self.device)
        self.samples += self.steps_per_epoch * bs
        return total / self.steps_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimiser step on the batch, run ``self.micro`` images at a time: each micro-batch's mean loss,
        weighted by its share of the batch, adds its gradient, so the step is the whole batch's. Returns the
        batch's mean loss (detached)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for first in range(0, len(y), self.micro):
            xs, ys = x[first:first + self.micro], y[first:first + self.micro]
            with self.autocast():
                loss = F.cross_entropy(self.net(xs), ys, label_smoothing=self.options.label_smoothing)
                loss = loss * (len(ys) / len(y))
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if self.options.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.options.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return total

    def validate(self, epoch: int) -> tuple[float, float]:
        """(top-1 accuracy, mean cross-entropy) on the validation split."""
        self.net.eval()
        correct, loss_sum, seen = 0, 0.0, 0
        bs = self.options.eval_batch_size
        batches = math.ceil(len(self.val_y) / bs)
        with torch.no_grad(), self.autocast():
            for i in range(min(batches, self.options.max_val_batches or batches)):
                for first in range(i * bs, min((i + 1) * bs, len(self.val_y)), self.eval_micro):
                    last = min(first + self.eval_micro, (i + 1) * bs)
                    x, y = self.val_x[first:last].float(), self.val_y[first:last]
                    logits = self.net(x).float()
                    loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += int((logits.argmax(dim=1) == y).sum().item())
                    seen += len(y)
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"validation after epoch {epoch}", loss_sum)
        return correct / max(seen, 1), loss_sum / max(seen, 1)

    def result(self, seconds: float) -> EvalResult:
        last = self.history[-1]
        metrics = {
            "val_acc": last["val_acc"], "best_val_acc": max(h["val_acc"] for h in self.history),
            "val_loss": last["val_loss"], "train_loss": last["train_loss"], "epochs": float(len(self.history)),
            "steps": float(self.step), "samples_per_s": self.samples / max(self.train_seconds, 1e-9),
            "num_params": float(num_params(self.net)),
        }
        precision = str(self.dtype or torch.float32).removeprefix("torch.")
        return EvalResult(score=last["val_acc"], metrics=metrics, seconds=seconds, history=self.history,
                          details={"device": str(self.device), "precision": precision})


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on CUDA (None: float32, always on CPU)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --- by name -------------------------------------------------------------------------------------

EVALUATORS: dict[str, type[ZeroCostEvaluator] | type[TrainEvaluator]] = {
    "zero-cost": ZeroCostEvaluator, "train": TrainEvaluator,
}
"""The evaluators :func:`make_evaluator` knows, by name."""


def make_evaluator(name: str, **options: Any) -> Evaluator:
    """The evaluator called ``name`` (``zero-cost`` or ``train``) with ``options`` (its dataclass fields, such
    as ``proxy="synflow"`` or ``epochs=5``).

    Raises:
        StudyError: unknown name, unknown option, or an option out of range.
    """
    cls = EVALUATORS.get(name)
    if cls is None:
        raise StudyError(_choice_issues("--evaluator", name, tuple(EVALUATORS)))
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [Issue(f"--evaluator {name}", f"unknown option '{key}'" + _did_you_mean(key, fields)
                     + f"; {name} takes " + ", ".join(fields)) for key in options if key not in fields]
    if unknown:
        raise StudyError(unknown)
    return cls(**options)


def _did_you_mean(value: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choice_issues(path: str, value: object, allowed: tuple[str, ...]) -> list[Issue]:
    if value in allowed:
        return []
    text = str(value)
    return [Issue(path, f"unknown '{text}'{_did_you_mean(text, allowed)}; use " + ", ".join(allowed))]


def _positive_issues(values: dict[str, float | int | None]) -> list[Issue]:
    return [Issue(path, f"{value:g} is not positive") for path, value in values.items()
            if value is not None and not value > 0]
