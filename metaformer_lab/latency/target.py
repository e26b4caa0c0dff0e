"""What a latency is *for*: the one :class:`LatencyTarget` type (docs/architecture.md, "Latency").

A latency number means something only with its target: the device (and which model of it), the dtype,
the batch size, the CPU threads, the input size, the memory format, the ``torch.compile`` mode and
whether the deploy form is timed. Measurement, profiles (what a profile is valid for), the predictor,
the GPU estimator, the search config, the Ray workers and the command line all pass this one frozen
value; a profile *matches* a target when they agree on every field the target fixes
(:meth:`LatencyTarget.mismatches`).

The host's identity lives here too (:func:`cpu_name`, :func:`device_name`): a target whose
``device_name`` is None means "this host's", and :meth:`LatencyTarget.here` fills it in. Durations with
a unit (budgets) are parsed here once (:func:`parse_duration_ms`). Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from metaformer_lab.core.errors import Issue, LatencyError

DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The dtypes a latency can be measured or estimated at."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes a target may ask for."""

CPU_NAME_ENV = "METAFORMER_LAB_CPU_NAME"
"""Overrides the CPU model name the host reports (profile matching and provenance follow it)."""


# --- the host ----------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name: ``$METAFORMER_LAB_CPU_NAME`` if set, else ``/proc/cpuinfo``, else
    ``platform.processor()``, else the machine type."""
    override = os.environ.get(CPU_NAME_ENV, "").strip()
    if override:
        return override
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: str) -> str:
    """The model name of ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``) on this host."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


# --- durations ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>us|µs|μs|ms|s)?\s*$")
_UNIT_MS = {"us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ms": 1.0, "s": 1e3}


def parse_duration_ms(text: str, *, path: str = "duration") -> float:
    """Milliseconds in a duration such as ``"2ms"``, ``"500us"`` (or ``µs``), ``"0.1s"``.

    Args:
        text: a positive finite number followed by its unit (``us``, ``µs``, ``ms`` or ``s``).
        path: where the text came from (``"--budget"``), for the error.

    Raises:
        LatencyError: no unit, not a number, not positive, or not finite.
    """
    hint = "use a number and a unit, e.g. '2ms', '500us' or '0.1s'"
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        finite = "finite " if isinstance(text, str) and re.search("nan|inf", text, re.IGNORECASE) else ""
        raise LatencyError.single(path, f"'{text}' is not a {finite}duration; {hint}")
    value = float(match["number"])
    if not math.isfinite(value):
        raise LatencyError.single(path, f"'{text}' is not a finite duration; {hint}")
    if match["unit"] is None:
        raise LatencyError.single(path, f"'{text}' has no unit; {hint}")
    if value <= 0:
        raise LatencyError.single(path, f"'{text}' must be positive; {hint}")
    return value * _UNIT_MS[match["unit"]]


# --- the target --------------------------------------------------------------------------------


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


