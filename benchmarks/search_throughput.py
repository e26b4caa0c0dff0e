"""Trials per minute: the Optuna backend in one process against the Ray backend with 1 and 2 workers.

Not a test. Every run is the same study — the tiny space on digits, the ``train`` evaluator with a fixed
number of epochs and no pruning, so that every evaluated candidate costs about the same — with Optuna's
seeded ``RandomSampler``, which draws the same candidates in the same order however many trials run at
once. Latency is the T4 estimate with a generous budget: no timing competes with training, and few
candidates are turned away. Runs follow each other in one process, so their ratios are comparable.

    python benchmarks/search_throughput.py [--trials 12] [--epochs 2] [--out benchmarks/results/search_throughput.json]

Reported per run: wall time from ``execute`` to the end (Ray's start-up included), the span from the
first trial's start to the last one's end, and trials per minute over each. A timeline of the trials (one
row per worker) goes to ``search_throughput.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from metaformer_lab.search.config import make_config  # noqa: E402
from metaformer_lab.search.run import execute, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "search_throughput.json"

RUNS: list[tuple[str, dict[str, Any]]] = [
    ("optuna, 1 process, 1 thread", {"backend": "optuna", "train_threads": 1}),
    ("optuna, 1 process, 2 threads", {"backend": "optuna", "train_threads": 2}),
    ("ray, 1 worker x 1 CPU", {"backend": "ray", "ray": {"workers": 1, "cpus_per_trial": 1}}),
    ("ray, 2 workers x 1 CPU", {"backend": "ray", "ray": {"workers": 2, "cpus_per_trial": 1}}),
]


def one_run(label: str, over: dict[str, Any], trials: int, epochs: int, folder: Path) -> dict[str, Any]:
    config = make_config(space="tiny", dataset="digits", evaluator="train", device="t4", budget="50ms",
                         evaluator_options={"epochs": epochs, "max_batches_per_epoch": 6}, pruner="none",
                         sampler="random", seed=0, trials=trials, out=str(folder), study_name="throughput",
                         **over)
    search = prepare(config)
    start = time.time()
    execute(search)
    wall = time.time() - start
    spans = []
    for t in search.study.get_trials(deepcopy=False):
        a = t.user_attrs
        begin = a.get("worker_started", t.datetime_start.timestamp() if t.datetime_start else None)
        end = a.get("worker_finished", t.datetime_complete.timestamp() if t.datetime_complete else None)
        if begin is None or end is None:
            continue
        worker = a.get("worker", {})
        spans.append({"trial": t.number, "start": begin - start, "end": end - start,
                      "worker": f"{worker.get('host')}:{worker.get('pid')}", "state": t.state.name.lower(),
                      "evaluated": "score" in a})
    first, last = min(s["start"] for s in spans), max(s["end"] for s in spans)
    done = len(search.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                               optuna.trial.TrialState.PRUNED,
                                                               optuna.trial.TrialState.FAIL)))
    evaluated = sum(s["evaluated"] for s in spans)
    return {"run": label, "settings": over, "trials": done, "evaluated": evaluated, "wall_s": wall,
            "span_s": last - first, "trials_per_min_wall": 60 * done / wall,
            "trials_per_min_span": 60 * done / (last - first), "spans": spans}


def timeline(results: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.2 + 1.1 * len(results)), sharex=True)
    for ax, r in zip(axes, results, strict=True):
        workers = sorted({s["worker"] for s in r["spans"]})
        for s in r["spans"]:
            row = workers.index(s["worker"])
            ax.barh(row, s["end"] - s["start"], left=s["start"], height=0.7,
                    color="tab:blue" if s["evaluated"] else "lightgray", edgecolor="white")
        ax.set_yticks(range(len(workers)), [f"worker {k + 1}" for k in range(len(workers))])
        ax.set_title(f"{r['run']}: {r['trials_per_min_wall']:.1f} trials/min (wall), "
                     f"{r['trials_per_min_span']:.1f} (first start to last end)", fontsize=9, loc="left")
        ax.set_ylim(-0.6, max(len(workers), 2) - 0.4)
    axes[-1].set_xlabel("seconds since the search started (blue: trained; grey: turned away before training)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console(stderr=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, over) in enumerate(RUNS):
            console.print(f"[{k + 1}/{len(RUNS)}] {label}: {args.trials} trials ...")
            results.append(one_run(label, over, args.trials, args.epochs, Path(tmp) / f"run{k}"))
            console.print(f"    {results[-1]['trials_per_min_wall']:.2f} trials/min (wall "
                          f"{results[-1]['wall_s']:.0f} s)")
    base = next(r for r in results if r["run"].startswith("ray, 1 worker"))
    table = Table(title="search throughput (same study, same candidates)", title_justify="left")
    for c in ("run", "trials", "trained", "wall s", "trials/min (wall)", "trials/min (span)", "vs ray x1"):
        table.add_column(c, justify="left" if c == "run" else "right")
    for r in results:
        r["speedup_vs_ray_1_worker"] = r["trials_per_min_wall"] / base["trials_per_min_wall"]
        table.add_row(r["run"], str(r["trials"]), str(r["evaluated"]), f"{r['wall_s']:.0f}",
                      f"{r['trials_per_min_wall']:.2f}", f"{r['trials_per_min_span']:.2f}",
                      f"{r['speedup_vs_ray_1_worker']:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    timeline(results, png)
    args.out.write_text(json.dumps({
        "benchmark": "search_throughput", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "trials": args.trials, "epochs": args.epochs, "results": results}, indent=1) + "\n")
    Console().print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
