"""CPU latency of our zoo models divided by timm's same-name model, eager and in the deploy form.

Not a test: for each model, timm's model (``timm.create_model(name, pretrained=False)``), ours with the same
weights (``from_timm``) and our deploy form (``metaformer_lab.deploy``) are measured interleaved in one run
(``latency.interleave.measure_interleaved``: short bursts in turn, so a machine whose speed wanders slows all
three alike), at one thread, batch 1, at the model's input size. Ratios are ours / timm's of the medians of the
repeated runs (the 10th percentiles too, the steadier statistic on a shared host). The three outputs are
compared first. Ratios below 1.0: ours is faster.

    python benchmarks/timm_ratio.py [--quick] [--models NAME ...] [--seconds 3] [--compile] [--out ...]

``--quick``: six models, one per family (a few minutes); default: every zoo model. ``--compile`` (with ``--quick``
or ``--models``: compiling every zoo model would take hours here) measures the three forms a second time under
``torch.compile`` (inductor, default mode; the first call compiles and is not timed), interleaved in the same way,
and adds the compiled ratios: compiled ours / compiled timm's, and compiled deploy / compiled timm's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import metaformer_lab as ml
from metaformer_lab.latency.interleave import measure_interleaved
from metaformer_lab.latency.target import LatencyTarget, cpu_name

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["poolformer_s12", "vit_tiny_patch16_224", "convnext_atto", "efficientformer_l1", "pvt_v2_b0",
         "resmlp_12_224"]
"""One model per family: metaformer, vit, convnext, efficientformer, pvt_v2, mlp_mixer."""


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _timed(modules: list[torch.nn.Module], target: LatencyTarget, seconds: float) -> dict[str, Any]:
    """The three forms (timm, eager, deploy) measured interleaved at ``target``: medians, p10s, ratios to timm."""
    results = measure_interleaved(modules, target, time_per_item_s=seconds)
    timm_r, eager_r, deploy_r = results
    return {
        "median_ms": {"timm": timm_r.median_ms, "eager": eager_r.median_ms, "deploy": deploy_r.median_ms},
        "p10_ms": {"timm": timm_r.p10_ms, "eager": eager_r.p10_ms, "deploy": deploy_r.p10_ms},
        "runs": {"timm": timm_r.runs, "eager": eager_r.runs, "deploy": deploy_r.runs},
        "ratio_eager": eager_r.median_ms / timm_r.median_ms, "ratio_deploy": deploy_r.median_ms / timm_r.median_ms,
        "ratio_eager_p10": eager_r.p10_ms / timm_r.p10_ms, "ratio_deploy_p10": deploy_r.p10_ms / timm_r.p10_ms,
        "noisy": [r.noise_reasons for r in results if r.noisy],
    }


def measure(name: str, seconds: float, *, compiled: bool = False) -> dict[str, Any]:
    """timm's model, ours and our deploy form of zoo model ``name``, interleaved (then compiled, if asked)."""
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False).eval()
    ours = ml.from_timm(theirs).eval()
    deployed = ml.deploy(ours)
    x = torch.randn(ours.input_type.shape(1))
    with torch.inference_mode():
        reference = theirs(x)
        diffs = {"eager": _max_diff(ours(x), reference), "deploy": _max_diff(deployed(x), reference)}
    modules = [theirs, ours, deployed]
    target = LatencyTarget(input_size=ours.input_type.grid)
    params = [sum(p.numel() for p in m.parameters()) for m in modules]
    row = {"model": name, "input_shape": list(x.shape), "max_abs_diff_vs_timm": diffs,
           "params": {"timm": params[0], "eager": params[1], "deploy": params[2]}, **_timed(modules, target, seconds)}
    if compiled:
        torch._dynamo.reset()  # no guards or cache entries carried over from the previous model
        start = time.perf_counter()
        row["compiled"] = _timed(modules, replace(target, compile="default"), seconds)
        row["compiled"]["seconds_with_compilation"] = round(time.perf_counter() - start, 1)
    return row


def _table(rows: list[dict[str, Any]], compiled: bool = False) -> Table:
    title = f"ours / timm, CPU 1 thread, batch 1 (medians; p10 in brackets){', torch.compile' if compiled else ''}"
    table = Table(title=title, title_justify="left")
    columns = ("model", "timm ms", "ours ms", "deploy ms", "ours ratio" if compiled else "eager ratio", "deploy ratio",
               "max |Δ| (eager)" if compiled else "max |Δ|", "noisy")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        timed, diffs = row["compiled"] if compiled else row, row["max_abs_diff_vs_timm"]
        ms = timed["median_ms"]
        table.add_row(row["model"], f"{ms['timm']:.1f}", f"{ms['eager']:.1f}", f"{ms['deploy']:.1f}",
                      f"{timed['ratio_eager']:.3f} ({timed['ratio_eager_p10']:.3f})",
                      f"{timed['ratio_deploy']:.3f} ({timed['ratio_deploy_p10']:.3f})",
                      f"{max(diffs.values()):.1e}", "yes" if timed["noisy"] else "")
    return table


def _provenance() -> dict[str, Any]:
    return {"torch": torch.__version__, "timm": timm.__version__, "metaformer_lab": ml.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Six models, one per family.")
    parser.add_argument("--models", nargs="+", help="These zoo models (default: every one).")
    parser.add_argument("--seconds", type=float, default=3.0, help="Measured time per model form.")
    parser.add_argument("--compile", action="store_true",
                        help="Also under torch.compile (with --quick or --models only).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "timm_ratio.json")
    args = parser.parse_args()
    if args.compile and not (args.quick or args.models):
        parser.error("--compile takes --quick or --models: compiling every zoo model three times takes hours here")
    torch.set_num_threads(1)
    names = args.models or (QUICK if args.quick else ml.list_models())
    no_timm = [n for n in names if not timm.is_model(n)]  # zoo models timm does not define have nothing to compare
    names = [n for n in names if n not in no_timm]
    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("models", total=len(names))
        for name in names:
            progress.update(task, description=name)
            rows.append(measure(name, args.seconds, compiled=args.compile))
            _write(args, rows, no_timm)  # after every model: an interrupted run keeps what it measured
            progress.advance(task)
    console = Console(width=120)
    console.print(_table(rows))
    if args.compile:
        console.print(_table(rows, compiled=True))
    summary = _write(args, rows, no_timm)
    print(f"median over {len(rows)} models: eager {summary['ratio_eager']:.3f}, deploy {summary['ratio_deploy']:.3f}; "
          f"eager above 1.05: {sum(r['ratio_eager'] > 1.05 for r in rows)}; "
          f"not in timm: {', '.join(no_timm) or 'none'}")
    if args.compile:
        print(f"compiled, median over {len(rows)} models: ours {summary['compiled_ratio_eager']:.3f}, "
              f"deploy {summary['compiled_ratio_deploy']:.3f}")
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], no_timm: list[str]) -> dict[str, float]:
    summary = {key: statistics.median(r[key] for r in rows) for key in ("ratio_eager", "ratio_deploy")}
    if args.compile:
        summary |= {f"compiled_{key}": statistics.median(r["compiled"][key] for r in rows)
                    for key in ("ratio_eager", "ratio_deploy")}
    result = {"benchmark": "timm_ratio", "quick": args.quick, "compile": args.compile, "seconds_per_form": args.seconds,
              "median_ratio": summary, "models": len(rows), "not_in_timm": no_timm, "rows": rows,
              "provenance": _provenance()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
