"""The search loop: outcomes recorded with reasons, references seeded, budget as a hard constraint, resume
after SIGKILL, run-folder outputs, and bad input refused before any study is touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import OTHER_CPU_FAST, PROFILE_CPU, cli_command, study_trials, wait_for
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.core.errors import StudyError
from metaformer_lab.search import config as config_module
from metaformer_lab.search import objective as objective_module
from metaformer_lab.search.config import load_study_file, make_config
from metaformer_lab.search.latency import margin as budget_margin
from metaformer_lab.search.references import NEAR_BUDGET, nearness
from metaformer_lab.search.report import FINALISTS, best_trial, load_run, ranked
from metaformer_lab.search.run import optimize, prepare, run_search
from metaformer_lab.search.study import Outcome, feasible, finished
from metaformer_lab.space import load_space

ROOT = Path(__file__).resolve().parents[2]
POOLED = "estimated from datasheet, factors fitted on"
runner = CliRunner()
optuna.logging.set_verbosity(optuna.logging.WARNING)


def quick(tmp_path: Path, **over: Any) -> Any:
    """A fast search: the tiny space, a T4 estimate (no timing: factors pooled over the calibrated GPUs), the
    parameter-count proxy, one torch thread (tests run beside each other: threads that wait for a busy core make
    a training step many times slower)."""
    values: dict[str, Any] = {"space": "tiny", "device": "t4", "budget": "5ms", "evaluator": "zero-cost",
                              "evaluator_options": {"proxy": "params"}, "trials": 8, "dataset": "synthetic:64",
                              "out": str(tmp_path / "run"), "seed": 1, "train_threads": 1}
    values.update(over)
    return make_config(**values)


def test_a_search_records_every_trial_and_writes_the_run_folder(tmp_path: Path) -> None:
    search, report = run_search(quick(tmp_path))
    study = search.study
    trials = study.get_trials()
    assert finished(study) == 8 and len(trials) == 12  # the 4 references come on top of the 8 searched trials
    first = trials[:4]  # the hand-designed models go first, nearest the budget first
    assert {t.user_attrs.get("reference") for t in first} == set(load_space("tiny").references)
    distance = [nearness(t.user_attrs["latency_ms"], 5.0) for t in first]
    assert distance == sorted(distance)
    for t in trials:
        assert "budget_ms" in t.user_attrs
        if t.state == optuna.trial.TrialState.COMPLETE:
            a = t.user_attrs
            assert a["latency_source"] == "estimated" and POOLED in a["latency_label"]
            assert a["latency_ms"] <= 5.0 and a["params"] > 0 and a["flops"] > 0
            assert t.constraints["latency"] == pytest.approx(a["latency_ms"] - 5.0)
            assert yaml.safe_load(a["spec"])["name"] == a["spec_name"]
        else:
            assert t.user_attrs["reason"] in ("invalid", "over_budget")
    run = tmp_path / "run"
    for name in ("best.yaml", "trials.csv", "pareto.png", "summary.json", "run.json", "study.db"):
        assert (run / name).is_file(), name
    assert list((run / "pareto").glob("*.yaml"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["budget_ms"] == 5.0 and summary["device"] == "t4"
    assert POOLED in summary["latency"] and "T4" in summary["latency"]
    assert summary["best"]["latency_ms"] <= 5.0
    assert sum(summary["trials"]["by_state"].values()) == len(trials)
    code = runner.invoke(app, ["validate", str(run / "best.yaml")]).exit_code
    assert code == 0


@OTHER_CPU_FAST
def test_on_the_cpu_latency_is_predicted_and_the_finalists_measured(tmp_path: Path, host_cpu: str) -> None:
    """Whichever CPU model the host reports, the shipped profile predicts, fitted to this host first; one made
    on another CPU model says so."""
    search, report = run_search(quick(tmp_path, device="cpu", budget="50ms", trials=6, finalists=2,
                                      finalist_passes=1))
    complete = [t for t in search.study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["latency_source"] == "predicted" for t in complete)
    made_on = "" if host_cpu == PROFILE_CPU else f" (made on {PROFILE_CPU})"
    assert f"predicted from profile 'cpu-tiny-1t'{made_on}, rescaled x" in report["latency"]
    check = search.study.user_attrs["host_check"]
    assert check["networks"] == 8 and check["scale"] > 0 and search.source.profile.host_scale == check["scale"]
    assert check["host"] == host_cpu and check["made_on"] == PROFILE_CPU
    best = report["best"]
    assert best["measured_ms"] is not None and best["measured_ms"] <= 50.0
    measured = report["finalists"][str(best["trial"])]
    assert measured["within_budget"] and measured["provenance"]["threads"] == 1 and measured["passes"] == 1
    assert len([m for m in report["finalists"].values() if m.get("measured_ms")]) >= 2


@pytest.mark.slow
def test_without_the_host_check_a_profile_of_another_cpu_is_not_used(tmp_path: Path, host_cpu: str) -> None:
    """--no-host-check: the shipped profile predicts on the CPU model it was made on, unscaled; on another
    model nothing fits, and every candidate is measured."""
    search, report = run_search(quick(tmp_path, device="cpu", budget="50ms", trials=5, finalists=1,
                                      finalist_passes=1, host_check=False))
    complete = [t for t in search.study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and "host_check" not in search.study.user_attrs
    source = "predicted" if host_cpu == PROFILE_CPU else "measured"
    assert all(t.user_attrs["latency_source"] == source for t in complete)
    if host_cpu == PROFILE_CPU:
        assert report["latency"] == "predicted from profile 'cpu-tiny-1t'"
    else:
        assert "no matching profile" in report["latency"]
        assert any("near match 'cpu-tiny-1t': differs in device_name" in i.message for i in search.source.unmatched)


def test_a_local_study_commits_to_a_write_ahead_log_and_folds_it_in_at_the_end(tmp_path: Path) -> None:
    """SQLite in WAL mode, synced at checkpoints (a commit does not wait for the disk); the run folder holds
    study.db alone once the search's connections close."""
    import sqlite3

    from metaformer_lab.search.study import open_storage

    db = tmp_path / "study.db"
    storage = open_storage(f"sqlite:///{db}", heartbeat_s=10)
    study = optuna.create_study(storage=storage, study_name="wal")
    study.enqueue_trial({"x": 1})
    study.optimize(lambda trial: trial.suggest_int("x", 0, 3), n_trials=2)
    with storage.engine.connect() as connection:
        modes = [connection.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous")]
    assert modes == ["wal", 1]  # 1: NORMAL
    assert db.with_name("study.db-wal").exists()  # committed there while the search runs
    storage.engine.dispose()
    assert not db.with_name("study.db-wal").exists()
    with sqlite3.connect(db) as reader:  # everything committed is in study.db
        assert reader.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone() == (2,)
    reader.close()


def test_a_finalist_over_budget_when_measured_is_reported_not_chosen(tmp_path: Path) -> None:
    search, _ = run_search(quick(tmp_path, trials=8))
    study = search.study
    top, second, third = ranked(study)[:3]
    study.set_user_attr(FINALISTS, {str(top.number): {"measured_ms": 9.0, "within_budget": False},
                                    str(second.number): {"measured_ms": 4.0, "within_budget": True}})
    best, broke = best_trial(study)
    assert best is not None and best.number == second.number
    assert [b["trial"] for b in broke] == [top.number] and broke[0]["measured_ms"] == 9.0
    study.set_user_attr(FINALISTS, {str(top.number): {"measured_ms": 9.0, "within_budget": False}})
    best, _ = best_trial(study)
    assert best is None  # measured finalists all broke the budget: an unmeasured trial is not the answer
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0 and "over budget, not chosen" in result.stdout
    assert "no trial within budget: every finalist measured broke it" in result.stdout


def test_over_budget_candidates_are_rejected_before_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far over the budget, nothing is evaluated: candidates are rejected, references placed by latency alone."""
    evaluated: list[str] = []
    real = objective_module.evaluate_candidate
    monkeypatch.setattr(objective_module, "evaluate_candidate",
                        lambda graph, *a, **k: evaluated.append(graph.spec.name) or real(graph, *a, **k))
    costed: list[str] = []
    real_cost = objective_module.graph_cost
    monkeypatch.setattr(objective_module, "graph_cost", lambda graph, *a, **k: costed.append(graph.spec.name)
                        or real_cost(graph, *a, **k))
    parsed: list[str] = []
    real_parse = config_module.parse_duration_ms
    monkeypatch.setattr(config_module, "parse_duration_ms", lambda text, **k: parsed.append(text)
                        or real_parse(text, **k))
    search, report = run_search(quick(tmp_path, budget="1us", trials=8))
    trials = search.study.get_trials()
    assert evaluated == [] and finished(search.study) == 8
    assert parsed == ["1us"]  # the budget is parsed once, when the config is checked
    searched = [t for t in trials if not t.user_attrs.get("reference") and t.user_attrs["reason"] == "over_budget"]
    assert searched and all("params" not in t.user_attrs and t.user_attrs["spec_name"] for t in searched)
    assert len(costed) == len(trials) - len(searched) - sum(t.user_attrs["reason"] == "invalid" for t in trials)
    for t in trials:
        assert t.user_attrs["reason"] in ("over_budget", "invalid")
        assert any(v > 0 for v in t.constraints.values())
        assert t.state == optuna.trial.TrialState.PRUNED and "score" not in t.user_attrs
        if t.user_attrs.get("reference"):
            assert t.user_attrs["placed"] and t.user_attrs["latency_ms"] > 0 and "placed from its latency" in \
                t.user_attrs["detail"]
    placed = [t for t in trials if t.user_attrs.get("reference")]
    assert [t.number for t in placed] == [0, 1, 2, 3]  # recorded before the searched trials
    assert report["best"] is None and report["pareto"] == []
    assert report["trials"]["by_reason"].get("over_budget", 0) >= 5
    assert all(r["score"] is None and r["feasible"] is False and not r["evaluated"]
               for r in report["references"].values())
    assert report["reference_counts"]["placed"] == 4 and report["reference_counts"]["scored"] == 0


def _reference_latencies(tmp_path: Path) -> dict[str, float]:
    """The tiny space's references' latencies at the quick setting (T4 estimate), from a placing run."""
    search, _ = run_search(quick(tmp_path / "probe", budget="1us", trials=1))
    return {t.user_attrs["reference"]: t.user_attrs["latency_ms"] for t in search.study.get_trials()
            if t.user_attrs.get("reference")}


def test_references_near_the_budget_are_scored_first_and_far_ones_placed(tmp_path: Path) -> None:
    latency = _reference_latencies(tmp_path)
    order = sorted(latency.values())
    budget = (order[1] + order[2]) / 2 / NEAR_BUDGET  # the two fastest within NEAR_BUDGET budgets, two beyond
    search, report = run_search(quick(tmp_path, budget=f"{budget:.6f}ms", trials=6))
    trials = search.study.get_trials()
    near = sorted((n for n, v in latency.items() if v <= NEAR_BUDGET * budget), key=lambda n: nearness(latency[n],
                                                                                                         budget))
    assert len(near) == 2
    refs = [t for t in trials if t.user_attrs.get("reference")]
    placed = [t.user_attrs["reference"] for t in refs if t.user_attrs.get("placed")]
    scored = [t.user_attrs["reference"] for t in refs if "score" in t.user_attrs]
    assert sorted(placed) == sorted(set(latency) - set(near)) and scored == near
    assert finished(search.study) == 6  # the references took none of the user's trials
    counts = report["reference_counts"]
    assert (counts["scored"], counts["placed"]) == (2, 2) and "never count towards --trials" in counts["why"]


def test_score_references_scores_the_far_ones_after_the_searched_trials(tmp_path: Path) -> None:
    search, report = run_search(quick(tmp_path, budget="1us", trials=5, score_references=True))
    trials = search.study.get_trials()
    searched = [t.number for t in trials if not t.user_attrs.get("reference")]
    refs = [t for t in trials if t.user_attrs.get("reference")]
    assert len(searched) == 5 and len(refs) == 4
    assert all("score" in t.user_attrs and not feasible(t) for t in refs)  # scored, never chosen
    assert min(t.number for t in refs) > max(searched)  # after the searched trials
    assert report["reference_counts"]["scored"] == 4 and report["best"] is None


@pytest.mark.parametrize(("device", "given", "dtype"), [
    ("h100", None, "float16"), ("t4", None, "float16"), ("a100", None, "float16"), ("cpu", None, "float32"),
    ("h100", "float32", "float32"), ("l4", "bfloat16", "bfloat16"),
])
def test_a_gpu_search_defaults_to_half_precision_and_says_so(device: str, given: str | None, dtype: str) -> None:
    config = make_config(device=device, dtype=given)
    assert config.dtype == dtype
    assert config.dtype_note.startswith(f"latency at {dtype}")
    assert ("default" in config.dtype_note) == (given is None)


def test_the_dtype_is_the_first_line_and_in_the_summary(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", "--space", "tiny", "--device", "h100", "--budget", "5ms", "--trials", "2",
                                 "--evaluator", "zero-cost", "--proxy", "params", "--dataset", "synthetic:64",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert "float16, the default for a GPU" in first and "budget 5 ms" in first
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == "float16" and "default for a GPU" in summary["dtype_note"]
    assert "float16" in summary["latency"]


def test_an_invalid_point_is_recorded_with_its_reason(tmp_path: Path) -> None:
    config = quick(tmp_path, trials=5)
    search = prepare(config)
    params = dict(load_space("tiny").references["vit_tiny"])
    params["stages[0].dim"] = 24  # head_dim 32 does not divide it
    search.study.enqueue_trial(params)
    optimize(search)
    bad = [t for t in search.study.get_trials() if t.user_attrs.get("reason") == "invalid"]
    assert bad and "32 does not divide dim 24" in bad[0].user_attrs["detail"]
    assert bad[0].constraints["valid"] == 1.0


def test_two_objectives_give_a_pareto_front(tmp_path: Path) -> None:
    search, report = run_search(quick(tmp_path, objectives="score,latency", trials=10))
    assert len(search.study.directions) == 2
    assert report["pareto"]
    front = sorted((t for t in search.study.get_trials() if t.number in report["pareto"]), key=lambda t: t.values[1])
    score = [t.values[0] for t in front]
    assert score == sorted(score)  # along the front, more score costs more latency


def test_resume_continues_and_refuses_other_settings(tmp_path: Path) -> None:
    run_search(quick(tmp_path, trials=5))
    with pytest.raises(StudyError, match="already exists"):
        prepare(quick(tmp_path, trials=5))
    with pytest.raises(StudyError, match="budget_ms"):
        prepare(quick(tmp_path, trials=5, budget="3ms", study_name="tiny-5ms-t4"), resume=True)
    search, _ = run_search(quick(tmp_path, trials=9), resume=True)
    assert finished(search.study) == 9
    with pytest.raises(StudyError, match="no study"):
        prepare(quick(tmp_path, study_name="other"), resume=True)


def test_report_rewrites_the_run_folder(tmp_path: Path) -> None:
    run_search(quick(tmp_path, trials=5))
    run = tmp_path / "run"
    (run / "summary.json").unlink()
    (run / "pareto.png").unlink()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.stderr
    assert (run / "summary.json").is_file() and (run / "pareto.png").is_file()
    study, _ = load_run(run)
    assert finished(study) == 5


@pytest.mark.parametrize(("args", "line"), [
    (["--budget", "2"], "--budget: '2' has no unit"),
    (["--budget", "-1ms"], "--budget:"),
    (["--space", "nosuch"], "nosuch: no such file, and no shipped space of that name"),
    (["--dataset", "cifar10:/no/such/folder"], "/no/such/folder: no such folder"),
    (["--device", "h1000"], "--device: unknown 'h1000' (did you mean 'h100'?)"),
    (["--storage", "sqlite:////no/such/dir/x.db"], "--storage: cannot open sqlite:////no/such/dir/x.db"),
    (["--resume"], "--resume: no study"),
    (["--objectives", "latency"], "objectives:"),
    (["--workers", "2"], "--workers: needs --backend ray"),
    (["--backend", "dask"], "backend: 'dask' is not one of"),
    (["--backend", "ray", "--address", "127.0.0.1:1"], "--address: nothing answers at 127.0.0.1:1"),
    (["--backend", "ray", "--cpus-per-trial", "0"], "ray.cpus_per_trial:"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, args: list[str], line: str) -> None:
    result = runner.invoke(app, ["search", "--out", str(tmp_path / "run"), "--trials", "2", *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[0].startswith(line), result.stderr  # checked before any progress is shown
    assert not (tmp_path / "run" / "summary.json").exists()


def test_study_files_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        config = load_study_file(path)
        assert config.trials >= 1 and config.budget_ms > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: tiny\nbugdet: 2ms\n")
    with pytest.raises(StudyError) as err:
        load_study_file(bad)
    assert str(err.value).startswith(f"{bad}:bugdet: unknown field (did you mean 'budget'?)")


def test_a_command_line_option_keeps_the_study_files_other_settings_in_its_group(tmp_path: Path) -> None:
    """``--epochs`` on top of a study file's evaluator options, ``--workers`` on top of its ray settings: each
    replaces its one key, and the file's other keys in that group stay."""
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"space": "tiny", "budget": "2ms", "backend": "ray",
                                     "evaluator_options": {"epochs": 4, "max_batches_per_epoch": 3},
                                     "ray": {"workers": 3, "cpus_per_trial": 1}}))
    config = load_study_file(study, evaluator_options={"epochs": 1}, ray={"workers": 2})
    assert config.evaluator_options == {"epochs": 1, "max_batches_per_epoch": 3}
    assert (config.ray.workers, config.ray.cpus_per_trial) == (2, 1)


