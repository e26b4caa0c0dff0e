"""What both search backends share: the study in its storage, trial outcomes, counts and the front.

The Optuna loop (:mod:`.run`), the Ray Tune backend (:mod:`.ray_backend`) and the run folder (:mod:`.report`)
import this module and not each other. A trial's outcome is an :class:`Outcome`, stored in its ``reason``
user attribute (as the enum's string value, so studies written before read the same).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from metaformer_lab.core.errors import Issue, StudyError
from metaformer_lab.search.config import SearchConfig

if TYPE_CHECKING:
    from metaformer_lab.latency.source import LatencySource
    from metaformer_lab.search.datasets import Dataset
    from metaformer_lab.search.references import ReferencePlan
    from metaformer_lab.space import SearchSpace


class Outcome(str, Enum):
    """How a trial ended (``reason``), or where it stands."""

    COMPLETE = "complete"
    INFEASIBLE = "infeasible"  # complete, but a constraint is broken (a reference scored over budget)
    OVER_BUDGET = "over_budget"
    INVALID = "invalid"
    PRUNED = "pruned"
    OUT_OF_MEMORY = "out_of_memory"
    EVALUATION_FAILED = "evaluation_failed"
    NAN_LOSS = "nan_loss"
    PROXY_UNDEFINED = "proxy_undefined"
    WORKER_FAILED = "worker_failed"
    REJECTED = "rejected"
    INTERRUPTED = "interrupted"  # killed (its process died); run again, counted once
    RUNNING = "running"
    WAITING = "waiting"

    def __str__(self) -> str:
        return self.value


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrialEvent:
    """What the progress callback hears after each trial."""

    number: int
    state: str
    reason: str
    score: float | None
    latency_ms: float | None
    reference: str | None
    finished: int
    total: int
    best_score: float | None


@dataclass
class Search:
    """A prepared search: config, space, data, latency source, study and run folder."""

    config: SearchConfig
    space: SearchSpace
    data: Dataset
    source: LatencySource
    study: optuna.Study
    run_dir: Path
    storage_url: str
    notes: list[str] = field(default_factory=list)
    references: ReferencePlan | None = None


def storage_url(config: SearchConfig, run_dir: Path) -> str:
    return config.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: int, *, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with a heartbeat; an unreachable URL is a StudyError.

    Processes started together on an empty database all create Optuna's schema; PostgreSQL lets one
    ``CREATE TABLE`` win and fails the others with a unique violation. Such a loser tries again (the
    schema is then there, and creating it is skipped) up to ``attempts`` times."""
    import sqlalchemy

    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
            if storage.engine.dialect.name == "sqlite":
                _write_ahead(storage.engine)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt < attempts:  # another process is creating the schema
                time.sleep(0.2 * attempt)
                attempt += 1
                continue
            failure: BaseException = err
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot open it"
            failure = err
        raise StudyError.single("--storage", f"cannot open {url}: {_first_line(failure)}")


def _write_ahead(engine: Any) -> None:
    """SQLite with a write-ahead log, synced at checkpoints rather than at every commit.

    Optuna commits each parameter, attribute and state change on its own; in SQLite's default mode each commit
    waits for the disk (~1.7 ms here), a fifth of a zero-cost search's time. With the log, a commit survives the
    process being killed (it is in the log file, which the next opening reads), and only a crash of the machine
    itself may lose the last commits; readers in other processes (``report``, a dashboard) no longer wait for
    the writer. The log is folded into ``study.db`` when the last connection closes."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # the connections Optuna opened to create its schema predate the pragmas


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
    kind = config.sampler or ("nsga2" if config.objectives == "score,latency" else "tpe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=config.seed)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=config.seed, population_size=max(8, min(50, config.trials // 3)))
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=max(5, min(10, config.trials // 3)))


def _pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "none" or config.evaluator != "train":
        return optuna.pruners.NopPruner()
    if config.pruner == "hyperband":
        epochs = int(config.evaluator_options.get("epochs", 3))
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2))
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1, n_min_trials=3)


def _directions(config: SearchConfig) -> list[optuna.study.StudyDirection]:
    up, down = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    return [up, down] if config.objectives == "score,latency" else [up]


def open_study(config: SearchConfig, storage: optuna.storages.RDBStorage, *, resume: bool) -> optuna.Study:
    """Create the study, or load it to resume (refusing one made with other settings)."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    exists = config.name in names
    if resume and not exists:
        raise StudyError.single("--resume", f"no study '{config.name}' in {storage.url} to resume"
                                + (f"; studies there: {', '.join(names)}" if names else ""))
    if not resume and exists:
        raise StudyError.single("--study-name", f"a study '{config.name}' already exists in {storage.url}; add "
                                                "--resume to continue it, or give another --study-name or --out")
    if exists:
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=_sampler(config),
                                  pruner=_pruner(config))
        _check_same(study, config)
        return study
    study = optuna.create_study(study_name=config.name, storage=storage, sampler=_sampler(config),
                                pruner=_pruner(config), directions=_directions(config))
    study.set_user_attr("config", config.model_dump())
    study.set_user_attr("identity", config.identity())
    return study


