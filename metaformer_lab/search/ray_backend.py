"""The Ray Tune backend: the same search, its trials spread over a Ray cluster.

Same by construction: Ray Tune's ``Tuner`` runs with a small searcher (``StudySearcher``, on Ray's public
``Searcher`` interface) around the search's own Optuna study (same storage, same sampler). It asks the
study for a candidate and screens it in the driver with the shared
:class:`~metaformer_lab.search.objective.Screening` (decode -> latency -> memory -> budget): a candidate
rejected there is recorded at once and never reaches a worker. An accepted one goes to a worker, which
runs :func:`~metaformer_lab.search.objective.evaluate_candidate` and reports back; the driver records the
outcome in the study. Workers never touch the storage, so a SQLite run folder serves a whole cluster.

- Pruning: Ray's ASHA scheduler on the ``train`` evaluator's per-epoch accuracy (single objective), with
  reduction factor 2 (a trial below the median of its rung stops, as with the Optuna backend's median
  pruner); a reference scored over budget reports no accuracy to it.
- Actors are reused between trials (a fresh worker pays torch's import every time).
- A worker killed during a trial: the trial runs again (``RayConfig.max_failures`` times), then counts as
  failed (``worker_failed``); the run goes on.
- Interrupted (Ctrl-C): Ray saves its experiment state in ``RUN_DIR/ray/STUDY``; ``--resume`` restores it, running
  the unfinished trials again; completed trials are in the study and are never lost.
- Latency measured in the driver while trials run is flagged as not trusted; finalists are re-measured after
  the workers are gone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState

from metaformer_lab.core.errors import StudyError
from metaformer_lab.graph.lower import lower
from metaformer_lab.search.config import SearchConfig
from metaformer_lab.search.datasets import Dataset
from metaformer_lab.search.evaluators import EvalResult, make_evaluator
from metaformer_lab.search.objective import Failure, Rejected, Screening, evaluate_candidate, record_result
from metaformer_lab.search.references import plan_for
from metaformer_lab.search.study import Outcome, Search, TrialEvent, event, finished, open_storage, waiting_references
from metaformer_lab.spec.load import read_spec

RAY_DIR = "ray"
"""Ray Tune's experiments inside the run folder, one per study name (what ``--resume`` restores)."""

PRUNER_METRIC = "pruner_score"
"""What ASHA reads: the epoch's validation accuracy, NaN for a trial the pruner must not judge."""

_EPOCH = "epoch"


# --- in the worker -------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], *, config: SearchConfig, data: Dataset) -> None:
    """Ray Tune's trainable: evaluate a candidate the driver screened and accepted, reporting every epoch.

    Every result carries the searcher's metrics (``score``, and ``latency_ms`` for two objectives) and
    ASHA's, NaN where there is no value; the last one has ``final: 1``. An evaluation failure is an outcome
    (``outcome``: its reason), not an error."""
    from ray import tune

    threads = max(1, math.floor(config.ray.cpus_per_trial))
    torch.set_num_threads(config.train_threads or threads)
    base = {"score": math.nan, "latency_ms": float(params["latency_ms"]), PRUNER_METRIC: math.nan, _EPOCH: 0,
            "started": time.time(), "host": socket.gethostname(), "worker_pid": os.getpid()}
    graph = lower(read_spec(yaml.safe_load(params["spec"])))
    evaluator = make_evaluator(config.evaluator, **config.evaluator_options)
    device = "cuda" if config.ray.gpus_per_trial > 0 or config.device.startswith("cuda") else "cpu"
    prunable = bool(params.get("prunable"))

    def report(epoch: int, value: float) -> None:
        tune.report({**base, "score": value, PRUNER_METRIC: value if prunable else math.nan, _EPOCH: epoch})

    try:
        result = evaluate_candidate(graph, evaluator, data, seed=config.seed, device=device,
                                    report=report if not _multi(config) else None, max_memory=config.max_memory_bytes)
    except Failure as err:
        tune.report({**base, "outcome": err.reason.value, "detail": err.detail, "final": 1, "finished": time.time()})
        return
    tune.report({**base, "score": result.score, "metrics": json.dumps(result.metrics), "history": len(result.history),
                 "eval_seconds": result.seconds, "final": 1, _EPOCH: len(result.history), "finished": time.time()})


