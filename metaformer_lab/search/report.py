"""After a search: finalists re-measured on the target device, and the run folder written from storage.

The run folder holds ``best.yaml`` (a valid spec), ``pareto/*.yaml`` (the score/latency front of the
feasible trials), ``trials.csv``, ``pareto.png``, ``summary.json`` and ``run.json`` (where the study is).
Everything here is read back from the study, so ``metaformer-lab report RUN_DIR`` rewrites it all.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from metaformer_lab.core.errors import StudyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.lower import lower
from metaformer_lab.latency.source import LatencySource
from metaformer_lab.search.references import reference_counts
from metaformer_lab.search.study import RUN_FILE, counts, feasible, front, open_storage, outcome, scored
from metaformer_lab.spec.load import read_spec

FINALISTS = "finalists"


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible trials, best score first (then lower latency)."""
    return sorted(scored(study), key=lambda t: (-t.user_attrs["score"], t.user_attrs["latency_ms"]))


def graph_of(trial: FrozenTrial) -> ArchGraph:
    return lower(read_spec(yaml.safe_load(trial.user_attrs["spec"])))


def remeasure_finalists(study: optuna.Study, source: LatencySource, budget_ms: float, count: int, *,
                        passes: int = 3, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure the best ``count`` trials (and, for two objectives, the Pareto front) on the target device;
    each latency is the fastest of ``passes`` medians. When all of them break the budget, the next best are
    measured too (up to ``3 * count`` in all), so that the best trial is one measured within budget.
    Stored in the study's user attrs."""
    order = ranked(study)
    chosen = order[:count]
    if len(study.directions) > 1:
        chosen += [t for t in front(scored(study)) if t not in chosen]
    results: dict[str, Any] = dict(study.user_attrs.get(FINALISTS, {}))
    if not source.can_measure:
        for t in chosen:
            results[str(t.number)] = {"measured_ms": None, "within_budget": None,
                                      "note": f"not measured: {source.describe()}"}
        study.set_user_attr(FINALISTS, results)
        return results
    spare = [t for t in order[count:3 * count] if t not in chosen]
    k = 0
    while chosen:
        t = chosen.pop(0)
        k += 1
        if str(t.number) not in results:
            results[str(t.number)] = _measure(source, graph_of(t), budget_ms, passes)
            study.set_user_attr(FINALISTS, results)  # kept as it goes: an interrupted run loses none
        if progress is not None:
            progress(k, k + len(chosen))
        if not chosen and spare and not any(m.get("within_budget") for m in results.values()):
            chosen.append(spare.pop(0))
    return results


def _measure(source: LatencySource, graph: ArchGraph, budget_ms: float, passes: int) -> dict[str, Any]:
    runs = [source.measure(graph) for _ in range(passes)]
    fastest = min(runs, key=lambda r: r.median_ms)
    return {"measured_ms": fastest.median_ms, "p10_ms": fastest.p10_ms, "p90_ms": fastest.p90_ms, "cv": fastest.cv,
            "noisy": all(r.noisy for r in runs), "within_budget": fastest.median_ms <= budget_ms, "passes": passes,
            "provenance": fastest.provenance.to_json()}


def best_trial(study: optuna.Study) -> tuple[FrozenTrial | None, list[dict[str, Any]]]:
    """The best trial within budget, and the finalists that broke the budget when measured (reported, not
    hidden). Once finalists were measured, only a measured one can be best: a prediction alone does not
    make a trial the answer."""
    finalists = study.user_attrs.get(FINALISTS, {})
    measured_any = any(m.get("measured_ms") is not None for m in finalists.values())
    broke = []
    best = None
    for t in ranked(study):
        measured = finalists.get(str(t.number))
        if measured is not None and measured.get("within_budget") is False:
            broke.append({"trial": t.number, "score": t.user_attrs["score"], "latency_ms": t.user_attrs["latency_ms"],
                          "measured_ms": measured["measured_ms"]})
            continue
        if best is None and (measured is not None or not measured_any):
            best = t
    return best, broke


def _row(t: FrozenTrial, finalists: dict[str, Any]) -> dict[str, Any]:
    a = t.user_attrs
    m = finalists.get(str(t.number), {})
    return {"number": t.number, "state": t.state.name.lower(), "reason": outcome(t).value,
            "reference": a.get("reference", ""), "score": a.get("score", ""), "latency_ms": a.get("latency_ms", ""),
            "latency_source": a.get("latency_source", ""), "measured_ms": m.get("measured_ms", ""),
            "params": a.get("params", ""), "flops": a.get("flops", ""), "feasible": feasible(t),
            "detail": a.get("detail", ""), "spec_name": a.get("spec_name", ""),
            "duration_s": t.duration.total_seconds() if t.duration else "",
            "started": t.datetime_start.isoformat(timespec="milliseconds") if t.datetime_start else "",
            "completed": t.datetime_complete.isoformat(timespec="milliseconds") if t.datetime_complete else "",
            "worker": _worker(a.get("worker")),
            "assignment": json.dumps(t.params, sort_keys=True)}


def _worker(worker: Any) -> str:
    """``host:pid`` of the Ray worker that ran the trial ('' for the Optuna backend)."""
    return f"{worker.get('host')}:{worker.get('pid')}" if isinstance(worker, dict) else ""


def write_csv(study: optuna.Study, path: Path) -> None:
    finalists = study.user_attrs.get(FINALISTS, {})
    rows = [_row(t, finalists) for t in study.get_trials(deepcopy=False)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)


def _spec_text(t: FrozenTrial, study: optuna.Study, what: str) -> str:
    a = t.user_attrs
    m = study.user_attrs.get(FINALISTS, {}).get(str(t.number), {})
    measured = f", measured {m['measured_ms']:.3f} ms" if m.get("measured_ms") is not None else ""
    head = (f"# {what} of study '{study.study_name}', trial {t.number}: score {a['score']:.4f}, latency "
            f"{a['latency_ms']:.3f} ms ({a.get('latency_label', a.get('latency_source'))}){measured}\n")
    return head + str(a["spec"])


def summary(study: optuna.Study, storage: str) -> dict[str, Any]:
    config = study.user_attrs.get("config", {})
    finalists = study.user_attrs.get(FINALISTS, {})
    best, broke = best_trial(study)
    refs = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get("reference")
        if name:
            refs[name] = {"trial": t.number, "reason": outcome(t).value, "score": t.user_attrs.get("score"),
                          "latency_ms": t.user_attrs.get("latency_ms"),
                          "feasible": feasible(t) if t.constraints else None,
                          "evaluated": "score" in t.user_attrs}  # the latest trial of the reference wins
    out: dict[str, Any] = {
        "study": study.study_name, "storage": storage,
        "budget_ms": study.user_attrs.get("identity", {}).get("budget_ms"),
        "budget_margin": study.user_attrs.get("budget_margin"),
        "device": config.get("device"), "latency": study.user_attrs.get("latency_description"),
        "space": config.get("space"), "dataset": config.get("dataset"), "evaluator": config.get("evaluator"),
        "objectives": config.get("objectives"), "dtype": config.get("dtype"),
        "dtype_note": study.user_attrs.get("dtype_note"), "max_memory": config.get("max_memory"),
        "trials": counts(study), "references": refs, "reference_counts": reference_counts(study),
        "finalists": finalists, "finalists_over_budget": broke, "best": None}
    if best is not None:
        m = finalists.get(str(best.number), {})
        out["best"] = {"trial": best.number, "score": best.user_attrs["score"],
                       "latency_ms": best.user_attrs["latency_ms"],
                       "latency_source": best.user_attrs.get("latency_source"),
                       "latency_label": best.user_attrs.get("latency_label"),
                       "measured_ms": m.get("measured_ms"), "params": best.user_attrs.get("params"),
                       "flops": best.user_attrs.get("flops"), "spec_name": best.user_attrs.get("spec_name"),
                       "reference": best.user_attrs.get("reference"), "assignment": best.params}
    return out


def write_run(study: optuna.Study, run_dir: Path, storage: str) -> dict[str, Any]:
    """Write best.yaml, pareto/, trials.csv, pareto.png and summary.json from the study."""
    from metaformer_lab.search.plots import pareto_plot

    run_dir.mkdir(parents=True, exist_ok=True)
    write_csv(study, run_dir / "trials.csv")
    report = summary(study, storage)
    best, _ = best_trial(study)
    if best is not None:
        (run_dir / "best.yaml").write_text(_spec_text(best, study, "best trial"))
    pareto = run_dir / "pareto"
    pareto.mkdir(exist_ok=True)
    for old in pareto.glob("*.yaml"):
        old.unlink()
    for k, t in enumerate(front(scored(study))):
        (pareto / f"{k:02d}_trial{t.number:04d}.yaml").write_text(_spec_text(t, study, f"Pareto point {k}"))
    report["pareto"] = [t.number for t in front(scored(study))]
    pareto_plot(study, run_dir / "pareto.png", report)
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2, default=_json) + "\n")
    return report


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def load_run(run_dir: str | Path) -> tuple[optuna.Study, str]:
    """The study a run folder points to (``run.json``); raises StudyError when there is none."""
    folder = Path(run_dir)
    info = folder / RUN_FILE
    if not info.is_file():
        raise StudyError.single(str(folder), f"is not a run folder (no {RUN_FILE})")
    try:
        meta = json.loads(info.read_text())
        url, name = meta["storage"], meta["study_name"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise StudyError.single(str(info), f"is damaged ({err})") from None
    storage = open_storage(url, int(meta.get("config", {}).get("heartbeat_s", 10)))
    try:
        return optuna.load_study(study_name=name, storage=storage), url
    except KeyError:
        raise StudyError.single(str(info), f"the study '{name}' is not in {url}") from None
