"""Start-up time of the command line: wall time of fresh ``metaformer-lab`` processes, median of a few runs.

Not a test: every run is a new interpreter (nothing cached in memory but the OS page cache), timed from
``subprocess.run`` to exit, at one thread. Goals on a 2-core machine: ``--help`` and ``--version`` <= 0.5 s,
``space size tiny`` <= 1 s, ``validate`` and ``zoo list`` <= 2 s. A first, untimed run of each command warms the
page cache.

    python benchmarks/cli_startup.py [--repeats 5] [--out benchmarks/results/cli_startup.json] [--as-before]

``--as-before`` stores the medians under ``before`` (the numbers of the code before a change); a plain run
stores them under ``after`` and keeps an existing ``before``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
COMMANDS: dict[str, list[str]] = {
    "--help": ["--help"],
    "--version": ["--version"],
    "space size tiny": ["space", "size", "tiny"],
    "validate examples/tiny_caformer.yaml": ["validate", "examples/tiny_caformer.yaml"],
    "zoo list": ["zoo", "list"],
}
GOALS_S = {"--help": 0.5, "--version": 0.5, "space size tiny": 1.0, "validate examples/tiny_caformer.yaml": 2.0,
           "zoo list": 2.0}
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def _cli() -> list[str]:
    """The console script next to this interpreter (the installed entry point), else ``python -m``."""
    script = Path(sys.executable).with_name("metaformer-lab")
    if script.exists():
        return [str(script)]
    found = shutil.which("metaformer-lab")
    return [found] if found else [sys.executable, "-m", "metaformer_lab.cli"]


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **THREADS}, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def measure(repeats: int) -> dict[str, dict[str, float | list[float]]]:
    cli = _cli()
    rows: dict[str, dict[str, float | list[float]]] = {}
    for name, args in COMMANDS.items():
        _seconds([*cli, *args])  # warm the page cache; not counted
        runs = [_seconds([*cli, *args]) for _ in range(repeats)]
        rows[name] = {"median_s": round(statistics.median(runs), 3), "runs_s": [round(r, 3) for r in runs]}
    return rows


def _table(before: dict[str, dict] | None, after: dict[str, dict]) -> Table:  # type: ignore[type-arg]
    table = Table(title="metaformer-lab start-up (median wall time, fresh processes)", title_justify="left")
    for column in ("command", "before s", "now s", "goal s", "met"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, row in after.items():
        old = f"{before[name]['median_s']:.3f}" if before and name in before else "-"
        median = float(row["median_s"])
        met = "[green]yes[/]" if median <= GOALS_S[name] else "[red]no[/]"
        table.add_row(name, old, f"{median:.3f}", f"{GOALS_S[name]:g}", met)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    parser.add_argument("--as-before", action="store_true", help="Store the medians as the `before` numbers.")
    args = parser.parse_args()
    rows = measure(args.repeats)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    result = {"benchmark": "cli_startup", "goal_s": GOALS_S, "repeats": args.repeats,
              "before": rows if args.as_before else previous.get("before"),
              "after": None if args.as_before else rows,
              "provenance": {"python": platform.python_version(), "machine": platform.machine(),
                             "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1}}
    Console().print(_table(result["before"] if not args.as_before else None, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