@dataclass(frozen=True)
class LatencyTarget:
    """The setting a latency is for.

    Attributes:
        device: ``cpu``, ``cuda``, ``cuda:N``, or the name of a GPU that is not here (``h100``, ``t4``):
            then the latency is an estimate from its datasheet (:mod:`.gpu`).
        device_name: the model of the device (CPU model, GPU name); None: this host's (:meth:`here`), or
            any, when matching profiles.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: B.
        threads: CPU threads (``torch.set_num_threads``); a GPU target's are not matched against profiles.
        input_size: (H, W); None: the spec's own (:meth:`at` fills it from a graph).
        channels_last: model and input in ``torch.channels_last``.
        compile: a ``torch.compile`` mode (:data:`COMPILE_MODES`), None for eager.
        deploy: time the deploy form (inference-only structure folded away), not the training form.
    """

    device: str = "cpu"
    device_name: str | None = None
    dtype: str = "float32"
    batch_size: int = 1
    threads: int | None = 1
    input_size: tuple[int, int] | None = None
    channels_last: bool = False
    compile: str | None = None
    deploy: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", _size(self.input_size))

    # -- what kind of number it gives ------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``cpu``, ``cuda`` (a GPU here) or ``gpu`` (a GPU that is not here: an estimate)."""
        if self.device == "cpu":
            return "cpu"
        return "cuda" if re.fullmatch(r"cuda(:\d+)?", self.device) else "gpu"

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    # -- derived targets --------------------------------------------------------------------------
    def here(self) -> LatencyTarget:
        """This target with ``device_name`` filled in from this host (a GPU estimate's name stays as given, and so
        does a CUDA device this host lacks)."""
        if self.device_name is not None or self.kind == "gpu":
            return self
        try:
            return replace(self, device_name=device_name(self.device))
        except (RuntimeError, AssertionError, ValueError):  # no such CUDA device here: the measurement says so
            return self

    def at(self, graph_or_size: Any) -> LatencyTarget:
        """This target at a graph's input size (or at an ``(H, W)`` / square size)."""
        t = getattr(graph_or_size, "input_type", None)
        return replace(self, input_size=(t.height, t.width) if t is not None else _size(graph_or_size))

    # -- checks and matching -----------------------------------------------------------------------
    def issues(self) -> list[Issue]:
        """What is wrong with the target's own values (every problem at once; a device's presence is the
        measurement's concern)."""
        issues = []
        if self.dtype not in DTYPE_NAMES:
            issues.append(Issue("dtype", f"'{self.dtype}' is not supported; use {', '.join(DTYPE_NAMES)}"))
        if self.compile is not None and self.compile not in COMPILE_MODES:
            issues.append(Issue("compile", f"'{self.compile}' is not a torch.compile mode; use "
                                           f"{', '.join(COMPILE_MODES)}"))
        for name, value in (("batch_size", self.batch_size), ("threads", self.threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                issues.append(Issue(name, f"{value} must be an integer >= 1"))
        return issues

    def mismatches(self, want: LatencyTarget) -> list[str]:
        """How this target (a profile's) differs from ``want``: ``"field have (want value)"`` for every field
        ``want`` fixes (a None ``device_name``, ``threads`` or ``input_size`` is free, and so are threads on a
        GPU; a None ``compile`` is eager, and fixed). A ``cuda:N`` device counts as ``cuda``."""
        out = []
        for f in fields(self):
            value = getattr(want, f.name)
            if (value is None and f.name in _FREE_WHEN_NONE) or (f.name == "threads" and want.kind != "cpu"):
                continue
            have = getattr(self, f.name)
            if f.name == "device":
                have, value = _family(have), _family(value)
            if have != value:
                out.append(f"{f.name} {_show(have)} (want {_show(value)})")
        return out

    # -- text and JSON -----------------------------------------------------------------------------
    def describe(self) -> str:
        """``224x224, batch 1, float32, cpu (1 thread)``: the target for people."""
        size = f"{self.input_size[0]}x{self.input_size[1]}, " if self.input_size else ""
        if self.kind == "cpu":
            where = f"cpu ({self.threads} thread{'s' if self.threads != 1 else ''})"
        else:
            where = f"{self.device} ({self.device_name})" if self.device_name else self.device
        extra = "".join([", channels_last" if self.channels_last else "",
                         f", torch.compile {self.compile}" if self.compile else "",
                         ", deploy form" if self.deploy else ""])
        return f"{size}batch {self.batch_size}, {self.dtype}, {where}{extra}"

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["input_size"] = list(self.input_size) if self.input_size else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyTarget:
        """A target from :meth:`to_json` (or a profile's ``settings``: other keys such as ``torch`` are left out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_FREE_WHEN_NONE = frozenset({"device_name", "threads", "input_size"})


def _family(device: str) -> str:
    return "cuda" if re.fullmatch(r"cuda(:\d+)?", device) else device


def _show(value: Any) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)
