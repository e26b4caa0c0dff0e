"""Sizes in bytes (parsed from and printed for people) and the memory this host can allocate now.

Torch-free, so the command line can refuse a spec too large for the machine before it imports torch; the
estimates of what a network needs are in :mod:`metaformer_lab.graph.cost` and :mod:`metaformer_lab.search.memory`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
          "gib": 2**30, "ti": 2**40, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """Bytes from ``"2GB"``, ``"512MB"``, ``"1.5GiB"``, ``"800M"`` or ``"123456"`` (case-insensitive).

    Decimal units (k, M, G, T, with or without B) are powers of 1000, binary ones (KiB, MiB, GiB, TiB, or
    Ki, Mi, ...) powers of 1024, as in Kubernetes; a fraction of a byte is dropped.

    Raises:
        ValueError: text that is not a non-negative number with one of those units.
    """
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"'{text}' is not a size: use bytes or a number with a unit, such as 512MB, 2GB, 1.5GiB")
    return int(float(match.group(1)) * unit)


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units with two decimals: ``"3.41 GB"``, ``"850.00 MB"``."""
    return f"{n / byte_scale(n)[0]:.2f} {byte_scale(n)[1]}"


def byte_scale(n: float) -> tuple[int, str]:
    for size, unit in ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB")):
        if abs(n) >= size:
            return size, unit
    return 1, "B"


def available_bytes(device: str | torch.device) -> int:
    """Memory the process could allocate now on ``device``.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can give without swapping), capped by the
    cgroup's ``memory.max`` less its usage when the process runs in a limited container (the OOM killer
    acts on that limit); without ``/proc``, psutil when installed, else ``os.sysconf``. CUDA: the driver's
    free memory plus what PyTorch's caching allocator reserves without using.

    Raises:
        ValueError: a device type other than ``cpu`` and ``cuda``.
    """
    kind = device.partition(":")[0] if isinstance(device, str) else device.type
    if kind == "cuda":
        import torch  # in the process already: a CUDA device is read after torch is

        dev = torch.device(device)
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if kind != "cpu":
        raise ValueError(f"no memory reading for device type '{kind}'; use cpu or cuda")
    try:
        available = proc_bytes("/proc/meminfo", "MemAvailable")
    except (OSError, AttributeError):
        available = _available_without_proc()
    return int(min(available, _cgroup_headroom()))


def proc_bytes(path: str, key: str) -> int:
    """A ``KEY: N kB`` line of a /proc file, in bytes (AttributeError when absent)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024  # type: ignore[union-attr]


def _available_without_proc() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def _cgroup_headroom() -> int | float:
    """``memory.max - memory.current`` of the process's cgroup v2 (inf when unlimited or unknown)."""
    try:
        group = Path("/proc/self/cgroup").read_text().splitlines()[0].rpartition(":")[2]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        return float("inf") if limit == "max" else int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return float("inf")
