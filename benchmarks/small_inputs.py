"""Per-call Python overhead at small inputs: each example at 32x32 against the same module traced with torch.fx.

Not a test. At 32x32 a block costs 0.1-0.3 ms, so the Python work of a generic block (walking its branch plan,
prefix-token bookkeeping, layout changes) is a real share of it. ``torch.fx.symbolic_trace`` records the same
module's tensor operations as straight-line code, so ours / traced is what that work costs. The deploy form and
its trace are measured too. All four forms of one example are measured interleaved in one run
(``latency.interleave.measure_interleaved``), CPU 1 thread, batch 1; outputs are compared first. An example whose
forward fx cannot trace (shape-dependent Python) is listed as such.

    python benchmarks/small_inputs.py [--seconds 2] [--out benchmarks/results/small_inputs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import fx, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.latency.interleave import measure_interleaved
from metaformer_lab.latency.target import LatencyTarget, cpu_name

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def _traced(module: nn.Module) -> nn.Module | str:
    try:
        return fx.symbolic_trace(module)
    except Exception as err:  # fx refuses data- or shape-dependent Python; say which, and go on
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def measure(path: Path, seconds: float) -> dict[str, Any]:
    torch.manual_seed(0)
    ours = ml.build(str(path), input_size=SIZE).eval()
    deployed = ml.deploy(ours)
    forms: dict[str, nn.Module] = {"eager": ours, "deploy": deployed}
    row: dict[str, Any] = {"example": path.stem, "untraceable": {}}
    for name, module in list(forms.items()):
        traced = _traced(module)
        if isinstance(traced, str):
            row["untraceable"][name] = traced
        else:
            forms[f"{name}_fx"] = traced
    x = torch.randn(ours.input_type.shape(1))
    with torch.inference_mode():
        reference = ours(x)
        row["max_abs_diff"] = {k: (m(x) - reference).abs().max().item() for k, m in forms.items()}
    results = measure_interleaved(list(forms.values()), LatencyTarget(input_size=SIZE), time_per_item_s=seconds)
    row["median_ms"] = {k: r.median_ms for k, r in zip(forms, results, strict=True)}
    row["p10_ms"] = {k: r.p10_ms for k, r in zip(forms, results, strict=True)}
    row["noisy"] = [r.noise_reasons for r in results if r.noisy]
    for name in ("eager", "deploy"):
        if f"{name}_fx" in forms:
            row[f"ratio_{name}"] = row["median_ms"][name] / row["median_ms"][f"{name}_fx"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="Measured time per form.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "small_inputs.json")
    args = parser.parse_args()
    paths = sorted((ROOT / "examples").glob("*.yaml"))
    rows, too_small = [], {}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("examples", total=len(paths))
        for path in paths:
            progress.update(task, description=path.stem)
            try:
                rows.append(measure(path, args.seconds))
            except SpecError as err:  # its windows or strides need a larger map than 32x32 gives: say so, go on
                too_small[path.stem] = str(err).splitlines()[0]
            progress.advance(task)
    table = Table(title=f"ours / fx-traced, {SIZE}x{SIZE}, CPU 1 thread, batch 1 (medians)", title_justify="left")
    for column in ("example", "eager ms", "fx ms", "eager / fx", "deploy ms", "deploy fx ms", "deploy / fx"):
        table.add_column(column, justify="left" if column == "example" else "right")
    for r in rows:
        ms = r["median_ms"]

        def cell(key: str, ms: dict[str, float] = ms) -> str:
            return f"{ms[key]:.3f}" if key in ms else "-"

        table.add_row(r["example"], cell("eager"), cell("eager_fx"),
                      f"{r['ratio_eager']:.3f}" if "ratio_eager" in r else "untraceable", cell("deploy"),
                      cell("deploy_fx"), f"{r['ratio_deploy']:.3f}" if "ratio_deploy" in r else "untraceable")
    Console().print(table)
    summary = {k: statistics.median(r[k] for r in rows if k in r) for k in ("ratio_eager", "ratio_deploy")
               if any(k in r for r in rows)}
    Console().print(f"median ratios: {summary}")
    for name, reason in too_small.items():
        Console().print(f"{name}: not built at {SIZE}x{SIZE} ({reason})")
    args.out.write_text(json.dumps({
        "benchmark": "small_inputs", "summary": summary, "rows": rows, f"not_at_{SIZE}": too_small,
        "provenance": {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                       "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1,
                       "seconds_per_form": args.seconds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }, indent=1) + "\n")
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