def _check_same(study: optuna.Study, config: SearchConfig) -> None:
    old = study.user_attrs.get("identity", {})
    new = config.identity()
    differ = [f"{k}: {old.get(k)!s} in the study, {v!s} now" for k, v in new.items() if old.get(k) != v]
    if differ:
        raise StudyError([Issue("--resume", f"the study was made with other settings ({d})") for d in differ])


def waiting_references(study: optuna.Study) -> int:
    """Reference trials queued and not yet run (a backend runs them on top of the searched trials)."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(1 for t in waiting if t.user_attrs.get("reference"))


def finished(study: optuna.Study) -> int:
    """Searched trials that count towards the trial budget: references never do, and a killed trial that is
    run again counts once."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return sum(1 for t in trials if not t.user_attrs.get("reference") and outcome(t) != Outcome.INTERRUPTED)


def event(study: optuna.Study, trial: optuna.trial.FrozenTrial, total: int) -> TrialEvent:
    best = None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(v <= 0 for v in t.constraints.values())]
    if complete:
        best = max(float(t.values[0]) for t in complete)
    return TrialEvent(number=trial.number, state=trial.state.name.lower(), reason=outcome(trial).value,
                      score=trial.user_attrs.get("score"), latency_ms=trial.user_attrs.get("latency_ms"),
                      reference=trial.user_attrs.get("reference"), finished=finished(study), total=total,
                      best_score=best)


def counts(study: optuna.Study) -> dict[str, Any]:
    """Trials by state and by reason."""
    by_state: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        by_state[t.state.name.lower()] = by_state.get(t.state.name.lower(), 0) + 1
        reason = outcome(t).value
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"by_state": by_state, "by_reason": by_reason}


def outcome(trial: optuna.trial.FrozenTrial) -> Outcome:
    """Why a trial ended as it did (``complete`` for a scored one, ``running`` while it runs)."""
    state = trial.state
    if state == TrialState.COMPLETE:
        return Outcome.COMPLETE if feasible(trial) else _known(trial.user_attrs.get("reason"), Outcome.INFEASIBLE)
    if state == TrialState.RUNNING:
        return Outcome.RUNNING
    if state == TrialState.WAITING:
        return Outcome.WAITING
    reason = trial.user_attrs.get("reason")
    if reason:
        return _known(reason, Outcome.EVALUATION_FAILED)
    return Outcome.INTERRUPTED if state == TrialState.FAIL else Outcome.PRUNED


def _known(reason: Any, default: Outcome) -> Outcome:
    try:
        return Outcome(reason)
    except ValueError:
        return default


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def scored(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, feasible trials with a score and a latency."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if feasible(t) and "score" in t.user_attrs and "latency_ms" in t.user_attrs]


def front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other trial beats on both score (higher) and latency (lower), by latency."""
    out = []
    for t in trials:
        s, lat = t.user_attrs["score"], t.user_attrs["latency_ms"]
        dominated = any(u.user_attrs["score"] >= s and u.user_attrs["latency_ms"] <= lat and
                        (u.user_attrs["score"] > s or u.user_attrs["latency_ms"] < lat) for u in trials)
        if not dominated:
            out.append(t)
    return sorted(out, key=lambda t: t.user_attrs["latency_ms"])
