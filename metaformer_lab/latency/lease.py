"""Taking turns on a host: a latency measurement never runs while a sibling trial computes.

Trials that compute (training, zero-cost scoring) hold the host's lease shared; a measurement holds it
alone. Several trials may compute at once (Ray workers, several search processes on one study); a
measurement waits until none does, and while it runs, new trials wait for it (measurements take a
second or so). The lease is an advisory ``flock`` on one file per host and user, so processes that do
not know each other (two searches on one machine) take turns too; it is released when its holder exits,
however it exits. A measurement that cannot get the lease in time goes ahead and says so: its number is
flagged, never used silently.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LEASE_ENV = "METAFORMER_LAB_LEASE"
"""Path of the lease file (default: one per user in the temporary folder)."""


def lease_path() -> Path:
    return Path(os.environ.get(LEASE_ENV) or Path(tempfile.gettempdir()) / f"metaformer-lab-host-{os.getuid()}.lock")


@dataclass
class Lease:
    held: bool = False
    waited_s: float = 0.0


@contextmanager
def host_lease(kind: Literal["measure", "compute"], *, timeout_s: float | None = None,
               poll_s: float = 0.02) -> Iterator[Lease]:
    """Hold the host's lease for a measurement (alone) or a computation (shared with other computations).

    ``timeout_s``: how long to wait (None: as long as it takes); past it the body runs without the lease
    and ``lease.held`` is False. ``lease.waited_s`` says how long it waited.
    """
    path = lease_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    lease, start = Lease(), time.perf_counter()
    mode = fcntl.LOCK_EX if kind == "measure" else fcntl.LOCK_SH
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                lease.held = True
                break
            except BlockingIOError:
                if timeout_s is not None and time.perf_counter() - start >= timeout_s:
                    break
                time.sleep(poll_s)
        lease.waited_s = time.perf_counter() - start
        yield lease
    finally:
        if lease.held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["LEASE_ENV", "Lease", "host_lease", "lease_path"]
