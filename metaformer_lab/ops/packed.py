"""A Linear for CPU inference whose weight oneDNN reorders once, instead of on every call.

``F.linear`` on the CPU hands the plain weight to the BLAS each call; oneDNN's matmul instead reads a copy of the
weight laid out for its kernel (``torch.ops.mkldnn._reorder_linear_weight``, the same reorder inductor's frozen
CPU graphs use), and can apply a GELU to the output in the same pass. Which is faster depends on the CPU: on one
AMD EPYC host the reordered kernel took 0.75-0.93 of ``F.linear``'s time for the token matrices of a 224x224
network at one thread, on another (AVX2, no AVX-512) 0.95-1.14, and 1.0-1.7 with the GELU fused
(``benchmarks/packed_linear.py`` measures both). So the kernel is chosen per call shape on the host itself: the first
call of each shape (rows, widths, activation, threads) times both, a few calls in turn, and the reordered kernel
serves that shape from then on only where it was clearly faster (:data:`CHOICES`). Small calls, below
:attr:`PackedLinear.min_macs` multiply-adds, always run ``F.linear`` (the kernel's fixed cost loses there).

:class:`PackedLinear` is an ``nn.Linear`` (same parameters, state_dict and outputs within float32 rounding); the
reordered copy is a cache, made on the first call that uses it and again whenever the weight changes (it is not
in the state_dict, and copies and pickles leave it out). Whatever the kernel cannot serve runs ``F.linear``:
autograd, other devices and dtypes, a weight made under ``torch.inference_mode`` (it has no version counter to
tell when the copy is stale), tracing (``torch.fx``, ``torch.jit``, ``torch.compile`` / ``torch.export``,
ONNX export) and a build without oneDNN. The deploy form uses it (``metaformer_lab.deploy``); an op's fold hook
may fuse the activation that follows its Linear (``activation``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.ops.common import traced

Activation = Literal["gelu", "gelu_tanh"]
_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}
"""Each activation's GELU approximation, as ``F.gelu`` and oneDNN's fused GELU both name it."""


CHOICES: dict[tuple[int, int, int, str | None, int], bool] = {}
"""Per call shape, ``(rows, in_features, out_features, activation, threads)``: whether the reordered kernel was the
faster on this host (timed on the first call of that shape in this process)."""

_MARGIN = 0.92
"""The reordered kernel is chosen when its time is below this share of ``F.linear``'s: a clear win only. The race is
a few calls of each, and a neighbour moves their minimum by a few per cent; at 0.97, on an AVX2 host, swin_tiny's
deploy form raced three shapes to the reordered kernel and then ran 2 % slower than with ``F.linear`` throughout,
caformer_s18's two shapes no faster (interleaved medians, one hand run). Where the kernel wins, it wins by more:
0.75-0.93 of ``F.linear``'s time on an AVX-512 host (``benchmarks/packed_linear.py``)."""


def _faster(first: Any, second: Any, rounds: int = 5) -> bool:
    """Whether ``first()`` runs in under :data:`_MARGIN` of ``second()``'s time: one call of each to warm up, then
    ``rounds`` calls of each in turn, the fastest of each compared (the least disturbed by a neighbour)."""
    first(), second()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, call in enumerate((first, second)):
            start = time.perf_counter_ns()
            call()
            best[i] = min(best[i], time.perf_counter_ns() - start)
    return best[0] < _MARGIN * best[1]


class PackedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` with oneDNN's reordered weight on large float32 CPU calls (module docstring);
    ``activation`` None is a plain Linear, ``"gelu"`` / ``"gelu_tanh"`` applies ``nn.GELU()`` /
    ``nn.GELU(approximate="tanh")`` to the output in the same kernel."""

    min_macs: int = 1 << 23
    """Multiply-adds per call from which the reordered kernel may run (about 8 M: 196 tokens x 64 -> 512 channels
    is near the crossover on one thread where it wins, see ``benchmarks/packed_linear.py``)."""

    kernel: Literal["auto", "reordered", "plain"] = "auto"
    """``auto``: for a large call, the kernel timed the faster for its shape on this host (:data:`CHOICES`);
    ``reordered``: always for a large call; ``plain``: never (``F.linear`` for every call)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Activation | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation
        self._packed: Tensor | None = None
        self._packed_from: tuple[int, int] | None = None

    @classmethod
    def of(cls, linear: nn.Linear, activation: Activation | None = None) -> PackedLinear:
        """A PackedLinear sharing ``linear``'s parameters (and training flag), then ``activation``."""
        packed = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, device="meta")
        packed.weight = linear.weight
        packed.bias = linear.bias
        return packed.train(linear.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles: the cache is rebuilt where it is used
        state = super().__getstate__()
        return {**state, "_packed": None, "_packed_from": None}

    def _reordered(self) -> Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed_from != key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._packed_from = key
        return self._packed

    def _uses_reordered(self, x: Tensor) -> bool:
        """Whether the reordered kernel runs this call: a large float32 CPU call outside autograd and tracing, of a
        shape it was the faster for (``auto``). The size comes early (most small calls fail on it, cheaply), after
        what makes it symbolic: an fx Proxy is no Tensor, and under torch.compile / torch.export a dynamic size
        would be guarded on. A shape known to run faster in ``F.linear`` stops there (the cheapest path, about
        2 us of checks)."""
        if (self.kernel == "plain" or not isinstance(x, Tensor) or torch.compiler.is_compiling()
                or x.numel() * self.out_features < self.min_macs):
            return False
        key = (x.numel() // self.in_features, self.in_features, self.out_features, self.activation,
               torch.get_num_threads())
        wins = CHOICES.get(key) if self.kernel == "auto" else True
        if wins is False:
            return False
        weight = self.weight
        if not (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.is_cpu
                and not weight.is_inference()  # made under inference_mode: no version counter to key the copy on
                and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and not traced()):
            return False
        if wins is None:
            wins = CHOICES[key] = _faster(lambda: self._reordered_call(x), lambda: self._plain_call(x))
            if not wins:  # the copy made for the race is not kept
                self._packed = self._packed_from = None
        return wins

    def _reordered_call(self, x: Tensor) -> Tensor:
        act = self.activation
        return torch.ops.mkldnn._linear_pointwise(x, self._reordered(), self.bias, "none" if act is None else "gelu",
                                                  [], "" if act is None else _APPROXIMATE[act])

    def _plain_call(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else F.gelu(y, approximate=_APPROXIMATE[self.activation])

    def forward(self, x: Tensor) -> Tensor:  # (..., in_features) -> (..., out_features)
        if self._uses_reordered(x):
            return self._reordered_call(x)
        return self._plain_call(x)


def gelu_of(act: nn.Module) -> Activation | None:
    """The :data:`Activation` a PackedLinear can fuse for module ``act``, None where it cannot."""
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return None


def pack_linears(module: nn.Module) -> nn.Module:
    """``module`` with every plain ``nn.Linear`` in it replaced by a :class:`PackedLinear` sharing its parameters
    (in place; subclasses of Linear, which may compute something else, stay)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            module._modules[name] = PackedLinear.of(child)
        else:
            pack_linears(child)
    return module
