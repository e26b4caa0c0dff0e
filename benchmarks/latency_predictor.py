"""How well do the shipped CPU profiles predict latency on this machine? Reproduces their accuracy figures.

Not a test. For each shipped CPU profile (or ``--profile``): draw ``--n`` architectures from the space it
was calibrated on, with a seed its calibration never used, measure each one (interleaved in groups of 8,
p10 of ~2 s of runs at the profile's thread count), predict it from the profile, and report the share within
±5 % and ±10 %, the mean absolute percentage error, Spearman's rank correlation and the worst error, as
``latency evaluate`` does; plus the predictor's own cost per spec (CPU time, median). Each profile is
reported twice on the same measurements: as shipped, and rescaled to this host by the host check
(``metaformer_lab.latency.host``: 8 other networks measured first), which is how the search and
``latency SPEC`` use it. Accuracy goal: ≥ 95 % within ±10 % and MAPE ≤ 5 %.

    python benchmarks/latency_predictor.py [--profile NAME ...] [--n 200] [--seed 100]
        [--out benchmarks/results/latency_predictor.json]

Writes OUT (JSON with provenance) and one scatter plot per profile beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaformer_lab.latency.evaluate import accuracy, evaluate, scatter_plot
from metaformer_lab.latency.host import HOST_SEED, fit_to_host
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import Profile, resolve_profile, shipped_profiles
from metaformer_lab.latency.target import cpu_name
from metaformer_lab.space import load_space, sample

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency_predictor.json"


def predictor_ms(profile: Profile, graphs: list[Any], repeats: int = 20) -> float:
    """Median CPU time of one ``predict`` call (graphs already lowered, as in a search)."""
    times = []
    for graph in graphs:
        predict(graph, profile)
        for _ in range(repeats):
            t0 = time.process_time()
            predict(graph, profile)
            times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def one(profile: Profile, n: int, seed: int, out_dir: Path, progress: Progress) -> list[dict[str, Any]]:
    """The profile as shipped and rescaled to this host (8 check networks, seed HOST_SEED), on the same
    measurements of ``n`` networks."""
    used = profile.fit.get("calibration", {})
    if seed in (*used.get("seeds", []), HOST_SEED):
        raise SystemExit(f"seed {seed} drew the calibration or host-check networks of {profile.name}; pick another")
    space = load_space(used.get("space", "tiny"))
    graphs = [p.graph for p in sample(space, n, seed=seed).points]
    _, check, _ = fit_to_host(profile, space)
    assert check is not None
    task = progress.add_task(f"{profile.name}: measuring {n} networks", total=n)
    report = evaluate(profile, graphs, progress=lambda done, total: progress.update(task, completed=done),
                      context={"space": space.name, "seed": seed, "host_scale": 1.0})
    scaled = accuracy(profile, [replace(p, predicted_ms=p.predicted_ms * check.scale) for p in report.pairs],
                      {**report.context, "host_scale": check.scale})
    cost = round(predictor_ms(profile, graphs[:10]), 3)
    out = []
    for label, r in (("as shipped", report), (f"rescaled x{check.scale:.2f} to this host", scaled)):
        name = "shipped" if r is report else "host"
        plot = scatter_plot(r, out_dir / f"latency_predictor_{profile.name}_{name}.png",
                            title=f"profile {profile.name} {label}: {n} unseen networks")
        out.append({**r.to_json(pairs=True), "variant": label, "plot": _rel(plot), "predict_cpu_ms": cost,
                    "host_check": check.to_json()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", nargs="+", default=None, help="default: every shipped CPU profile")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    profiles = [resolve_profile(p) for p in args.profile] if args.profile else \
        [p for p in shipped_profiles() if p.target.kind == "cpu"]
    console = Console()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for profile in profiles:
            results += one(profile, args.n, args.seed, args.out.parent, progress)
    table = Table(title=f"latency prediction on {args.n} unseen networks per profile (seed {args.seed})")
    for column in ("profile", "predictions", "within ±5 %", "within ±10 %", "MAPE", "Spearman", "max error",
                   "predict (CPU ms)"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for r in results:
        table.add_row(r["profile"], r["variant"], f"{r['within_5']:.1%}", f"{r['within_10']:.1%}", f"{r['mape']:.2%}",
                      f"{r['spearman']:.3f}", f"{r['max_abs_error']:.1%}", f"{r['predict_cpu_ms']:.2f}")
    console.print(table)
    provenance = {"benchmark": "latency_predictor", "cpu": cpu_name(), "torch": torch.__version__,
                  "python": platform.python_version(), "n": args.n, "seed": args.seed,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.write_text(json.dumps({"profiles": results, "provenance": provenance}, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
