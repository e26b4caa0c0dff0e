"""What the local study's write-ahead log saves: a zero-cost search of the tiny space with SQLite in WAL mode
(what ``search`` does) against SQLite's default rollback journal, interleaved in one process.

Not a test. Optuna commits every parameter, attribute and state change on its own; in the rollback mode each
commit waits for the disk. A zero-cost search (the parameter-count proxy, a T4 estimate: no training, no
timing) is where that shows most; a training search spends seconds per trial and the same ~0.1 s on commits.
The first search of the process (imports, caches) is run once untimed.

    python benchmarks/study_storage.py [--repeats 5] [--trials 8] [--out benchmarks/results/study_storage.json]
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

from metaformer_lab.search import study as study_module
from metaformer_lab.search.config import make_config
from metaformer_lab.search.run import run_search

MODES = ("rollback journal", "write-ahead log")


def _search(mode: str, trials: int) -> float:
    config = make_config(space="tiny", device="t4", budget="5ms", evaluator="zero-cost", trials=trials, seed=1,
                         evaluator_options={"proxy": "params"}, dataset="synthetic:64", train_threads=1,
                         out=str(Path(tempfile.mkdtemp()) / "run"))
    real = study_module._write_ahead
    if mode == "rollback journal":
        study_module._write_ahead = lambda engine: None
    try:
        start = time.perf_counter()
        run_search(config)
        return time.perf_counter() - start
    finally:
        study_module._write_ahead = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "study_storage.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _search(MODES[1], args.trials)  # warm-up: imports, caches
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    for k in range(args.repeats):
        for mode in (MODES if k % 2 == 0 else MODES[::-1]):  # alternate the order: drift hits both
            runs[mode].append(round(_search(mode, args.trials), 3))
            print(f"{k + 1}/{args.repeats} {mode}: {runs[mode][-1]:.2f} s", flush=True)
    medians = {mode: statistics.median(times) for mode, times in runs.items()}
    ratio = medians["write-ahead log"] / medians["rollback journal"]
    result: dict[str, Any] = {
        "benchmark": "study_storage", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "trials": args.trials, "repeats": args.repeats,
        "search_s": {mode: {"median": round(medians[mode], 3), "runs": runs[mode]} for mode in MODES},
        "ratio_wal_to_rollback": round(ratio, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median {medians['rollback journal']:.2f} s -> {medians['write-ahead log']:.2f} s with the log "
          f"(x{ratio:.3f}); wrote {args.out}")


if __name__ == "__main__":
    main()
