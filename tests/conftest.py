from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import OTHER_CPU, PROFILE_CPU  # noqa: E402  (after the path is set)

# One thread: the CI machine is shared, and tests never measure time.
torch.set_num_threads(1)


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
