"""The latency predictor: read from the typed graph and a profile alone, never a module, and fast.

A synthetic profile (every key of a graph given a known latency) makes the expected sums exact; the
shipped profiles are used where the test is about them (speed, near matches, the no-module guarantee).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency import LatencyError
from metaformer_lab.latency.keys import default_out_mem, walk_keys
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import (
    FEATURES,
    OpEntry,
    Profile,
    find_profile,
    load_profile,
    resolve_profile,
    shipped_profiles,
)
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.space import load_space, sample
from metaformer_lab.spec.load import read_spec, with_input_size

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_caformer.yaml"
SETTINGS = {"device": "cpu", "device_name": "test-cpu", "dtype": "float32", "batch_size": 1, "threads": 1,
            "input_size": [32, 32], "channels_last": False}


def _ms(numel: int) -> float:
    return 0.01 + numel * 1e-6


def synthetic_profile(graphs: list[ArchGraph], *, skip: frozenset[str] = frozenset()) -> Profile:
    """Every costed node of ``graphs`` (but the ``skip`` keys) at a latency that grows with its input."""
    ops: dict[str, OpEntry] = {}
    for graph in graphs:
        for _, k in walk_keys(graph, 1, default_out_mem):
            if k.key in skip:
                continue
            ms = _ms(k.numel_in)
            ops[k.key] = OpEntry(ms=ms, p10=ms, p90=ms, out_mem=default_out_mem("", k), config=k.config, kind=k.kind,
                                 op=k.op, numel_in=k.numel_in, numel_out=k.numel_out, mem=k.in_mem)
    return Profile(name="synthetic", settings=dict(SETTINGS), ops=ops)


@pytest.fixture(scope="module")
def tiny_graph() -> ArchGraph:
    return lower(read_spec(TINY))


def test_prediction_is_the_sum_of_the_profiled_ops(tiny_graph: ArchGraph) -> None:
    profile = synthetic_profile([tiny_graph])
    p = predict(tiny_graph, profile)
    expected = sum(_ms(k.numel_in) for _, k in walk_keys(tiny_graph, 1, default_out_mem))
    assert p.ops_ms == pytest.approx(expected, rel=1e-12)
    assert p.ms == pytest.approx(expected, rel=1e-12)  # no correction: the sum
    assert p.coverage == 1.0 and p.estimated == ()
    assert set(p.nodes) == {name for name, _ in walk_keys(tiny_graph, 1, default_out_mem)}


def test_the_correction_weighs_the_features(tiny_graph: ArchGraph) -> None:
    profile = synthetic_profile([tiny_graph])
    plain = predict(tiny_graph, profile)
    profile.correction = [2.0 if f == "ops_ms" else 0.0 for f in FEATURES]
    assert predict(tiny_graph, profile).ms == pytest.approx(2 * plain.ops_ms)
    profile.correction = [1.0 if f == "ops_ms" else (0.5 if f == "blocks" else 0.0) for f in FEATURES]
    blocks = read_spec(TINY).num_blocks
    assert predict(tiny_graph, profile).ms == pytest.approx(plain.ops_ms + 0.5 * blocks)


def test_an_op_the_profile_never_saw_is_estimated_and_says_so(tiny_graph: ArchGraph) -> None:
    keys = [k for _, k in walk_keys(tiny_graph, 1, default_out_mem) if k.kind == "token_mixer"]
    assert keys, "the tiny example has token mixers"
    full = predict(tiny_graph, synthetic_profile([tiny_graph]))
    partial = predict(tiny_graph, synthetic_profile([tiny_graph], skip=frozenset({keys[0].key})))
    assert 0 < partial.coverage < 1
    assert len(partial.estimated) >= 1
    assert all(name in partial.nodes for name in partial.estimated)
    # an estimate from neighbours of the same kind, not zero and not wild
    assert 0.5 * full.ops_ms < partial.ops_ms < 2 * full.ops_ms


def test_prediction_tracks_size_without_measuring() -> None:
    small = lower(read_spec(TINY))
    wide = read_spec(TINY)
    wide = wide.model_copy(update={"stages": [s.model_copy(update={"depth": s.depth * 2}) for s in wide.stages]})
    big = lower(wide)
    profile = synthetic_profile([small, big])
    assert predict(big, profile).ms > predict(small, profile).ms


def test_the_predictor_never_builds_a_module(tiny_graph: ArchGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = synthetic_profile([tiny_graph])
    shipped = find_profile(LatencyTarget(input_size=32))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the predictor built an nn.Module")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    with pytest.raises(AssertionError, match="built an nn.Module"):
        torch.nn.Linear(2, 2)  # the guard works
    assert predict(tiny_graph, profile).ms > 0
    assert predict(TINY, shipped).ms > 0  # from a file: read, lower, predict
    assert predict(read_spec(TINY), shipped).ms > 0


def _process_ms(fn: object, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()  # type: ignore[operator]
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


@pytest.mark.serial  # CPU time too grows when another process shares the core
@pytest.mark.parametrize("space", ["tiny", "metaformer"])
def test_the_predictor_is_fast(space: str) -> None:
    """Under 5 ms of CPU time per spec (median), from the typed graph that a search already has; CPU time,
    not wall time, so a busy neighbour does not decide the test."""
    points = sample(load_space(space), 5, seed=7).points
    size = points[0].graph.input_type.height
    profile = find_profile(LatencyTarget(input_size=size))
    for point in points:
        predict(point.graph, profile)  # warm the key cache as a search would
    worst = max(_process_ms(lambda g=point.graph: predict(g, profile)) for point in points)
    assert worst < 5.0, f"{space}: predict() took {worst:.2f} ms of CPU time (median) per spec"


def test_another_input_size_is_refused_not_rescaled(tiny_graph: ArchGraph) -> None:
    profile = synthetic_profile([tiny_graph])
    other = lower(with_input_size(read_spec(TINY), 64))
    with pytest.raises(LatencyError) as info:
        predict(other, profile)
    (issue,) = info.value.issues
    assert issue.path == "input.size" and "64x64" in issue.message and "32x32" in issue.message


def test_shipped_profiles_are_calibrated_and_evaluated() -> None:
    profiles = shipped_profiles()
    assert {p.name for p in profiles} >= {"cpu-tiny-1t", "cpu-metaformer-1t"}
    for p in profiles:
        assert p.correction is not None and len(p.correction) == len(FEATURES), p.name
        assert len(p.ops) > 100, p.name
        seeds = p.fit["calibration"]["seeds"]
        assert p.accuracy, f"{p.name} has no evaluate report"
        assert p.accuracy["context"]["seed"] not in seeds, f"{p.name} was evaluated on a calibration seed"
        assert 0 < p.accuracy["mape"] < 1 and p.accuracy["n"] >= 100


def test_find_profile_names_the_near_matches() -> None:
    assert find_profile(LatencyTarget(input_size=224)).name == "cpu-metaformer-1t"
    with pytest.raises(LatencyError) as info:
        find_profile(LatencyTarget(threads=3, input_size=32))
    lines = [f"{i.path}: {i.message}" for i in info.value.issues]
    assert lines[0].startswith("--profile: no shipped profile matches")
    assert any("near match 'cpu-tiny-1t': differs in threads 1 (want 3)" in line for line in lines), lines


def test_resolve_profile_by_name_path_and_typo(tmp_path: Path) -> None:
    by_name = resolve_profile("cpu-tiny-1t")
    assert by_name.path is not None and resolve_profile(by_name.path).name == "cpu-tiny-1t"
    with pytest.raises(LatencyError, match="did you mean 'cpu-tiny-1t'"):
        resolve_profile("cpu-tiny-1")
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(LatencyError, match="is not a metaformer-lab latency profile"):
        load_profile(bad)


def test_a_profile_round_trips(tmp_path: Path, tiny_graph: ArchGraph) -> None:
    profile = synthetic_profile([tiny_graph])
    profile.correction = [1.1, 0.01, 0.0, 0.02, -0.1]
    profile.save(tmp_path / "p.json")
    again = load_profile(tmp_path / "p.json")
    assert again.ops.keys() == profile.ops.keys() and again.correction == profile.correction
    for key, entry in profile.ops.items():  # times are kept to the nanosecond
        assert again.ops[key].ms == pytest.approx(entry.ms, abs=1e-6)
        assert again.ops[key].config == entry.config and again.ops[key].mem == entry.mem
    assert predict(tiny_graph, again).ms == pytest.approx(predict(tiny_graph, profile).ms, rel=1e-6)
