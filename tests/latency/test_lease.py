"""Measurements take turns with computing trials on one host (metaformer_lab.latency.lease)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import metaformer_lab as ml
from metaformer_lab.latency import source as latency_source
from metaformer_lab.latency.lease import LEASE_ENV, host_lease
from metaformer_lab.latency.source import SHARED_HOST, LatencySource
from metaformer_lab.latency.target import LatencyTarget

EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny_caformer.yaml"

SIBLING = """
import sys, time
from metaformer_lab.latency.lease import host_lease
with host_lease("compute"):
    print("computing", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def lease_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "host.lock"
    monkeypatch.setenv(LEASE_ENV, str(path))
    return path


def _busy_sibling(seconds: float, lease_file: Path) -> subprocess.Popen[str]:
    """A sibling trial in another process, holding the compute lease for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", SIBLING, str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, LEASE_ENV: str(lease_file)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "computing"
    return proc


def test_a_measurement_waits_until_the_sibling_stops_computing(lease_file: Path) -> None:
    sibling = _busy_sibling(1.0, lease_file)
    with host_lease("measure", timeout_s=30) as lease:
        pass
    assert lease.held and lease.waited_s > 0.7  # it started once the sibling's second of computing was over
    sibling.wait()


def test_computations_share_the_host_and_a_measurement_holds_it_alone(lease_file: Path) -> None:
    with host_lease("compute") as a, host_lease("compute", timeout_s=0.5) as b:
        assert a.held and b.held  # two trials compute at once
    with host_lease("measure") as m:
        assert m.held
        sibling = subprocess.run([sys.executable, "-c", "from metaformer_lab.latency.lease import host_lease\n"
                                  "with host_lease('compute', timeout_s=0.3) as l: print(l.held)"],
                                 capture_output=True, text=True, env={**__import__("os").environ,
                                                                      LEASE_ENV: str(lease_file)}, check=True)
        assert sibling.stdout.strip() == "False"  # a trial cannot start computing during a measurement


@pytest.mark.serial  # the measurement must end within seconds
def test_a_measurement_that_cannot_wait_is_flagged_not_used_silently(lease_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    graph = ml.to_graph(EXAMPLE, input_size=32)
    source = LatencySource(LatencyTarget(input_size=32), profile=None)  # measure every candidate
    monkeypatch.setattr(latency_source, "LEASE_WAIT_S", 0.2)
    sibling = _busy_sibling(5.0, lease_file)
    try:
        start = time.perf_counter()
        latency = source.latency(graph)
        assert time.perf_counter() - start < 4.5  # it did not wait for the sibling to finish
    finally:
        sibling.kill()
        sibling.wait()
    assert latency.kind == "measured" and latency.noisy and "not trusted" in latency.label
    alone = source.measure(graph, min_time_s=0.1)
    assert SHARED_HOST not in alone.noise_reasons  # with the host to itself, no such flag
