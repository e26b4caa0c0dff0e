"""CPU latency of our zoo models divided by timm's same-name model, eager and in the deploy form.

Not a test: for each model, timm's model (``timm.create_model(name, pretrained=False)``), ours with the same
weights (``from_timm``) and our deploy form (``metaformer_lab.deploy``) are measured interleaved in one run
(``latency.interleave.measure_interleaved``: short bursts in turn, so a machine whose speed wanders slows all
three alike), at one thread, batch 1, at the model's input size. Ratios are ours / timm's of the medians of the
repeated runs (the 10th percentiles too), and paired: the median over the rounds of the interleaving of ours / timm's
within the round (``latency.interleave.paired_ratio``: each round's bursts run next to each other, so a drift of the
host's speed cancels; the steadiest of the three where a big model gets only 8-20 runs). The three outputs are
compared first. Ratios below 1.0: ours is faster.

    python benchmarks/timm_ratio.py [--quick] [--models NAME ...] [--seconds 1] [--min-runs 30] [--max-seconds 6]
                                    [--minutes 30] [--resume] [--compile] [--out ...]

``--quick``: six models, one per family (a few minutes); default: every zoo model that timm defines. Each form
runs until it has ``--min-runs`` runs and ``--seconds`` of them, or ``--max-seconds`` of them: the big models
(0.3-0.7 s a forward here) get fewer repeats than 30 (each row records its run counts). The run is bounded:
after ``--minutes`` it starts no further model, writes what it measured and names the rest; ``--resume`` keeps
the rows of an earlier run in ``--out`` and measures only the models it lacks. ``--compile`` (with ``--quick``
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
from metaformer_lab.latency.interleave import measure_interleaved, paired_ratio
from metaformer_lab.latency.target import LatencyTarget, cpu_name

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["poolformer_s12", "vit_tiny_patch16_224", "convnext_atto", "efficientformer_l1", "pvt_v2_b0",
         "resmlp_12_224"]
"""One model per family: metaformer, vit, convnext, efficientformer, pvt_v2, mlp_mixer."""


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _timed(modules: list[torch.nn.Module], target: LatencyTarget, timing: argparse.Namespace) -> dict[str, Any]:
    """The three forms (timm, eager, deploy) measured interleaved at ``target``: medians, p10s, ratios to timm."""
    results = measure_interleaved(modules, target, time_per_item_s=timing.seconds, min_runs=timing.min_runs,
                                  max_time_per_item_s=timing.max_seconds)
    timm_r, eager_r, deploy_r = results
    return {
        "median_ms": {"timm": timm_r.median_ms, "eager": eager_r.median_ms, "deploy": deploy_r.median_ms},
        "p10_ms": {"timm": timm_r.p10_ms, "eager": eager_r.p10_ms, "deploy": deploy_r.p10_ms},
        "runs": {"timm": timm_r.runs, "eager": eager_r.runs, "deploy": deploy_r.runs},
        "ratio_eager": eager_r.median_ms / timm_r.median_ms, "ratio_deploy": deploy_r.median_ms / timm_r.median_ms,
        "ratio_eager_p10": eager_r.p10_ms / timm_r.p10_ms, "ratio_deploy_p10": deploy_r.p10_ms / timm_r.p10_ms,
        "ratio_eager_paired": paired_ratio(eager_r, timm_r), "ratio_deploy_paired": paired_ratio(deploy_r, timm_r),
        "noisy": [r.noise_reasons for r in results if r.noisy],
    }


def measure(name: str, timing: argparse.Namespace, *, compiled: bool = False) -> dict[str, Any]:
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
           "params": {"timm": params[0], "eager": params[1], "deploy": params[2]}, **_timed(modules, target, timing)}
    if compiled:
        torch._dynamo.reset()  # no guards or cache entries carried over from the previous model
        start = time.perf_counter()
        row["compiled"] = _timed(modules, replace(target, compile="default"), timing)
        row["compiled"]["seconds_with_compilation"] = round(time.perf_counter() - start, 1)
    return row


def _table(rows: list[dict[str, Any]], compiled: bool = False) -> Table:
    title = ("ours / timm, CPU 1 thread, batch 1: ratio of medians (of p10s; paired)"
             + (", torch.compile" if compiled else ""))
    table = Table(title=title, title_justify="left")
    columns = ("model", "timm ms", "ours ms", "deploy ms", "ours ratio" if compiled else "eager ratio", "deploy ratio",
               "max |Δ| (eager)" if compiled else "max |Δ|", "noisy")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        timed, diffs = row["compiled"] if compiled else row, row["max_abs_diff_vs_timm"]
        ms = timed["median_ms"]
        table.add_row(row["model"], f"{ms['timm']:.1f}", f"{ms['eager']:.1f}", f"{ms['deploy']:.1f}",
                      _ratios(timed, "ratio_eager"), _ratios(timed, "ratio_deploy"),
                      f"{max(diffs.values()):.1e}", "yes" if timed["noisy"] else "")
    return table


def _ratios(timed: dict[str, Any], key: str) -> str:
    paired = timed.get(f"{key}_paired")  # rows of a run before the paired ratio (--resume) lack it
    return f"{timed[key]:.3f} ({timed[f'{key}_p10']:.3f}; {'-' if paired is None else f'{paired:.3f}'})"


def _provenance() -> dict[str, Any]:
    return {"torch": torch.__version__, "timm": timm.__version__, "metaformer_lab": ml.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Six models, one per family.")
    parser.add_argument("--models", nargs="+", help="These zoo models (default: every one).")
    parser.add_argument("--seconds", type=float, default=1.0, help="Least measured time per model form.")
    parser.add_argument("--min-runs", type=int, default=30, help="Least runs per form, unless --max-seconds ends it.")
    parser.add_argument("--max-seconds", type=float, default=6.0,
                        help="Most measured time per form: the big models get fewer than --min-runs runs.")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="Start no further model after this long; --resume measures the rest later.")
    parser.add_argument("--resume", action="store_true", help="Keep the rows already in --out; measure the rest.")
    parser.add_argument("--compile", action="store_true",
                        help="Also under torch.compile (with --quick or --models only).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "timm_ratio.json")
    args = parser.parse_args()
    if args.compile and not (args.quick or args.models):
        parser.error("--compile takes --quick or --models: compiling every zoo model three times takes hours here")
    torch.set_num_threads(1)
    names = args.models or (QUICK if args.quick else ml.list_models())
    unknown = [n for n in names if n not in ml.list_models()]
    if unknown:
        raise SystemExit(f"--models: not zoo models: {', '.join(unknown)} (see `metaformer-lab zoo list`)")
    no_timm = [n for n in names if not timm.is_model(n)]  # zoo models timm does not define have nothing to compare
    names = [n for n in names if n not in no_timm]
    rows = _earlier_rows(args, names) if args.resume else []
    todo = [n for n in names if n not in {r["model"] for r in rows}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start, unmeasured = time.monotonic(), []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("models", total=len(names), completed=len(rows))
        for i, name in enumerate(todo):
            if rows and time.monotonic() - start > args.minutes * 60:  # at least one row to summarise
                unmeasured = todo[i:]
                break
            progress.update(task, description=name)
            rows.append(measure(name, args, compiled=args.compile))
            _write(args, rows, no_timm, unmeasured=todo[i + 1:])  # after every model: an interrupted run keeps it
            progress.advance(task)
    args.minutes_taken = round((time.monotonic() - start) / 60, 1)
    console = Console(width=120)
    console.print(_table(rows))
    if args.compile:
        console.print(_table(rows, compiled=True))
    summary = _write(args, rows, no_timm, unmeasured=unmeasured)
    if unmeasured:
        print(f"stopped after {args.minutes:g} min; not measured ({len(unmeasured)}): {', '.join(unmeasured)} "
              "(run again with --resume)")
    print(f"{args.minutes_taken} min for {len(todo) - len(unmeasured)} models; median over {len(rows)} models: "
          f"eager {summary['ratio_eager']:.3f}, deploy {summary['ratio_deploy']:.3f}; "
          f"eager above 1.05: {sum(r['ratio_eager'] > 1.05 for r in rows)}; "
          f"not in timm: {', '.join(no_timm) or 'none'}")
    if "paired_ratio_eager" in summary:
        print(f"paired, median over {summary['paired_models']} models: eager {summary['paired_ratio_eager']:.3f}, "
              f"deploy {summary['paired_ratio_deploy']:.3f}; eager above 1.05: "
              f"{sum(r.get('ratio_eager_paired', 0) > 1.05 for r in rows)}")
    if args.compile:
        print(f"compiled, median over {len(rows)} models: ours {summary['compiled_ratio_eager']:.3f}, "
              f"deploy {summary['compiled_ratio_deploy']:.3f}"
              + (f"; paired: ours {summary['compiled_paired_ratio_eager']:.3f}, "
                 f"deploy {summary['compiled_paired_ratio_deploy']:.3f}" if "compiled_paired_ratio_eager" in summary
                 else ""))
    print(f"wrote {args.out}")


def _earlier_rows(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """Rows of an earlier run in ``--out`` measured the same way, for the models asked for now."""
    if not args.out.exists():
        return []
    earlier = json.loads(args.out.read_text())
    same = all(earlier.get(key) == getattr(args, key) for key in ("compile", "seconds", "min_runs", "max_seconds"))
    if not same:
        raise SystemExit(f"{args.out}: measured with other settings; --resume needs the same --seconds, --min-runs, "
                         "--max-seconds and --compile")
    return [row for row in earlier["rows"] if row["model"] in names]


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], no_timm: list[str], *,
           unmeasured: list[str]) -> dict[str, float]:
    summary = {key: statistics.median(r[key] for r in rows) for key in ("ratio_eager", "ratio_deploy")}
    paired = [r for r in rows if "ratio_eager_paired" in r]  # not in the rows of a run before it (--resume)
    if paired:
        summary |= {f"paired_{key}": statistics.median(r[f"{key}_paired"] for r in paired)
                    for key in ("ratio_eager", "ratio_deploy")} | {"paired_models": len(paired)}
    if args.compile:
        summary |= {f"compiled_{key}": statistics.median(r["compiled"][key] for r in rows)
                    for key in ("ratio_eager", "ratio_deploy")}
        if all("ratio_eager_paired" in r["compiled"] for r in rows):
            summary |= {f"compiled_paired_{key}": statistics.median(r["compiled"][f"{key}_paired"] for r in rows)
                        for key in ("ratio_eager", "ratio_deploy")}
    result = {"benchmark": "timm_ratio", "quick": args.quick, "compile": args.compile, "seconds": args.seconds,
              "min_runs": args.min_runs, "max_seconds": args.max_seconds, "median_ratio": summary,
              "eager_above_1_05": [r["model"] for r in rows if r["ratio_eager"] > 1.05],
              "eager_above_1_05_paired": [r["model"] for r in paired if r["ratio_eager_paired"] > 1.05],
              "models": len(rows), "not_measured": unmeasured, "not_in_timm": no_timm,
              "minutes": getattr(args, "minutes_taken", None), "rows": rows, "provenance": _provenance()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
