"""The search loop: open (or resume) an Optuna study in a real database, seed it with the space's reference
points, run the objective under the latency budget, re-measure the finalists, write the run folder.

Storage is Optuna's RDB storage: SQLite in the run folder by default, any SQLAlchemy URL otherwise, with
a heartbeat, so a trial whose process was killed (even ``kill -9``) is failed after the grace period and
run again (``RetryHeartbeatStaleTrialCallback``); completed trials are never lost or repeated. Several
processes can work on one study: the first creates it, the others join with ``resume=True``.

``config.backend == "ray"`` runs the same trials on Ray Tune instead (:mod:`metaformer_lab.search.ray_backend`);
everything before and after ``optimize`` is shared, and what both backends need of the study is in
:mod:`metaformer_lab.search.study`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch

from metaformer_lab.core.errors import StudyError
from metaformer_lab.search.config import SearchConfig
from metaformer_lab.search.datasets import load_dataset
from metaformer_lab.search.evaluators import make_evaluator
from metaformer_lab.search.latency import latency_source, margin
from metaformer_lab.search.memory import collecting_new_objects_only
from metaformer_lab.search.objective import Failure, Objective
from metaformer_lab.search.references import plan_for, queue_later
from metaformer_lab.search.study import (
    RUN_FILE,
    Search,
    TrialEvent,
    event,
    finished,
    open_storage,
    open_study,
    storage_url,
    waiting_references,
)
from metaformer_lab.space import SearchSpace, load_space


def input_size(space: SearchSpace) -> tuple[int, int]:
    size = space.template.parts.get("input", {}).get("size", 224) if isinstance(space.template.parts.get("input"),
                                                                                 dict) else 224
    if not isinstance(size, (int, list)):
        raise StudyError.single("space.input.size", "a search needs a fixed input size (latency is measured at it)")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
    source = latency_source(config, size)
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise StudyError.single("--out", f"{run_dir} exists and is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudyError.single("--out", f"cannot create the run folder {run_dir}: {err.strerror or err}") from None
    url = storage_url(config, run_dir)
    storage = open_storage(url, config.heartbeat_s)
    study = open_study(config, storage, resume=resume)
    host_line = source.fit_host(space)  # after every check: bad input costs no measuring
    search = Search(config, space, data, source, study, run_dir, url, notes=[host_line] if host_line else [])
    if source.host is not None:
        study.set_user_attr("host_check", source.host.to_json())
    study.set_user_attr("dtype_note", config.dtype_note)
    study.set_user_attr("budget_margin", margin(config, source).to_json())
    (run_dir / RUN_FILE).write_text(json.dumps({"storage": url, "study_name": config.name,
                                                "config": config.model_dump()}, indent=2) + "\n")
    return search


def optimize(search: Search, *, progress: Callable[[TrialEvent], None] | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> None:
    """Run trials until the study has ``config.trials`` finished searched ones (or the timeout, or a stop
    request); the references near the budget first, on top of them."""
    config = search.config
    plan_for(search)
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
        with warnings.catch_warnings(), collecting_new_objects_only():
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
    return Objective(search.space, config, search.data, evaluator, search.source, _device(config))


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
    search.study.set_user_attr("latency_description", search.source.describe())
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
        remeasure_finalists(search.study, search.source, config.budget_ms, config.finalists,
                            passes=config.finalist_passes, progress=finalist_progress)
    report = write_run(search.study, search.run_dir, search.storage_url)
    report["interrupted"] = interrupted
    return report
