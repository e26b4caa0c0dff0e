"""The Ray backend's searcher, driven by hand (no Ray cluster): candidates are screened in the driver, and
one rejected there is recorded at once and never handed to a worker."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
from optuna.trial import TrialState

from metaformer_lab.search.config import make_config
from metaformer_lab.search.ray_backend import _searcher_class
from metaformer_lab.search.references import plan_for
from metaformer_lab.search.run import prepare
from metaformer_lab.search.study import finished


def _search(tmp_path: Path, budget: str, trials: int):  # noqa: ANN202  (a prepared Search)
    config = make_config(space="tiny", device="t4", budget=budget, evaluator="zero-cost",
                         evaluator_options={"proxy": "params"}, dataset="synthetic:64", trials=trials,
                         out=str(tmp_path / "run"), seed=1, backend="ray")
    search = prepare(config)
    plan_for(search)
    return search


def test_rejected_candidates_never_reach_a_worker(tmp_path: Path) -> None:
    search = _search(tmp_path, "0.9ms", trials=12)
    searcher = _searcher_class()(search)
    handed = []
    for i in range(100):
        suggestion = searcher.suggest(f"ray-{i}")
        if suggestion == "FINISHED":
            break
        handed.append((suggestion, searcher.trials[f"ray-{i}"].user_attrs.get("reference")))
        searcher.on_trial_complete(f"ray-{i}", {"score": 0.5, "latency_ms": suggestion["latency_ms"], "final": 1})
    searched = [s for s, reference in handed if not reference]
    trials = search.study.get_trials()
    rejected = [t for t in trials if t.state == TrialState.PRUNED]
    assert searched and rejected  # a budget that some candidates meet and some do not
    assert all(s["latency_ms"] <= 0.9 for s in searched)  # only candidates within the budget go out (references
    # near it are scored anyway, to show where they sit)
    assert {t.user_attrs["reason"] for t in rejected} <= {"over_budget", "invalid"}
    assert all("worker" not in t.user_attrs for t in rejected)
    assert len(handed) == sum(t.state == TrialState.COMPLETE for t in trials)
    assert finished(search.study) == 12  # the searched trials asked for, no more, then FINISHED


def test_its_state_survives_ray_checkpoints(tmp_path: Path) -> None:
    search = _search(tmp_path, "50ms", trials=3)
    searcher = _searcher_class()(search)
    first = searcher.suggest("ray-0")
    assert isinstance(first, dict) and "spec" in first
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    state = pickle.loads(path.read_bytes())
    assert state["trials"] == {"ray-0": searcher.trials["ray-0"]._trial_id} and state["study"] is None
    again = _searcher_class()(search)
    again.restore(str(path))
    assert again.unfinished == {"ray-0"} and again.to_ask == searcher.to_ask
    again.on_trial_complete("ray-0", {"score": 0.25, "latency_ms": first["latency_ms"], "final": 1})
    told = search.study.get_trials()[searcher.trials["ray-0"].number]
    assert told.state == TrialState.COMPLETE and told.value == 0.25 and not again.unfinished
    assert isinstance(again.study, optuna.Study)
