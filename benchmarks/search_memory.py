"""Resident memory over a search: does it grow with the number of trials?

Not a test. One zero-cost search of the tiny space (grad-norm on 64 synthetic images per candidate, the T4
estimate as latency, a generous budget so that most candidates are evaluated) runs in this process; after
every trial the process's resident set (``VmRSS`` from ``/proc/self/status``) is read. The goal: at the end of
60 trials it is within 10 % of what it was after 10 trials.

    python benchmarks/search_memory.py [--trials 60] [--out benchmarks/results/search_memory.json]

Writes the per-trial series to the JSON file and a plot next to it (``search_memory.png``).
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from rich.progress import Progress  # noqa: E402

from metaformer_lab.search.config import make_config  # noqa: E402
from metaformer_lab.search.run import TrialEvent, execute, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "search_memory.json"
GOAL = 0.10


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    console = Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    series: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(space="tiny", dataset="synthetic:256", evaluator="zero-cost", device="t4", budget="50ms",
                             trials=args.trials, seed=0, out=str(Path(tmp) / "run"), train_threads=1)
        search = prepare(config)
        start = time.time()
        with Progress(console=console) as bar:
            task = bar.add_task("searching", total=args.trials)

            def progress(event: TrialEvent) -> None:
                series.append({"trial": event.number, "searched": event.finished, "reason": event.reason,
                               "rss_mb": rss_mb(), "seconds": time.time() - start})
                bar.update(task, completed=event.finished,
                           description=f"trial {event.number}: {event.reason}, RSS {series[-1]['rss_mb']:.0f} MB")

            execute(search, progress=progress)
    at = {row["searched"]: row["rss_mb"] for row in series}  # the last reading at each searched count
    after_10, at_end = at.get(10), series[-1]["rss_mb"]
    growth = (at_end - after_10) / after_10 if after_10 else float("nan")
    verdict = "within" if abs(growth) <= GOAL else "beyond"
    console.print(f"resident memory after 10 searched trials: {after_10:.0f} MB; after {series[-1]['searched']}: "
                  f"{at_end:.0f} MB ({growth:+.1%}, {verdict} the {GOAL:.0%} goal)")
    result = {"trials": args.trials, "rss_after_10_mb": after_10, "rss_at_end_mb": at_end, "growth": growth,
              "goal": GOAL, "met": abs(growth) <= GOAL, "series": series, "cpu": platform.processor(),
              "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["searched"] for r in series], [r["rss_mb"] for r in series], "-o", ms=3)
    if after_10:
        ax.axhspan(after_10 * (1 - GOAL), after_10 * (1 + GOAL), color="tab:green", alpha=0.15,
                   label=f"within {GOAL:.0%} of the reading after 10 trials")
    ax.set_xlabel("searched trials finished (references run first, at 0)")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(f"zero-cost search of the tiny space: {at_end:.0f} MB at the end, {growth:+.1%} since trial 10",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
