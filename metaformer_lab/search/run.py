"""The search loop: open (or resume) an Optuna study in a real database, seed it with the space's reference
points, run the objective under the latency budget, re-measure the finalists, write the run folder.

Storage is Optuna's RDB storage: SQLite in the run folder by default, any SQLAlchemy URL otherwise, with
a heartbeat, so a trial whose process was killed (even ``kill -9``) is failed after the grace period and
run again (``RetryHeartbeatStaleTrialCallback``); completed trials are never lost or repeated. Several
processes can work on one study: the first creates it, the others join with ``resume=True``.

``config.backend == "ray"`` runs the same trials on Ray Tune instead (:mod:`metaformer_lab.search.ray_backend`);
everything before and after ``optimize`` is shared.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from metaformer_lab.core.errors import Issue, StudyError
from metaformer_lab.search.config import SearchConfig
from metaformer_lab.search.datasets import Dataset, load_dataset
from metaformer_lab.search.evaluators import make_evaluator
from metaformer_lab.search.latency import LatencyOracle
from metaformer_lab.search.objective import Failure, Objective, Screening, trial_reason
from metaformer_lab.search.references import ReferencePlan, plan_references, queue_later
from metaformer_lab.space import SearchSpace, load_space

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
    """A prepared search: config, space, data, latency oracle, study and run folder."""

    config: SearchConfig
    space: SearchSpace
    data: Dataset
    oracle: LatencyOracle
    study: optuna.Study
    run_dir: Path
    storage_url: str
    notes: list[str] = field(default_factory=list)
    references: ReferencePlan | None = None


def input_size(space: SearchSpace) -> tuple[int, int]:
    size = space.template.parts.get("input", {}).get("size", 224) if isinstance(space.template.parts.get("input"),
                                                                                 dict) else 224
    if not isinstance(size, (int, list)):
        raise StudyError.single("space.input.size", "a search needs a fixed input size (latency is measured at it)")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt < attempts:  # another process is creating the schema
                time.sleep(0.2 * attempt)
                attempt += 1
                continue
            failure: BaseException = err
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot open it"
            failure = err
        raise StudyError.single("--storage", f"cannot open {url}: {_first_line(failure)}")


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
    return sum(1 for t in trials if not t.user_attrs.get("reference") and trial_reason(t) != "interrupted")


def prepare(config: SearchConfig, *, resume: bool = False) -> Search:
    """Check everything (space, dataset, evaluator, latency source, storage) and open the study."""
    space = load_space(config.space)
    size = input_size(space)
    channels = space.template.parts.get("input", {}).get("channels", 3)
    data = load_dataset(config.dataset, input_size=size, channels=channels, seed=config.seed)
    make_evaluator(config.evaluator, **config.evaluator_options)
    if config.backend == "ray":
        from metaformer_lab.search.ray_backend import check_address

        check_address(config.ray.address)
    oracle = LatencyOracle(config, size)
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise StudyError.single("--out", f"{run_dir} exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(config, run_dir)
    storage = open_storage(url, config.heartbeat_s)
    study = open_study(config, storage, resume=resume)
    host_line = oracle.fit_host(space)  # after every check: bad input costs no measuring
    search = Search(config, space, data, oracle, study, run_dir, url, notes=[host_line] if host_line else [])
    if oracle.host is not None:
        study.set_user_attr("host_check", oracle.host.to_json())
    study.set_user_attr("dtype_note", config.dtype_note)
    (run_dir / RUN_FILE).write_text(json.dumps({"storage": url, "study_name": config.name,
                                                "config": config.model_dump()}, indent=2) + "\n")
    return search


def event(study: optuna.Study, trial: optuna.trial.FrozenTrial, total: int) -> TrialEvent:
    best = None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(v <= 0 for v in t.constraints.values())]
    if complete:
        best = max(float(t.values[0]) for t in complete)
    return TrialEvent(number=trial.number, state=trial.state.name.lower(), reason=trial_reason(trial),
                      score=trial.user_attrs.get("score"), latency_ms=trial.user_attrs.get("latency_ms"),
                      reference=trial.user_attrs.get("reference"), finished=finished(study), total=total,
                      best_score=best)


def references(search: Search) -> ReferencePlan:
    """Screen the space's references and queue or place them (:mod:`metaformer_lab.search.references`)."""
    plan = plan_references(search.study, Screening(search.space, search.config, search.oracle),
                           score_later=search.config.score_references)
    search.references = plan
    return plan


