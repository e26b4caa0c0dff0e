"""Interleaved measurement: every sample knows its round, and two networks measured together compare round by round.

Structure and arithmetic only, never timing values: the machine is shared.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch
from torch import nn

from metaformer_lab.latency.interleave import measure_interleaved, paired_ratio
from metaformer_lab.latency.target import LatencyTarget

TARGET = LatencyTarget(input_size=(16, 16))


def _conv() -> nn.Module:
    return nn.Conv2d(3, 3, 3, padding=1)


@pytest.fixture(scope="module")
def pair() -> list:  # type: ignore[type-arg]
    """One conv, and the same conv stacked eight times, measured together."""
    torch.manual_seed(0)
    one = _conv().eval()
    eight = nn.Sequential(*(_conv() for _ in range(8))).eval()
    return measure_interleaved([eight, one], TARGET, time_per_item_s=0.15, min_runs=10, max_time_per_item_s=2.0)


def test_every_sample_records_its_round_and_both_networks_share_the_rounds(pair: list) -> None:  # type: ignore[type-arg]
    for result in pair:
        assert len(result.sample_rounds) == len(result.samples_ms) == result.runs >= 10
        assert list(result.sample_rounds) == sorted(result.sample_rounds) and result.sample_rounds[0] == 0
        assert "sample_rounds" in result.to_json(samples=True) and "sample_rounds" not in result.to_json()
    eight, one = pair
    assert set(eight.sample_rounds) & set(one.sample_rounds)
    # eight convs against one: whatever the machine's speed, far from 1 (a pairing of the wrong samples would not be)
    assert 2.0 < paired_ratio(eight, one) < 32.0
    assert paired_ratio(one, eight) == pytest.approx(1 / paired_ratio(eight, one), rel=0.5)


def test_the_paired_ratio_cancels_a_drift_that_the_ratio_of_medians_does_not(pair: list) -> None:  # type: ignore[type-arg]
    """The machine slows down round after round (1, 2, 4, 8 ms); the network is 1.5x its reference in every round,
    but took more runs in the fast rounds: the ratio of medians says 0.75, the paired ratio 1.5."""
    reference, network = pair[1], pair[0]
    speeds = [1.0, 2.0, 4.0, 8.0]
    reference = replace(reference, samples_ms=tuple(speeds), sample_rounds=(0, 1, 2, 3))
    network = replace(network, samples_ms=(1.5, 1.5, 1.5, 3.0, 6.0, 12.0), sample_rounds=(0, 0, 0, 1, 2, 3))
    assert statistics.median(network.samples_ms) / statistics.median(reference.samples_ms) == pytest.approx(0.75)
    assert paired_ratio(network, reference) == pytest.approx(1.5)


def test_results_not_measured_together_have_no_paired_ratio(pair: list) -> None:  # type: ignore[type-arg]
    eight, one = pair
    with pytest.raises(ValueError, match="share no round"):
        paired_ratio(replace(eight, sample_rounds=(10_000,) * eight.runs), one)
    with pytest.raises(ValueError, match="does not record its rounds"):
        paired_ratio(replace(eight, sample_rounds=()), one)