def _cli(*args: str) -> list[str]:
    return cli_command(*args)


def _wait(predicate: Any, timeout: float) -> None:
    wait_for(predicate, timeout)


def _states(db: Path) -> dict[int, tuple[str, Any]]:
    return {t.number: (t.state.name, t.value) for t in study_trials(f"sqlite:///{db}", "killed")}


@pytest.mark.slow
def test_sigkill_during_a_trial_loses_no_completed_trial(tmp_path: Path) -> None:
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "space": "tiny", "dataset": "digits", "evaluator": "train",
        # trials of a second or so each (the poll is every 0.2 s), so the test can catch one running
        "evaluator_options": {"epochs": 2, "max_batches_per_epoch": 4, "batch_size": 32, "max_val_batches": 1,
                               "eval_batch_size": 32},
        "budget": "50ms",
        "device": "t4",
        "trials": 3, "study_name": "killed", "out": str(tmp_path / "run"), "heartbeat_s": 1, "pruner": "none",
        "train_threads": 1}))
    db = tmp_path / "run" / "study.db"
    proc = subprocess.Popen(_cli("search", "--study", str(study_file)), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def mid_trial() -> bool:  # a trial past its first epoch, so Optuna has recorded its heartbeat
            trials = study_trials(f"sqlite:///{db}", "killed")
            return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 2 and any(
                t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values for t in trials)
        _wait(mid_trial, 240)
        before = {n: v for n, (s, v) in _states(db).items() if s == "COMPLETE"}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(s == "RUNNING" for s, _ in _states(db).values())  # the killed trial is left running
    resumed = subprocess.run(_cli("search", "--study", str(study_file), "--resume"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _states(db)
    for number, value in before.items():
        assert after[number] == ("COMPLETE", value)  # nothing completed was lost or run again
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{db}")
    assert finished(study) >= 3
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_trial_and_keeps_the_study(tmp_path: Path) -> None:
    out = tmp_path / "run"
    one_thread = tmp_path / "threads.yaml"  # the options given on the command line override the file's
    one_thread.write_text("train_threads: 1\nevaluator_options: {max_batches_per_epoch: 4, batch_size: 32, "
                          "max_val_batches: 1, eval_batch_size: 32}\n")  # --epochs keeps these
    proc = subprocess.Popen(_cli("search", "--study", str(one_thread), "--space", "tiny", "--device", "t4", "--budget",
                                 "50ms", "--trials", "30", "--dataset", "digits", "--epochs", "1", "--study-name",
                                 "stopped", "--out", str(out)),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = out / "study.db"
    try:
        def one_done() -> bool:  # a searched trial, not a reference
            return any(t.state.is_finished() and not t.user_attrs.get("reference")
                       for t in study_trials(f"sqlite:///{db}", "stopped"))
        _wait(one_done, 240)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{db}")
    assert 1 <= finished(study) < 30
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert (out / "summary.json").is_file()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_study(tmp_path: Path) -> None:
    """Sampler, weight init and training are all seeded: a study repeats trial by trial."""
    def scores(folder: str) -> list[tuple[dict[str, Any], float | None]]:
        search, _ = run_search(quick(tmp_path / folder, evaluator="train", trials=3,  # and the 4 references
                                     evaluator_options={"epochs": 1, "max_batches_per_epoch": 2, "batch_size": 16,
                                                        "eval_batch_size": 16}))
        return [(t.params, t.user_attrs.get("score")) for t in search.study.get_trials()]

    first = scores("a")
    assert any(score is not None for _, score in first)
    assert scores("b") == first


def test_a_candidate_over_the_memory_limit_is_an_out_of_memory_trial_and_the_search_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With less memory left than one image's step needs, every candidate is refused before it runs (its forward
    never sees a real tensor): at screening when its weights alone do not fit (pruned, never built), else by
    the evaluator with its step estimate (failed); the search reaches its trial count."""
    from metaformer_lab.search import memory

    for module in (memory, objective_module):  # the process holds 1 GB of a 1.001 GB cap
        monkeypatch.setattr(module, "held_bytes", lambda device: 10**9)
    ran: list[str] = []
    real = objective_module.compile_graph

    def compiled(graph: Any) -> Any:
        net = real(graph)
        forward = net.forward
        net.forward = lambda x, *a, **k: ran.append(graph.spec.name) if x.device.type != "meta" else forward(x, *a, **k)
        return net

    monkeypatch.setattr(objective_module, "compile_graph", compiled)
    search, report = run_search(quick(tmp_path, trials=5, max_memory="1.001GB", evaluator_options={}))
    assert ran == []
    failed = [t for t in search.study.get_trials() if t.user_attrs.get("reason") == "out_of_memory"]
    assert failed
    for t in failed:
        detail = t.user_attrs["detail"]
        if t.state == optuna.trial.TrialState.FAIL:  # refused by the evaluator, with its step estimate
            assert detail.startswith("grad_norm needs est. ") and "at batch 1" in detail
            assert "left of --max-memory 1.00 GB (the process holds 1.00 GB)" in detail
        else:  # refused at screening: the weights alone exceed the ~1 MB left
            assert t.state == optuna.trial.TrialState.PRUNED and "weights alone need" in detail
    assert finished(search.study) == 5 and report["trials"]["by_reason"]["out_of_memory"] == len(failed)


def test_every_recorded_reason_is_an_outcome(tmp_path: Path) -> None:
    """Reasons are Outcome values, stored as plain strings (so studies stay readable by any version)."""
    from metaformer_lab.search.evaluators import EvaluationFailed

    search, report = run_search(quick(tmp_path, budget="1ms", trials=6))
    reasons = [t.user_attrs["reason"] for t in search.study.get_trials() if "reason" in t.user_attrs]
    assert reasons and all(type(r) is str and Outcome(r).value == r for r in reasons)
    assert set(report["trials"]["by_reason"]) <= {o.value for o in Outcome}
    failures = [EvaluationFailed, *EvaluationFailed.__subclasses__()]
    assert all(isinstance(cls.reason, Outcome) for cls in failures)


def test_a_budget_margin_keeps_estimates_clear_of_the_budget(tmp_path: Path) -> None:
    """auto: the estimate's measured held-out error (T4 has no table: the pooled factors' leave-one-GPU-out
    error); a candidate is feasible only when latency x (1 + margin) is within budget; the run folder says why."""
    search, report = run_search(quick(tmp_path, budget_margin="auto", trials=6))
    margin = report["budget_margin"]
    assert 0.02 < margin["fraction"] < 0.5 and "leave-one-GPU-out" in margin["why"]
    scored = 0
    for t in search.study.get_trials():
        if "latency_ms" not in t.user_attrs or "valid" not in t.constraints or t.constraints["valid"] > 0:
            continue
        bound = t.user_attrs["latency_ms"] * (1 + margin["fraction"])
        assert t.constraints["latency"] == pytest.approx(bound - 5.0)
        if t.state == optuna.trial.TrialState.COMPLETE and feasible(t):
            scored += 1
            assert bound <= 5.0
    assert scored
    fixed = prepare(quick(tmp_path / "fixed", budget_margin="12.5%", trials=1))
    assert budget_margin(fixed.config, fixed.source).fraction == pytest.approx(0.125)


@pytest.mark.parametrize("margin", ["ten", "100%", "-5"])
def test_a_bad_budget_margin_is_one_line(tmp_path: Path, margin: str) -> None:
    result = runner.invoke(app, ["search", "--budget-margin", margin, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("--budget-margin: ") and margin in line


@pytest.mark.parametrize("device", ["t4", "cpu"], ids=["estimated", "measured"])
def test_a_candidate_whose_weights_do_not_fit_is_rejected_before_it_is_built(tmp_path: Path, device: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The search records it as out_of_memory, naming the part, and goes on; nothing is built or timed."""
    built: list[str] = []
    real = objective_module.evaluate_candidate
    monkeypatch.setattr(objective_module, "evaluate_candidate",
                        lambda graph, *a, **k: built.append(graph.spec.name) or real(graph, *a, **k))
    over = {"profile": None} if device == "cpu" else {}
    config = quick(tmp_path, device=device, trials=3, max_memory="1KB", budget="1s")
    search, report = run_search(config.model_copy(update=over))
    trials = search.study.get_trials()
    assert built == [] and finished(search.study) == 3
    for t in trials:
        assert t.user_attrs["reason"] in ("out_of_memory", "invalid"), t.user_attrs
        if t.user_attrs["reason"] == "out_of_memory":
            assert "weights alone need" in t.user_attrs["detail"] and t.user_attrs["detail"].startswith(
                ("stem", "stages[", "head"))
            assert any(v > 0 for v in t.constraints.values())
    assert report["trials"]["by_reason"].get("out_of_memory", 0) >= 3
