"""Each attention-family token mixer against the slow reference its test checks it with, and against global attention.

Not a test. Every file in ``tests/references/`` is the slow, obviously correct reference of one op (loops over
windows, regions, heads or queries are fine there) that the op's tests compare it with at 1e-5. It names the op
and a benchmark setting:

    OP = "focal_attention"                      # the op's registry tag (a token mixer)
    SPEC = {"num_heads": 2, "window": 7}        # its fields, as in YAML
    INPUT = TensorType("tokens", 64, 28, 28)    # the input type the benchmark builds it for
    def reference(module, x): ...               # the op's output, computed slowly from module's parameters

Here each op is built for ``INPUT`` (weights perturbed off their init), its output checked against the reference
(max |Δ|), then three forms are timed interleaved in one run, CPU 1 thread, batch 1: the op, its reference, and
global ``attention`` of the same width, head count and token count (the mechanism's baseline). The figures are
medians; the ratios (op / reference, op / global) are what to compare across machines.

    python benchmarks/attention_ops.py [--ops focal_attention ...] [--seconds 2] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from metaformer_lab.core.types import TensorType
from metaformer_lab.latency.target import cpu_name
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.zoo.fixed_point import perturb

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "tests" / "references"


def references(names: list[str] | None) -> list[ModuleType]:
    """The reference files (all, or those of the ops ``names``), loaded as modules."""
    out = []
    for path in sorted(REFERENCES.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"references_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if names is None or module.OP in names:
            out.append(module)
    missing = set(names or ()) - {m.OP for m in out}
    if missing:
        raise SystemExit(f"--ops: no reference in {REFERENCES} for {', '.join(sorted(missing))}")
    return out


def build(tag: str, config: dict[str, Any], x: TensorType) -> torch.nn.Module:
    opdef = TOKEN_MIXERS.get(tag)
    module = opdef.make(opdef.spec.model_validate({"type": tag, **config}), x)
    perturb(module, seed=0)
    return module.eval()


def timed(fns: list[Callable[[], Any]], seconds: float, min_runs: list[int]) -> list[list[float]]:
    """Run times (s) of each function, taken in turns (one call of each per round) so drift hits all alike; a
    function leaves the rounds once it has its ``min_runs`` runs and ``seconds`` of them."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    active = set(range(len(fns)))
    while active:
        for i in sorted(active):
            t0 = time.perf_counter()
            fns[i]()
            samples[i].append(time.perf_counter() - t0)
            if len(samples[i]) >= min_runs[i] and sum(samples[i]) >= seconds:
                active.discard(i)
    return samples


def measure(ref: ModuleType, seconds: float, min_runs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x_type: TensorType = ref.INPUT
    op = build(ref.OP, ref.SPEC, x_type)
    heads = int(ref.SPEC.get("num_heads", 1))
    tokens = TensorType("tokens", x_type.channels, x_type.height, x_type.width)
    dense = build("attention", {"num_heads": heads}, tokens)
    x = torch.randn(x_type.shape(1))
    xt = torch.randn(tokens.shape(1))
    with torch.inference_mode():
        diff = (op(x) - ref.reference(op, x)).abs().max().item()
        # the slow reference (up to seconds a call) is timed for the ratio alone: fewer runs
        runs = timed([lambda: op(x), lambda: ref.reference(op, x), lambda: dense(xt)], seconds,
                     [min_runs, max(3, min_runs // 4), min_runs])
    op_ms, ref_ms, dense_ms = (1e3 * statistics.median(r) for r in runs)
    shape = f"{x_type.layout} {x_type.channels}x{x_type.height}x{x_type.width}"
    return {"op": ref.OP, "spec": ref.SPEC, "input": shape,
            "heads": heads, "max_abs_diff": diff, "median_ms": {"op": op_ms, "reference": ref_ms, "global": dense_ms},
            "runs": {"op": len(runs[0]), "reference": len(runs[1]), "global": len(runs[2])},
            "op_over_reference": op_ms / ref_ms, "op_over_global": op_ms / dense_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", help="Only these ops (registry tags).")
    parser.add_argument("--seconds", type=float, default=2.0, help="Measured time per form.")
    parser.add_argument("--quick", action="store_true", help="0.3 s and 5 runs per form (a smoke run).")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default benchmarks/results/attention_ops.json; none with --quick).")
    args = parser.parse_args()
    seconds, min_runs = (0.3, 5) if args.quick else (args.seconds, 20)
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "attention_ops.json")
    torch.set_num_threads(1)
    refs = references(args.ops)
    rows = []
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("ops", total=len(refs))
        for ref in refs:
            progress.update(task, description=ref.OP)
            rows.append(measure(ref, seconds, min_runs))
            progress.advance(task)
    table = Table(title="each op against its slow reference and global attention, CPU 1 thread, batch 1 (medians)",
                  title_justify="left")
    for column in ("op", "input", "max |Δ|", "op ms", "reference ms", "global ms", "op / reference", "op / global"):
        table.add_column(column, justify="left" if column in ("op", "input") else "right")
    for r in rows:
        ms = r["median_ms"]
        table.add_row(r["op"], r["input"], f"{r['max_abs_diff']:.1e}", f"{ms['op']:.3f}", f"{ms['reference']:.2f}",
                      f"{ms['global']:.3f}", f"{r['op_over_reference']:.4f}", f"{r['op_over_global']:.2f}")
    Console(width=160).print(table)
    if out is not None:
        out.write_text(json.dumps({
            "benchmark": "attention_ops", "rows": rows,
            "provenance": {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                           "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1,
                           "seconds_per_form": seconds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        }, indent=1) + "\n")
        Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
