"""Does the search beat random search? Same study, same trial count, same seeds; only the sampler differs.

Not a test. For each seed, the study (default: the README's main job, ``studies/tiny_digits_2ms.yaml``)
is run twice — with its own sampler (TPE) and with Optuna's ``RandomSampler`` — each in a fresh SQLite
storage, and the best validation accuracy within the latency budget is compared. Both runs start with the
space's reference points (scaled-down PoolFormer, ConvFormer, CAFormer, ViT), so the report also says
which of them the front found by each run dominates (a found trial at least as accurate and at least as
fast, better in one; references over budget are scored all the same, so they can be dominated).

    python benchmarks/search_vs_random.py [--study studies/tiny_digits_2ms.yaml] [--seeds 0 1 2]
        [--trials N] [--out benchmarks/results/search_vs_random.json]

Latency inside the runs is the shipped profile's prediction, so the comparison is not decided by timing
noise; the finalists' re-measurement is skipped here (it does not change which run scored better).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaformer_lab.search.config import load_study_file
from metaformer_lab.search.run import optimize, prepare
from metaformer_lab.search.study import front, outcome, scored

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = ROOT / "studies" / "tiny_digits_2ms.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "search_vs_random.json"


def dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    sa, la = a.user_attrs["score"], a.user_attrs["latency_ms"]
    sb, lb = b.user_attrs["score"], b.user_attrs["latency_ms"]
    return sa >= sb and la <= lb and (sa > sb or la < lb)


def one_run(study_file: Path, sampler: str, seed: int, trials: int | None, folder: Path,
            progress: Progress) -> dict[str, Any]:
    config = load_study_file(study_file, sampler=sampler, seed=seed, trials=trials, out=str(folder),
                             study_name=f"{sampler}-seed{seed}")
    search = prepare(config)
    task = progress.add_task(f"{sampler}, seed {seed}", total=config.trials)
    start = time.perf_counter()
    optimize(search, progress=lambda e: progress.update(task, completed=min(e.finished, e.total)))
    seconds = time.perf_counter() - start
    study = search.study
    feasible = scored(study)
    found = [t for t in feasible if "reference" not in t.user_attrs]
    references = {t.user_attrs["reference"]: t for t in study.get_trials(deepcopy=False)
                  if "reference" in t.user_attrs}
    pareto = front(found)
    best = max(feasible, key=lambda t: t.user_attrs["score"], default=None)
    best_found = max(found, key=lambda t: t.user_attrs["score"], default=None)
    by_reason: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        by_reason[outcome(t).value] = by_reason.get(outcome(t).value, 0) + 1
    refs = {}
    for name, ref in references.items():
        scored_ref = "score" in ref.user_attrs and "latency_ms" in ref.user_attrs  # over budget, yet scored
        refs[name] = {"score": ref.user_attrs.get("score"), "latency_ms": ref.user_attrs.get("latency_ms"),
                      "outcome": outcome(ref).value,
                      "dominated_by_found": scored_ref and any(dominates(t, ref) for t in pareto)}
    return {"sampler": sampler, "seed": seed, "trials": len(study.trials), "seconds": round(seconds, 1),
            "by_reason": by_reason,
            "best_score": best.user_attrs["score"] if best else None,
            "best_is_reference": best is not None and "reference" in best.user_attrs,
            "best_found_score": best_found.user_attrs["score"] if best_found else None,
            "best_found_latency_ms": best_found.user_attrs["latency_ms"] if best_found else None,
            "front": [{"trial": t.number, "score": t.user_attrs["score"], "latency_ms": t.user_attrs["latency_ms"]}
                      for t in pareto],
            "references": refs}


def show(console: Console, runs: list[dict[str, Any]]) -> None:
    table = Table(title="best validation accuracy within budget (trials found by the sampler, references aside)")
    for column in ("seed", "sampler", "best found", "at ms", "best incl. references", "over budget",
                   "references dominated"):
        table.add_column(column, justify="left" if column in ("sampler", "references dominated") else "right")
    for r in runs:
        dominated = [n for n, ref in r["references"].items() if ref["dominated_by_found"]]
        score = "-" if r["best_found_score"] is None else f"{r['best_found_score']:.4f}"
        lat = "-" if r["best_found_latency_ms"] is None else f"{r['best_found_latency_ms']:.3f}"
        table.add_row(str(r["seed"]), r["sampler"], score, lat,
                      "-" if r["best_score"] is None else f"{r['best_score']:.4f}",
                      str(r["by_reason"].get("over_budget", 0)), ", ".join(dominated) or "none")
    console.print(table)


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted({r["seed"] for r in runs})
    pairs = []
    for seed in seeds:
        by = {r["sampler"]: r for r in runs if r["seed"] == seed}
        a, b = by["tpe"]["best_found_score"], by["random"]["best_found_score"]
        pairs.append({"seed": seed, "tpe": a, "random": b,
                      "difference": None if a is None or b is None else round(a - b, 4)})
    diffs = [p["difference"] for p in pairs if p["difference"] is not None]
    return {"pairs": pairs, "tpe_wins": sum(d > 0 for d in diffs), "random_wins": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "mean_difference": round(statistics.mean(diffs), 4) if diffs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=None, help="default: the study's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if len(args.seeds) < 3:
        parser.error("use at least three seeds")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console()
    runs = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console) as progress:
        for seed in args.seeds:
            for sampler in ("tpe", "random"):
                runs.append(one_run(args.study, sampler, seed, args.trials, Path(tmp) / f"{sampler}{seed}", progress))
    show(console, runs)
    result = {"runs": runs, "comparison": compare(runs), "provenance": {
        "benchmark": "search_vs_random", "study": str(args.study), "seeds": args.seeds,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "optuna": optuna.__version__, "python": platform.python_version(),
        "seconds": round(time.perf_counter() - start, 1)}}
    c = result["comparison"]
    console.print(f"TPE better on {c['tpe_wins']} of {len(c['pairs'])} seeds, random on {c['random_wins']}, "
                  f"ties {c['ties']}; mean difference {c['mean_difference']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
