"""The Ray Tune backend on a local Ray with this machine's CPUs, in one run: parallel trials, a worker killed
mid-trial, Ctrl-C, resume from Ray's experiment state, and the Optuna backend's outputs.

Each test runs ``metaformer-lab search --backend ray`` as a subprocess (Ray's processes stay out of the
test process) on short trials: a few epochs of a few batches, latency from the T4 estimate (no timing)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import cli_command, study_trials, wait_for

pytestmark = pytest.mark.slow

def _study_file(tmp_path: Path, name: str, trials: int, *, epochs: int = 2, batches: int = 3,
                pruner: str = "none") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "space": "tiny", "dataset": "digits", "device": "t4", "budget": "50ms", "evaluator": "train",
        "evaluator_options": {"epochs": epochs, "max_batches_per_epoch": batches, "batch_size": 32,
                              "max_val_batches": 1, "eval_batch_size": 32},
        "trials": trials, "study_name": name, "out": str(tmp_path / name), "pruner": pruner, "backend": "ray",
        "ray": {"workers": 2}}))
    return path


def _url(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name / 'study.db'}"


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path, Path]:
    """The search in the background, its output in files (a pipe nobody reads fills up and blocks it)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cli_command(*args), cwd=tmp_path, stdout=o, stderr=e, text=True)
    return proc, out, err


def _finished(trials: list[Any]) -> list[Any]:
    return [t for t in trials if t.state.is_finished()]


def test_a_ray_search_in_parallel_survives_a_killed_worker_and_ctrl_c_then_resumes_to_the_same_run_folder(
        tmp_path: Path) -> None:
    """One run for all three (each search costs a Ray start and two workers' imports): trials run two at a time on
    reused workers; a worker killed mid-trial does not end the run; Ctrl-C stops it with the study kept, and
    ``--resume`` reruns the unfinished trials from Ray's experiment state, keeps the finished ones and writes the
    Optuna backend's run folder."""
    study = _study_file(tmp_path, "parallel", 4, epochs=4, batches=2)  # and the 4 references
    url = _url(tmp_path, "parallel")
    proc, out, err = _start(tmp_path, "search", "--study", str(study))
    try:
        def two_running() -> Any:
            """A trial past its first epoch while another runs on another worker (None until then)."""
            running = [t for t in study_trials(url, "parallel") if t.state == optuna.trial.TrialState.RUNNING
                       and "worker" in t.user_attrs]
            pids = {t.user_attrs["worker"]["pid"] for t in running}
            return next((t for t in running if t.intermediate_values), None) if len(pids) >= 2 else None

        # two trials at a time, on two worker processes: seen in the study, then one of the two is killed
        wait_for(lambda: two_running() is not None, 300, "two trials running on two workers")
        victim = two_running()
        assert victim is not None
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)

        def mid_run() -> bool:  # the killed trial settled, two complete, one still running
            trials = {t.number: t for t in study_trials(url, "parallel")}
            return (trials[victim.number].state.is_finished()
                    and sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) >= 2
                    and any(t.state == optuna.trial.TrialState.RUNNING for t in trials.values()))

        wait_for(mid_run, 300, "the killed trial settled, two complete trials and one running")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert "interrupted" in out.read_text()
    interrupted = study_trials(url, "parallel")
    before = {t.number: (t.state, t.values, t.datetime_complete) for t in interrupted if t.state.is_finished()}
    unfinished = [t.number for t in interrupted if not t.state.is_finished()]
    assert before and unfinished and len(before) < 8
    assert (tmp_path / "parallel" / "ray").is_dir()  # Ray's experiment state, what --resume restores

    resumed = subprocess.run(cli_command("search", "--study", str(study), "--resume"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    trials = study_trials(url, "parallel")
    searched = [t for t in trials if not t.user_attrs.get("reference")]
    # the run went on to its trial count; the references run on top of the 4
    assert len(_finished(trials)) == len(trials) == 8 and len(searched) == 4
    for t in trials:
        if t.number in before:  # nothing finished was lost or run again
            assert (t.state, t.values, t.datetime_complete) == before[t.number]
    # the trials Ray restored ran to an end in the resumed run, as the same Optuna trials
    restarted = [t for t in trials if t.number in unfinished]
    assert all(t.state.is_finished() and t.datetime_complete > max(c for _, _, c in before.values())
               for t in restarted)
    after = next(t for t in trials if t.number == victim.number)
    # run again on another worker (Ray retries it), or failed with the reason said
    retried = victim.user_attrs["worker"] in after.user_attrs.get("earlier_workers", [])
    assert after.state.is_finished() and (retried or after.user_attrs.get("reason") == "worker_failed")

    run = tmp_path / "parallel"
    for name in ("best.yaml", "trials.csv", "pareto.png", "summary.json", "run.json"):
        assert (run / name).is_file(), name
    assert list((run / "pareto").glob("*.yaml"))
    evaluated = [t for t in trials if "worker" in t.user_attrs and "worker_finished" in t.user_attrs]
    assert len(evaluated) >= 3  # the four references (well within the budget) at least, but the killed one
    pids = {t.user_attrs["worker"]["pid"] for t in trials if "worker" in t.user_attrs}
    assert len(pids) < len([t for t in trials if "worker" in t.user_attrs])  # actors are reused
    # the same columns as the Optuna backend's, with the worker filled in
    with (run / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    # a candidate rejected in the driver (invalid, over budget: pruned, as no pruner runs here) never reaches a
    # worker; every other one ran on one
    assert all(bool(r["worker"]) == (r["state"] != "pruned") for r in rows)
    assert {"number", "state", "reason", "score", "latency_ms", "started", "completed"} <= set(rows[0])
    # and `report` reads it back
    again = subprocess.run(cli_command("report", str(run)), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "best: trial" in again.stdout
