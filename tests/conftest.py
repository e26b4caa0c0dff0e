from __future__ import annotations

import fcntl
import gc
import os
import sys
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import OTHER_CPU, PROFILE_CPU  # noqa: E402  (after the path is set)

from metaformer_lab.latency.lease import LEASE_ENV  # noqa: E402

# One thread: tests run beside each other (pytest-xdist workers) on a shared machine.
torch.set_num_threads(1)

MAX_WORKERS = 4
"""``-n auto`` (pyproject's addopts) starts one pytest-xdist worker per CPU, at most this many: each worker holds
torch, timm and a zoo model or two in memory."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tier's tests first (in their own order), then the rest. With pyproject's ``--maxschedchunk``,
    pytest-xdist hands tests out a few at a time in this order, so the workers start the 30-90 s tests together
    and the many short ones fill in around them, instead of one worker running the last long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort keeps each group's order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """A test marked ``serial`` runs alone: under pytest-xdist it holds the run's lock exclusively and every other
    test holds it shared, so it starts once the other workers' tests have finished, and theirs wait for it."""
    with _turn(item.config, alone=item.get_closest_marker("serial") is not None):
        return (yield)


@contextmanager
def _turn(config: pytest.Config, *, alone: bool) -> Iterator[None]:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: every test runs alone
        yield
        return
    # A worker's basetemp is a folder of the controller's, the same for every worker of this run.
    fd = os.open(Path(config.option.basetemp).parent / "serial.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@pytest.fixture(autouse=True, scope="session")
def _own_host_lease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test process has a host lease of its own (metaformer_lab.latency.lease): tests in other workers do not
    take turns with its measurements (a measurement would wait up to two minutes while a sibling's Ray trials
    compute); the tests that compare timings are marked ``serial`` instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LEASE_ENV, str(tmp_path_factory.getbasetemp() / "host.lock"))
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=[PROFILE_CPU, OTHER_CPU], ids=["profile-cpu", "other-cpu"])
def host_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The host reports each CPU model in turn (the one the shipped profiles were made on, then another),
    whatever CPU runs the test; the value is the model reported."""
    from metaformer_lab.latency.target import CPU_NAME_ENV

    monkeypatch.setenv(CPU_NAME_ENV, request.param)
    return request.param


def pytest_collection_finish(session: pytest.Session) -> None:
    """Garbage collections skip what the imports and the collection made (``gc.freeze``): torch, timm, pydantic's
    models and Optuna are millions of long-lived objects, and each automatic full collection walked them all
    (tests/ops + tests/graph: 18.9 s of CPU before, 16.7 s after)."""
    gc.collect()
    gc.freeze()
