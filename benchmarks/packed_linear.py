"""oneDNN's reordered-weight matmul (``ops.packed.PackedLinear``'s kernel) against ``F.linear``, per matmul shape.

Not a test: at one thread, for token matrices from the small (an example at 32x32) to the large (a 224x224
network's stage), the time of ``F.linear`` and of ``torch.ops.mkldnn._linear_pointwise`` on the reordered
weight, alternating in bursts (``--rounds`` rounds, medians), with and without a fused GELU. The ratio's crossover
is where ``PackedLinear.min_macs`` sits. A minute or so.

    python benchmarks/packed_linear.py [--rounds 9] [--out benchmarks/results/packed_linear.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from metaformer_lab.latency.target import cpu_name
from metaformer_lab.ops.packed import PackedLinear

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # (tokens, in, out): examples at 32x32 up to the first stages of 224x224 networks
    (1, 768, 1000), (16, 64, 256), (64, 128, 32), (256, 64, 256), (1024, 32, 128), (196, 64, 512), (49, 256, 1024),
    (784, 64, 256), (196, 192, 768), (196, 384, 384), (3136, 64, 256), (196, 384, 1536), (196, 1536, 384),
    (49, 2048, 512),
]


def _seconds_per_call(fn: Callable[[], object], budget_s: float = 0.02) -> float:
    start, calls = time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - start < budget_s:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def _ratios(tokens: int, k: int, n: int, rounds: int) -> dict[str, float]:
    x, w, b = torch.randn(1, tokens, k), 0.05 * torch.randn(n, k), torch.randn(n)
    reordered = torch.ops.mkldnn._reorder_linear_weight(w, None)
    forms: dict[str, Callable[[], object]] = {
        "linear": lambda: F.linear(x, w, b),
        "reordered": lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, b, "none", [], ""),
        "linear_gelu": lambda: F.gelu(F.linear(x, w, b)),
        "reordered_gelu": lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, b, "gelu", [], "none"),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for fn in forms.values():  # warm-up
        _seconds_per_call(fn, 0.01)
    for _ in range(rounds):
        for name, fn in forms.items():
            times[name].append(_seconds_per_call(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"macs": tokens * k * n, "linear_us": med["linear"] * 1e6,
            "ratio": med["reordered"] / med["linear"], "ratio_gelu": med["reordered_gelu"] / med["linear_gelu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/packed_linear.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    if not torch.backends.mkldnn.is_available():
        console.print("this torch has no oneDNN: PackedLinear always runs F.linear")
        return
    rows = []
    table = Table(title="reordered oneDNN matmul / F.linear, CPU 1 thread (medians)", title_justify="left")
    for column in ("tokens x in -> out", "M MACs", "F.linear us", "reordered", "with GELU", "PackedLinear uses"):
        table.add_column(column, justify="right")
    with torch.inference_mode():
        for tokens, k, n in SHAPES:
            row = {"shape": [tokens, k, n], **_ratios(tokens, k, n, args.rounds)}
            rows.append(row)
            uses = "reordered" if row["macs"] >= PackedLinear.min_macs else "F.linear"
            table.add_row(f"{tokens} x {k} -> {n}", f"{row['macs'] / 1e6:.1f}", f"{row['linear_us']:.0f}",
                          f"{row['ratio']:.3f}", f"{row['ratio_gelu']:.3f}", uses)
    console.print(table)
    console.print(f"PackedLinear.min_macs = {PackedLinear.min_macs / 1e6:.1f} M multiply-adds; ratios below 1: the "
                  "reordered weight is faster")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "python": platform.python_version(), "threads": 1,
        "rounds": args.rounds, "min_macs": PackedLinear.min_macs, "omp": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
