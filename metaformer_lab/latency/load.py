"""What other processes took of the CPUs while something was timed (docs/architecture.md, "Latency").

``/proc/stat`` gives the busy and idle time of every CPU this process may run on (its affinity set), at
the start and end of the timed window; this process's own CPU time over the window (``os.times()``, all
its threads) is subtracted, and what is left is what the *other* processes used: ``cores`` (cores'
worth) and ``load`` (share of those CPUs, 0..1). Time stolen by a hypervisor counts as a neighbour's.
Without ``/proc/stat`` (macOS) :func:`cpu_snapshot` gives None and callers skip the check.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CONTENTION_TOLERANCE_CORES = 0.3
"""Neighbour CPU (in cores) allowed beyond the cores a measurement leaves free: background daemons and
the 10 ms granularity of ``/proc/stat`` over a short window."""


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time counters at one instant: busy and total ticks of the CPUs this process may use,
    and this process's own CPU seconds (all threads)."""

    busy_ticks: int
    total_ticks: int
    cpus: int
    own_s: float


@dataclass(frozen=True)
class NeighbourLoad:
    """CPU used by *other* processes over a window: ``cores`` (cores' worth), ``load`` (share of ``cpus``)."""

    load: float
    cores: float
    cpus: int


def _allowed_cpus() -> set[int] | None:
    getter = getattr(os, "sched_getaffinity", None)
    return set(getter(0)) if getter is not None else None


def cpu_snapshot(stat_path: str = "/proc/stat") -> CpuSnapshot | None:
    """Busy/total ticks of the CPUs in this process's affinity set (all CPUs when unknown), or None
    where ``stat_path`` cannot be read. Busy = user + nice + system + irq + softirq + steal (guest
    time is inside user already); idle = idle + iowait."""
    try:
        lines = Path(stat_path).read_text().splitlines()
    except OSError:
        return None
    allowed = _allowed_cpus()
    per_cpu = [ln.split() for ln in lines if re.match(r"^cpu\d+ ", ln)]
    rows = [r for r in per_cpu if allowed is None or int(r[0][3:]) in allowed] or per_cpu
    if not rows:
        return None
    busy = total = 0
    for row in rows:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (row[1:9] + ["0"] * 8)[:8])
        row_busy = user + nice + system + irq + softirq + steal
        busy += row_busy
        total += row_busy + idle + iowait
    times = os.times()
    return CpuSnapshot(busy_ticks=busy, total_ticks=total, cpus=len(rows), own_s=times.user + times.system)


def neighbour_load(start: CpuSnapshot, end: CpuSnapshot) -> NeighbourLoad:
    """What other processes used between two snapshots: busy ticks minus this process's own."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = end.total_ticks - start.total_ticks
    others = (end.busy_ticks - start.busy_ticks) - (end.own_s - start.own_s) * hz
    load = min(max(others / total, 0.0), 1.0) if total > 0 else 0.0
    return NeighbourLoad(load=load, cores=load * end.cpus, cpus=end.cpus)


def contention(load: NeighbourLoad, cores_needed: int,
               tolerance: float = CONTENTION_TOLERANCE_CORES) -> str | None:
    """Why ``load`` disturbed a measurement that needs ``cores_needed`` cores, or None.

    The rule: a measurement with T threads needs min(T, cpus) cores; the others may use the rest,
    ``cpus - needed``, without slowing it. Contention is ``load.cores > cpus - needed + tolerance``.
    """
    needed = min(cores_needed, load.cpus)
    if load.cores <= load.cpus - needed + tolerance:
        return None
    threads = "1 thread" if cores_needed == 1 else f"{cores_needed} threads"
    return f"neighbours used {load.cores:.1f} of {load.cpus} cores while {threads} needed {needed}"