def _multi(config: SearchConfig) -> bool:
    return config.objectives == "score,latency"


# --- in the driver -------------------------------------------------------------------------------

def _searcher_class() -> type:
    """:class:`StudySearcher`, defined on first use (a function: Ray is imported only when used)."""
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):  # type: ignore[misc]
        """Ray Tune's searcher on the search's own Optuna study, through Ray's public ``Searcher`` interface.

        ``suggest`` asks the study for a trial and screens it here, in the driver (:class:`Screening`: decode,
        latency, memory, budget); a rejected candidate is told to the study at once and the next one asked,
        so no worker ever sees it. Accepted candidates go to a worker as ``{spec, latency_ms, prunable}``;
        their results come back to :meth:`on_trial_result` (the pruner's epochs) and
        :meth:`on_trial_complete` (the outcome, recorded the way the Optuna backend does). Its state, for Ray's
        experiment checkpoints and ``Tuner.restore``, is the study's URL and name, which Ray trial is which
        Optuna trial, and how many searched trials are still to ask; the study itself is reopened from storage.
        """

        def __init__(self, search: Search) -> None:
            config = search.config
            multi = _multi(config)
            super().__init__(metric=["score", "latency_ms"] if multi else "score",
                             mode=["max", "min"] if multi else "max")
            self._url, self._name, self._heartbeat = search.storage_url, config.name, config.heartbeat_s
            self._config = config
            self.screening = Screening(search.space, config, search.source)
            self.study = search.study
            self.progress: Callable[[TrialEvent], None] | None = None
            self.deadline = None if config.timeout_s is None else time.time() + config.timeout_s
            self.to_ask = max(config.trials - finished(search.study), 0)  # searched trials still to ask for
            self.trials: dict[str, optuna.Trial] = {}  # Ray trial id -> Optuna trial
            self.completed: set[str] = set()

        # -- pickling: what Ray saves and restores ------------------------------------------------
        def __getstate__(self) -> dict[str, Any]:
            state = self.__dict__.copy()
            state["trials"] = {tid: t._trial_id for tid, t in self.trials.items()}
            for name in ("study", "screening", "progress"):
                state[name] = None
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            ids = state.pop("trials")
            self.__dict__.update(state)
            study = optuna.load_study(study_name=self._name, storage=open_storage(self._url, self._heartbeat))
            self.study = study
            self.trials = {tid: optuna.Trial(study, i) for tid, i in ids.items()}

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.__getstate__(), f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
            keep = {k: getattr(self, k) for k in ("progress", "_config", "screening", "deadline")}  # this run's
            self.__setstate__(state)
            self.__dict__.update(keep)

        def resume(self, search: Search, progress: Callable[[TrialEvent], None] | None) -> None:
            """Bind a searcher Ray restored to this run (its config, screening, progress and deadline)."""
            config = search.config
            self._config, self.progress = config, progress
            self.screening = Screening(search.space, config, search.source)
            self.deadline = None if config.timeout_s is None else time.time() + config.timeout_s

        @property
        def unfinished(self) -> set[str]:
            """Ray trials given out whose end this searcher has not heard (a Ctrl-C leaves some)."""
            return set(self.trials) - self.completed

        # -- asking ---------------------------------------------------------------------------------
        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # the driver records outcomes itself; the storage's heartbeat belongs to Study.optimize
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                while True:
                    if self.deadline is not None and time.time() > self.deadline:
                        return Searcher.FINISHED  # --timeout: no new trials; running ones finish
                    if self.to_ask <= 0 and waiting_references(self.study) == 0:
                        return Searcher.FINISHED
                    trial = self.study.ask()
                    if not trial.user_attrs.get("reference"):
                        self.to_ask -= 1
                    try:
                        _, latency = self.screening(trial)
                    except Rejected:  # told here: the candidate never reaches a worker
                        self._tell(trial, None, TrialState.PRUNED)
                        continue
                    self.trials[trial_id] = trial
                    return {"spec": trial.user_attrs["spec"], "latency_ms": latency.ms,
                            "prunable": self.screening.prunable(trial)}

        def _tell(self, trial: optuna.Trial, values: Any, state: TrialState) -> None:
            frozen = self.study.tell(trial, values, state=state)
            if self.progress is not None:
                self.progress(event(self.study, frozen, self._config.trials))

        # -- results ----------------------------------------------------------------------------
        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            trial = self.trials.get(trial_id)
            if trial is None or trial_id in self.completed:
                return
            if "worker_pid" in result:
                worker = {"host": result.get("host"), "pid": int(result["worker_pid"])}
                before = trial.user_attrs.get("worker")
                if before != worker:  # the first result, or the trial runs again after its worker died
                    if before is not None:
                        trial.set_user_attr("earlier_workers", [*trial.user_attrs.get("earlier_workers", []), before])
                    trial.set_user_attr("worker", worker)
            value = result.get(PRUNER_METRIC)
            if value is not None and not math.isnan(value) and not result.get("final"):
                trial.report(float(value), int(result[_EPOCH]))

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                              error: bool = False) -> None:
            if trial_id in self.completed or trial_id not in self.trials:
                return
            self.completed.add(trial_id)
            trial = self.trials[trial_id]
            if self.study._storage.get_trial(trial._trial_id).state.is_finished():
                return  # told before the experiment state that Ray restored was saved
            state, values = self._outcome(trial, result or {}, error)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._tell(trial, values, state)

        def _outcome(self, trial: optuna.Trial, result: dict[str, Any],
                     error: bool) -> tuple[TrialState, Any]:
            if "started" in result:
                trial.set_user_attr("worker_started", float(result["started"]))
            if "finished" in result:
                trial.set_user_attr("worker_finished", float(result["finished"]))
            if error:
                runs = self._config.ray.max_failures + 1
                trial.set_user_attr("reason", Outcome.WORKER_FAILED.value)
                trial.set_user_attr("detail", f"the trial's worker failed {runs} time(s) (killed, or an error; "
                                              "see Ray's logs)")
                return TrialState.FAIL, None
            outcome = result.get("outcome")
            if outcome:
                trial.set_user_attr("reason", Outcome(outcome).value)
                trial.set_user_attr("detail", str(result.get("detail", "")))
                return TrialState.FAIL, None
            if not result.get("final"):
                epoch, value = result.get(_EPOCH), result.get("score")
                trial.set_user_attr("reason", Outcome.PRUNED.value)
                trial.set_user_attr("detail", f"stopped by ASHA after epoch {epoch} at {value:.4f}"
                                    if isinstance(value, float) and not math.isnan(value) else "stopped by ASHA")
                return TrialState.PRUNED, None
            metrics = json.loads(result.get("metrics", "{}"))
            record_result(trial, EvalResult(score=float(result["score"]), metrics=metrics,
                                            seconds=float(result.get("eval_seconds", 0.0))))
            score = float(result["score"])
            return TrialState.COMPLETE, ([score, float(result["latency_ms"])] if _multi(self._config) else score)

    return StudySearcher


