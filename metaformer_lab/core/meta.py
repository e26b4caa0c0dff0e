"""Modules built on the ``meta`` device, where initialising them is free.

A meta tensor has a shape and no values, so an initialiser (``trunc_normal_``, ``kaiming_uniform_``, ``zeros_``)
has nothing to write. PyTorch still runs each of its in-place steps through a meta kernel, and several of those
(``clamp_``, ``erfinv_``) are Python decompositions of about a millisecond each: building timm's convformer_b36 on
the meta device spent 0.65 s there, against 0.13 s with the writes skipped (one hand run). :func:`on_meta` is
``torch.device("meta")`` with those writes answered at once: an in-place op that only writes values
(:data:`VALUE_WRITES`, and ``torch.nn.init``'s in-place initialisers) returns its meta tensor unchanged.
Shapes, dtypes, parameters, buffers and everything else a meta build is read for are as PyTorch makes them. Ops
that change a tensor's shape or strides in place (``resize_``, ``t_``, ``unsqueeze_``) still run, and so does an
index assignment (``mask[:, i] = 1``). It is for building modules: a forward run inside it would skip its own
in-place ops (a FLOP or kernel count taken there would miss them).

torch is imported on the first call, not with this module (``space size`` and ``validate`` never build one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

VALUE_WRITES = frozenset({
    "uniform_", "normal_", "trunc_normal_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "random_", "fill_", "zero_", "copy_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_", "mul_", "div_", "add_",
    "sub_", "addcmul_", "addcdiv_", "exp_", "log_", "sqrt_", "rsqrt_", "pow_", "abs_", "neg_", "reciprocal_",
    "sign_", "floor_", "ceil_", "round_", "trunc_", "fmod_", "remainder_", "masked_fill_", "index_fill_",
})
"""Names of in-place ops that write a tensor's values and leave its shape, strides and dtype as they are."""


def _initialiser(func: Any) -> bool:
    """A ``torch.nn.init`` function that writes its tensor in place (``kaiming_uniform_``, ``zeros_``)."""
    return getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_")


class Skipped(NamedTuple):
    """An initialiser call :func:`uninitialised` answered: its parameter, and the call to make it later."""

    target: Any
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def replay(self) -> None:
        self.func(*self.args, **self.kwargs)


def _meta_write(func: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A :data:`VALUE_WRITES` op or an initialiser on a meta tensor."""
    return target.is_meta and (getattr(func, "__name__", None) in VALUE_WRITES or _initialiser(func))


@functools.cache
def _answering() -> type:
    from torch import Tensor
    from torch.overrides import TorchFunctionMode

    class Answering(TorchFunctionMode):
        """Answers the in-place calls ``skips(func, tensor, args, kwargs)`` picks with the tensor itself, values
        untouched."""

        def __init__(self, skips: Callable[[Any, Tensor, tuple[Any, ...], dict[str, Any]], bool]) -> None:
            super().__init__()
            self.skips = skips

        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            kwargs = kwargs or {}
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, Tensor) and self.skips(func, target, args, kwargs):
                return target
            return func(*args, **kwargs)

    return Answering


@contextlib.contextmanager
def uninitialised() -> Iterator[list[Skipped]]:
    """Modules built inside it skip the ``torch.nn.init`` initialisers that PyTorch lets a mode answer
    (``kaiming_uniform_`` and ``uniform_``, what a Linear's or a conv's weights are given; ``normal_``,
    ``constant_``) when they initialise a parameter: its values are whatever memory it was given. Yields the list of
    the calls skipped, in order, for a caller that replays those its own initialisation will not overwrite.
    Everything else runs: buffers a module computes (a window's relative position index, an attention mask) and
    any tensor that is not a parameter are as PyTorch makes them. Filling the weights of a 100M-parameter network
    with PyTorch's default initialisers costs about 0.6 s on one core."""
    from torch.nn import Parameter

    skipped: list[Skipped] = []

    def skips(func: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if isinstance(target, Parameter) and _initialiser(func):
            skipped.append(Skipped(target, func, args, kwargs))
            return True
        return False

    with _answering()(skips):
        yield skipped


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """``with torch.device("meta")``, with initialisers' value writes skipped (module docstring)."""
    import torch

    with torch.device("meta"), _answering()(_meta_write):
        yield
