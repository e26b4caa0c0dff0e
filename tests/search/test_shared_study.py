"""One study, several search processes, through a real PostgreSQL server on loopback.

Two ``metaformer-lab search --storage URL --study-name S`` processes work on one study at once; one is
killed with SIGKILL in the middle of a trial. The other fails the dead process's trial once its heartbeat
is stale, runs it again, and takes the study to its trial count: nothing completed is lost or run twice.
The server is Debian's package (``scripts/install-postgresql``, run by README's test command)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import cli_command, study_trials, wait_for
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from metaformer_lab.search.study import finished

pytestmark = pytest.mark.slow

TRIALS = 8


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="psycopg2 is in the test extra")
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed (scripts/install-postgresql installs Debian's)")
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="metaformer-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = _free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "metaformer",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    server = subprocess.Popen([*as_postgres, str(bindir / "postgres"), "-D", str(data), "-k", str(root),
                               "-h", "127.0.0.1", "-p", str(port), "-c", "fsync=off", "-c", "max_connections=50"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql+psycopg2://metaformer@127.0.0.1:{port}/postgres"
    try:
        import sqlalchemy

        def accepts() -> bool:
            engine = sqlalchemy.create_engine(url)
            try:
                with engine.connect():
                    return True
            except sqlalchemy.exc.OperationalError:
                return False
            finally:
                engine.dispose()

        wait_for(accepts, 60, "PostgreSQL to accept connections")
        yield url
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # the data is thrown away
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
    err = tmp_path / f"{name}.stderr"
    with err.open("w") as e:
        proc = subprocess.Popen(cli_command(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=e, text=True)
    return proc, err


def _running(proc: subprocess.Popen[str], err: Path) -> bool:
    assert proc.poll() is None, f"a search process ended early: {err.read_text()[-2000:]}"
    return True


def _origin(t: Any) -> int:
    """The trial a retried trial repeats (itself for a first run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        number = RetryFailedTrialCallback.retried_trial_number(t)
    return t.number if number is None else int(number)


def test_processes_opening_one_empty_database_at_once_all_get_the_storage(postgres: str) -> None:
    """Every process started on an empty database creates Optuna's schema; PostgreSQL fails all but one
    ``CREATE TABLE`` of a race with a unique violation, and the losers must try again, not give up."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from metaformer_lab.search.study import open_storage

    barrier = Barrier(6)

    def open_one(_: int) -> str:
        barrier.wait()
        storage = open_storage(postgres, 5)
        storage.engine.dispose()
        return type(storage).__name__

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(open_one, range(6))) == ["RDBStorage"] * 6
    assert study_trials(postgres, "none-yet") == []  # the schema is whole: the poller can open it


def test_two_processes_share_a_study_and_one_killed_mid_trial_loses_nothing(postgres: str, tmp_path: Path) -> None:
    study_file = tmp_path / "shared.yaml"
    study_file.write_text(yaml.safe_dump({
        "space": "tiny", "dataset": "digits", "evaluator": "train", "device": "t4", "budget": "50ms",
        "evaluator_options": {"epochs": 3, "max_batches_per_epoch": 3, "batch_size": 32, "max_val_batches": 1,
                               "eval_batch_size": 32},
        "pruner": "none",
        "trials": TRIALS, "study_name": "shared", "storage": postgres, "heartbeat_s": 1, "train_threads": 1}))
    first, first_err = _start(tmp_path, "first", "search", "--study", str(study_file), "--out", "first")
    procs = [first]
    try:
        wait_for(lambda: _running(first, first_err) and study_trials(postgres, "shared"), 120,
                 "the first process to create the study")
        second, second_err = _start(tmp_path, "second", "search", "--study", str(study_file), "--resume", "--out",
                                    "second")
        procs.append(second)

        killed: list[int] = []
        before: dict[int, Any] = {}

        def both_busy() -> bool:  # both at work, the second one mid-trial, something complete
            _running(first, first_err)
            _running(second, second_err)
            trials = study_trials(postgres, "shared")
            killed[:] = [t.number for t in trials if t.state == TrialState.RUNNING and t.intermediate_values
                         and t.user_attrs.get("worker", {}).get("pid") == second.pid]
            before.update({t.number: t.values for t in trials if t.state == TrialState.COMPLETE})
            if killed and before:
                os.kill(second.pid, signal.SIGKILL)  # at once: the trial is still running
                return True
            return False

        wait_for(both_busy, 300, "the second process in the middle of training a candidate")
        second.wait(30)
        first.wait(600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0, first_err.read_text()[-3000:]
    assert killed

    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials()
    assert finished(study) >= TRIALS  # the survivor took the study to its trial count
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in trials}
    for number, values in before.items():  # nothing completed was lost
        assert by_number[number].state == TrialState.COMPLETE and by_number[number].values == values
    for number in killed:  # the killed process's trial failed, and ran again once, in the survivor
        assert by_number[number].state == TrialState.FAIL
        again = [t for t in trials if t.number != number and _origin(t) == number]
        assert len(again) == 1 and again[0].state.is_finished()
        assert again[0].user_attrs["worker"]["pid"] == first.pid
    origins = [_origin(t) for t in trials if t.state == TrialState.COMPLETE]
    assert len(origins) == len(set(origins))  # no completed trial run twice
    assert {t.user_attrs["worker"]["pid"] for t in trials if "worker" in t.user_attrs} == {first.pid, second.pid}
    assert (tmp_path / "first" / "summary.json").is_file()
