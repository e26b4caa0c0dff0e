"""One latency target, one latency source: the command line and the search get the same number."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.core.errors import LatencyError
from metaformer_lab.latency.profile import find_profile, resolve_profile
from metaformer_lab.latency.source import LatencySource
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.search.config import make_config
from metaformer_lab.search.run import run_search

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_caformer.yaml"


def test_a_target_normalises_and_round_trips() -> None:
    t = LatencyTarget(input_size=32, compile="default", deploy=True)
    assert t.input_size == (32, 32) and t.kind == "cpu" and t.memory_format == "contiguous"
    assert LatencyTarget.from_json(json.loads(json.dumps(t.to_json()))) == t
    assert LatencyTarget(device="cuda:1").kind == "cuda" and LatencyTarget(device="h100").kind == "gpu"
    assert t.describe() == "32x32, batch 1, float32, cpu (1 thread), torch.compile default, deploy form"
    assert [i.path for i in LatencyTarget(dtype="float64", batch_size=0, compile="fast").issues()] == \
        ["dtype", "compile", "batch_size"]


def test_matching_compares_every_field_the_target_fixes() -> None:
    profile = resolve_profile("cpu-tiny-1t")
    want = replace(profile.target, device_name=None)  # any CPU model
    assert profile.target.mismatches(want) == []
    assert profile.target.mismatches(replace(want, input_size=None, threads=None)) == []  # free when None
    assert profile.target.mismatches(replace(want, compile="default")) == ["compile None (want default)"]
    assert profile.target.mismatches(replace(want, deploy=True)) == ["deploy False (want True)"]
    assert profile.target.mismatches(replace(want, input_size=(64, 64))) == ["input_size 32x32 (want 64x64)"]
    with pytest.raises(LatencyError, match="near match 'cpu-tiny-1t': differs in deploy"):
        find_profile(replace(want, deploy=True))


def test_the_source_decides_once_where_its_numbers_come_from() -> None:
    gpu = LatencySource(LatencyTarget(device="t4", dtype="float16"))
    assert gpu.kind == "estimated" and not gpu.can_measure and "T4" in gpu.describe()
    predicted = LatencySource(LatencyTarget(input_size=32), profile="cpu-tiny-1t", host_check=False)
    assert predicted.kind == "predicted" and predicted.describe() == "predicted from profile 'cpu-tiny-1t'"
    none = LatencySource(LatencyTarget(input_size=32, threads=7), profile="auto", host_check=False)
    assert none.kind == "measured" and none.profile is None
    assert any("near match 'cpu-tiny-1t'" in i.message and "threads 1 (want 7)" in i.message for i in none.unmatched)
    with pytest.raises(LatencyError, match="not here to measure on"):
        gpu.measure(None)  # type: ignore[arg-type]  # refused before the graph is looked at


def test_the_command_line_and_a_search_report_the_same_prediction(tmp_path: Path) -> None:
    config = make_config(space="tiny", device="cpu", profile="cpu-tiny-1t", host_check=False, budget="50ms",
                         evaluator="zero-cost", evaluator_options={"proxy": "params"}, dataset="synthetic:64",
                         trials=1, finalists=1, finalist_passes=1, out=str(tmp_path / "run"), seed=3)
    search, _ = run_search(config)
    (trial,) = [t for t in search.study.get_trials() if t.user_attrs.get("latency_source") == "predicted"][:1]
    spec = tmp_path / "candidate.yaml"
    spec.write_text(trial.user_attrs["spec"])
    result = CliRunner().invoke(app, ["latency", str(spec), "--profile", "cpu-tiny-1t", "--no-host-check",
                                      "--no-measure", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["predicted_ms"] == pytest.approx(trial.user_attrs["latency_ms"], rel=1e-9)
    assert out["settings"]["input_size"] == [32, 32] and out["settings"]["threads"] == 1


def test_a_deploy_target_times_the_deploy_form(monkeypatch: pytest.MonkeyPatch) -> None:
    measure_module = importlib.import_module("metaformer_lab.latency.measure")  # the package exports the function
    folded = []
    real = measure_module.deploy_form
    monkeypatch.setattr(measure_module, "deploy_form", lambda m: folded.append(m) or real(m))
    fast = {"min_time_s": 0.02, "min_runs": 3, "max_warmup_s": 0.05}
    trained = measure_module.measure(EXAMPLE, LatencyTarget(input_size=32), **fast)
    assert not folded and not trained.provenance.deploy
    deployed = measure_module.measure(EXAMPLE, LatencyTarget(input_size=32, deploy=True), **fast)
    assert len(folded) == 1 and deployed.provenance.deploy


def test_the_deploy_form_is_a_search_setting_of_its_own() -> None:
    config = make_config(space="tiny", device="cpu", deploy=True)
    assert config.name == "tiny-2ms-cpu-deploy" and config.latency_target((32, 32)).deploy
    assert config.identity()["deploy"] is True and "deploy" not in make_config(space="tiny").identity()
    with pytest.raises(Exception, match="--deploy: GPU estimates are of the training form"):
        make_config(space="tiny", device="t4", deploy=True)
    # no shipped profile is of the deploy form: such a search measures its candidates
    source = LatencySource(config.latency_target((32, 32)), profile="auto", host_check=False)
    assert source.kind == "measured" and any("deploy False (want True)" in i.message for i in source.unmatched)
    with pytest.raises(LatencyError, match="'cpu-tiny-1t' is for another setting: deploy False"):
        LatencySource(config.latency_target((32, 32)), profile="cpu-tiny-1t")


def test_a_deploy_profile_times_each_op_in_its_deploy_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from metaformer_lab.latency import calibrate
    from metaformer_lab.latency.keys import default_out_mem, walk_keys
    from metaformer_lab.latency.predict import as_graph

    graph = as_graph(str(EXAMPLE), 32)
    folded = []
    monkeypatch.setattr(calibrate, "deploy_form", lambda m: folded.append(type(m).__name__) or m)
    keys = [(n, k) for n, k in walk_keys(graph, 1, default_out_mem) if graph.nodes[n]["kind"] not in ("add", "input")]
    name, key = next((n, k) for n, k in keys if not graph.is_composite(n))
    calibrate.op_call(graph, name, key, LatencyTarget(input_size=32))
    assert folded == []
    calibrate.op_call(graph, name, key, LatencyTarget(input_size=32, deploy=True))
    assert len(folded) == 1