def optimize(search: Search, *, progress: Callable[[TrialEvent], None] | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> None:
    """Run trials until the study has ``config.trials`` finished searched ones (or the timeout, or a stop
    request); the references near the budget first, on top of them."""
    config = search.config
    references(search)
    runs = config.trials - finished(search.study)
    if runs <= 0 and not waiting_references(search.study):
        return
    objective = _objective(search)

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is not None:
            progress(event(study, trial, config.trials))
        if should_stop() or (finished(study) >= config.trials and not waiting_references(study)):
            study.stop()

    # no trial count: the callback stops the study once enough searched trials finished and no reference waits,
    # so a reference retried after a crash (a heartbeat retry, made once the study runs) takes no searched slot
    _run(search, objective, None, after, config.timeout_s)


def score_later(search: Search, *, progress: Callable[[TrialEvent], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> int:
    """Score the references kept for after the searched trials (``score_references``), in this process,
    whichever backend ran the search. Returns how many were queued."""
    plan = search.references
    if plan is None or not plan.later or should_stop():
        return 0
    queued = queue_later(search.study, plan)
    config = search.config
    objective = _objective(search)

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is not None:
            progress(event(study, trial, config.trials))
        if should_stop():
            study.stop()

    _run(search, objective, queued, after, None)
    return queued


def _run(search: Search, objective: Objective, n_trials: int | None, after: Callable[..., None],
         timeout_s: float | None) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(search.config.train_threads or os.cpu_count() or 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            search.study.optimize(objective, n_trials=n_trials, timeout=timeout_s, callbacks=[after],
                                  catch=(Failure,), gc_after_trial=True)
    finally:
        torch.set_num_threads(previous)


def _device(config: SearchConfig) -> str:
    return "cuda" if config.device.startswith("cuda") else "cpu"


def _objective(search: Search) -> Objective:
    """The in-process objective (its evaluator's memory limit is set per candidate: ``evaluate_candidate``)."""
    config = search.config
    evaluator = make_evaluator(config.evaluator, **config.evaluator_options)
    return Objective(search.space, config, search.data, evaluator, search.oracle, _device(config))


def counts(study: optuna.Study) -> dict[str, Any]:
    """Trials by state and by reason."""
    by_state: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        by_state[t.state.name.lower()] = by_state.get(t.state.name.lower(), 0) + 1
        reason = trial_reason(t)
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"by_state": by_state, "by_reason": by_reason}


def run_search(config: SearchConfig, *, resume: bool = False, progress: Callable[[TrialEvent], None] | None = None,
               should_stop: Callable[[], bool] = lambda: False,
               finalist_progress: Callable[[int, int], None] | None = None) -> tuple[Search, dict[str, Any]]:
    """prepare -> optimize -> re-measure finalists -> write the run folder (also after Ctrl-C).

    Returns the search and its summary (``summary.json``'s content).
    """
    search = prepare(config, resume=resume)
    return search, execute(search, progress=progress, should_stop=should_stop, finalist_progress=finalist_progress)


def execute(search: Search, *, progress: Callable[[TrialEvent], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            finalist_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run a prepared search to the end and write its run folder; returns the summary."""
    from metaformer_lab.search.report import remeasure_finalists, write_run

    config = search.config
    search.study.set_user_attr("latency_description", search.oracle.describe())
    interrupted = False
    try:
        if config.backend == "ray":
            from metaformer_lab.search.ray_backend import optimize_ray

            interrupted = optimize_ray(search, progress=progress)
        else:
            optimize(search, progress=progress, should_stop=should_stop)
        if not interrupted:
            score_later(search, progress=progress, should_stop=should_stop)
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        remeasure_finalists(search.study, search.oracle, config.budget_ms, config.finalists,
                            progress=finalist_progress)
    report = write_run(search.study, search.run_dir, search.storage_url)
    report["interrupted"] = interrupted
    return report
