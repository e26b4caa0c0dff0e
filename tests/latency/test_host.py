"""The host check: a shipped CPU profile fitted to the machine it runs on by one measured factor."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import OTHER_CPU, PROFILE_CPU

from metaformer_lab.latency import LatencyError
from metaformer_lab.latency import host as host_module
from metaformer_lab.latency.host import HOST_SEED, HostCheck, check_host, fit_to_host
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import match_profile, resolve_profile
from metaformer_lab.space import load_space, sample


@pytest.fixture(scope="module")
def graphs() -> list:
    return [p.graph for p in sample(load_space("tiny"), 4, seed=HOST_SEED + 1).points]


def test_the_factor_multiplies_every_prediction_and_is_not_saved(graphs: list, tmp_path) -> None:
    profile = resolve_profile("cpu-tiny-1t")
    check = HostCheck(profile.name, 0.5, [0.4, 0.5, 0.5, 0.6])
    scaled = check.apply(profile)
    for g in graphs:
        assert predict(g, scaled).ms == pytest.approx(0.5 * predict(g, profile).ms)
        assert predict(g, scaled).host_scale == 0.5 and predict(g, profile).host_scale == 1.0
    assert profile.host_scale == 1.0  # the loaded profile is untouched
    scaled.save(tmp_path / "p.json")
    assert "host_scale" not in (tmp_path / "p.json").read_text()


def test_the_spread_says_when_one_factor_cannot_fit() -> None:
    assert not HostCheck("p", 1.0, [0.95, 1.0, 1.0, 1.05]).wide
    wide = HostCheck("p", 1.0, [0.5, 0.7, 1.0, 1.4, 1.6])
    assert wide.wide and "latency calibrate" in wide.describe()


def test_the_check_undoes_a_miscalibrated_profile(graphs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile whose every op is 3x too slow gets a factor a third of the true one's. Both checks read the
    same (real) measurement: two timings taken one after the other differ by more than the factor's error on a
    machine whose speed drifts (they once came out 1.19 against 2.01)."""
    profile = resolve_profile("cpu-tiny-1t")
    coef = profile.correction or []  # ops_ms's coefficient first: it scales with the ops, the others by hand
    slow = replace(profile, ops={k: replace(e, ms=3 * e.ms) for k, e in profile.ops.items()},
                   correction=coef[:1] + [3 * c for c in coef[1:]])
    for g in graphs:
        assert predict(g, slow).ms == pytest.approx(3 * predict(g, profile).ms)
    measured: list = []

    def measured_once(*args, **kwargs):
        if not measured:
            measured.append(real(*args, **kwargs))
        return measured[0]

    real = host_module.measure_interleaved
    monkeypatch.setattr(host_module, "measure_interleaved", measured_once)
    true, off = check_host(profile, graphs), check_host(slow, graphs)
    assert len(measured) == 1 and len(true.ratios) == len(graphs) and true.seconds > 0 and true.scale > 0
    assert off.scale * 3 == pytest.approx(true.scale, rel=1e-6)


def test_a_gpu_profile_or_no_network_is_refused(graphs: list) -> None:
    profile = resolve_profile("cpu-tiny-1t")
    gpu = replace(profile, settings={**profile.settings, "device": "cuda"})
    with pytest.raises(LatencyError, match="measures on the CPU"):
        check_host(gpu, graphs)
    with pytest.raises(LatencyError, match="at least one network"):
        check_host(profile, [])
    same, check, line = fit_to_host(gpu)
    assert same is gpu and check is None and "no host check" in line


def test_a_profile_of_another_cpu_model_matches_only_through_the_host_check() -> None:
    """Both outcomes of matching, each labelled: the CPU model the profile was made on, and another."""
    profile = resolve_profile("cpu-tiny-1t")
    assert profile.settings["device_name"] == PROFILE_CPU
    want = replace(profile.target, device_name=PROFILE_CPU)
    for adapt in (True, False):
        assert match_profile(want, adapt=adapt, profiles=[profile]) == (profile, False)  # same model: as it is
    other = replace(want, device_name=OTHER_CPU)
    assert match_profile(other, adapt=True, profiles=[profile]) == (profile, True)  # another: to be rescaled
    with pytest.raises(LatencyError, match=f"differs in device_name {PROFILE_CPU}"):
        match_profile(other, adapt=False, profiles=[profile])
    with pytest.raises(LatencyError, match=r"threads 1 \(want 2\)"):  # only the CPU model is forgiven
        match_profile(replace(other, threads=2), adapt=True, profiles=[profile])


def test_the_check_says_when_the_profile_was_made_on_another_cpu(graphs: list, host_cpu: str) -> None:
    profile = resolve_profile("cpu-tiny-1t")
    check = check_host(profile, graphs[:2], time_per_model_s=0.05)
    assert check.host == host_cpu and check.made_on == PROFILE_CPU
    assert check.foreign == (host_cpu != PROFILE_CPU)
    assert ("(made on AMD EPYC; this host: " in check.describe()) == check.foreign
    assert check.to_json()["made_on"] == PROFILE_CPU