def check_address(address: str | None) -> None:
    """Refuse a cluster address nothing answers at, before any study is opened (``auto``: Ray finds it)."""
    if address is None or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StudyError.single("--address", f"'{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as err:
        raise StudyError.single("--address", f"nothing answers at {hostport} ({err.strerror or err}); is "
                                             "`ray start --head` running there?") from None


def start_ray(config: SearchConfig) -> bool:
    """Join the cluster at ``ray.address``, or start a local Ray with this machine's CPUs; True when started
    here (and so to be shut down here)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    try:
        if config.ray.address:
            ray.init(address=config.ray.address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = config.ray.address or "a local Ray"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError.single("--address" if config.ray.address else "backend", f"cannot start {where}: "
                                                                                 f"{first}") from None
    return True


def workers(config: SearchConfig) -> int:
    """Trials at once: ``ray.workers``, or as many as the cluster's CPUs (and GPUs) allow."""
    import ray

    if config.ray.workers is not None:
        return config.ray.workers
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // config.ray.cpus_per_trial)
    if config.ray.gpus_per_trial > 0:
        fits = min(fits, int(resources.get("GPU", 0) // config.ray.gpus_per_trial))
    return max(1, fits)


def optimize_ray(search: Search, *, progress: Callable[[TrialEvent], None] | None = None) -> bool:
    """Run the study's remaining trials on Ray Tune (restoring ``RUN_DIR/ray/STUDY`` when Ray saved one).
    Returns True when the run was interrupted (Ray saved its state: ``--resume`` goes on from it)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often: resume loses little
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the study is the record
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    config = search.config
    started_here = start_ray(config)  # measurements take turns with the workers' training (latency.lease)
    try:
        experiments = search.run_dir.resolve() / RAY_DIR
        experiment = _latest_experiment(experiments, config.name)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, config=config, data=search.data),
            {"cpu": config.ray.cpus_per_trial, "gpu": config.ray.gpus_per_trial})
        if experiment is not None:
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       restart_errored=False)
            searcher = _restored_searcher(tuner)
            if searcher is not None:
                searcher.resume(search, progress)
            interrupted = _fit(tuner, searcher)
            if interrupted or finished(search.study) >= config.trials:
                return interrupted
        # a new Ray experiment for the trials still to run (a fresh study, or one resumed for more trials)
        experiment = experiments / (config.name if experiment is None else
                                    f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        plan_for(search)
        remaining = max(config.trials - finished(search.study), 0) + waiting_references(search.study)
        if remaining <= 0:
            return False
        searcher = _searcher_class()(search)
        searcher.progress = progress
        asha = config.evaluator == "train" and config.pruner != "none" and not _multi(config)
        epochs = int(config.evaluator_options.get("epochs", 5))
        scheduler = ASHAScheduler(time_attr=_EPOCH, metric=PRUNER_METRIC, mode="max", max_t=max(epochs, 1),
                                  grace_period=1, reduction_factor=2, stop_last_trials=False) if asha else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                        max_concurrent_trials=workers(config), reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=config.ray.max_failures)))
        return _fit(tuner, searcher)
    finally:
        if started_here:
            ray.shutdown()


def _latest_experiment(folder: Path, study: str) -> Path | None:
    """The study's newest Ray experiment in ``folder`` that Ray can restore (None: there is none)."""
    from ray import tune

    found = [p for p in folder.glob(f"{study}*") if p.is_dir() and (p.name == study or p.name.startswith(f"{study}-"))
             and tune.Tuner.can_restore(str(p))]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _fit(tuner: Any, searcher: Any) -> bool:
    """Run the tuner; True when it stopped with trials the searcher never heard the end of (a Ctrl-C: Ray
    saved its state, and those trials run again on ``--resume``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's deprecation and define-by-run timing notes
        tuner.fit()
    return searcher is not None and bool(searcher.unfinished)


def _restored_searcher(tuner: Any) -> Any:
    """The study searcher inside a restored tuner (Ray wraps it in a concurrency limiter)."""
    alg = tuner._local_tuner._tune_config.search_alg
    while alg is not None and not hasattr(alg, "unfinished"):
        alg = getattr(alg, "searcher", None)
    return alg


def describe(config: SearchConfig) -> str:
    """One line on where the trials run."""
    where = config.ray.address or f"a local Ray ({os.cpu_count()} CPUs)"
    return (f"Ray Tune on {where}: {config.ray.cpus_per_trial:g} CPU(s)"
            + (f" and {config.ray.gpus_per_trial:g} GPU(s)" if config.ray.gpus_per_trial else "") + " per trial")

