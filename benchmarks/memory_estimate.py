"""The memory estimate against the real peak: is ``metaformer_lab.search.memory.estimate_step`` safe and tight?

Not a test. Each case runs in a fresh subprocess, at one thread, on CPU: the network is built and the data
loaded, the evaluator's own estimate is taken (``Evaluator.plan`` with a limit too high to split anything),
then the evaluation runs while the process's peak resident set is read: ``malloc_trim`` and a reset of
``VmHWM`` (``/proc/self/clear_refs``) just before, ``VmHWM - VmRSS(before)`` after. The goal: the real peak
is never more than 20 % above the estimate (ratio real / estimate at most 1.2).

    python benchmarks/memory_estimate.py [--out benchmarks/results/memory_estimate.json] [--quick]

``--quick`` keeps the cases that need less than 1 GB. Writes one row per case to the JSON file.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory_estimate.json"
GOAL = 1.2

CASES: list[dict[str, Any]] = [
    # network (zoo name, or tiny:REFERENCE), input size, evaluator, its options, and an estimate under 1 GB?
    {"net": "poolformer_s12", "size": 224, "evaluator": "zero-cost", "options": {"batch_size": 32}},
    {"net": "vit_small_patch16_224", "size": 224, "evaluator": "zero-cost", "options": {"batch_size": 32}},
    {"net": "convnext_tiny", "size": 224, "evaluator": "zero-cost", "options": {"batch_size": 16}},
    {"net": "caformer_s18", "size": 224, "evaluator": "zero-cost", "options": {"batch_size": 16}},
    {"net": "poolformer_s12", "size": 224, "evaluator": "zero-cost", "options": {"proxy": "naswot", "batch_size": 32}},
    {"net": "vit_small_patch16_224", "size": 224, "evaluator": "zero-cost", "options": {"proxy": "synflow"},
     "quick": True},
    {"net": "poolformer_s12", "size": 224, "evaluator": "train",
     "options": {"epochs": 1, "batch_size": 8, "max_batches_per_epoch": 2, "eval_batch_size": 8}, "quick": True},
    {"net": "tiny:caformer_tiny", "size": 32, "evaluator": "zero-cost", "options": {"batch_size": 64}, "quick": True},
    {"net": "tiny:vit_tiny", "size": 32, "evaluator": "zero-cost", "options": {"proxy": "naswot", "batch_size": 64},
     "quick": True},
    {"net": "tiny:convformer_tiny", "size": 32, "evaluator": "train",
     "options": {"epochs": 1, "batch_size": 64, "max_batches_per_epoch": 4}, "quick": True},
]


def _kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process (a fresh one: the parent starts it)."""
    import optuna
    import torch

    from metaformer_lab.api import build
    from metaformer_lab.compile.compiler import compile_graph
    from metaformer_lab.graph.lower import lower
    from metaformer_lab.search.datasets import load_dataset
    from metaformer_lab.search.evaluators import make_evaluator
    from metaformer_lab.space import decode, load_space

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if case["net"].startswith("tiny:"):
        space = load_space("tiny")
        net = compile_graph(lower(decode(space, optuna.trial.FixedTrial(dict(space.references[case["net"][5:]])))))
    else:
        net = build(case["net"])
    batch = max(case["options"].get("batch_size", 1), case["options"].get("eval_batch_size", 1))
    data = load_dataset(f"synthetic:{int(batch / 0.8) + 4}", input_size=case["size"])
    evaluator = make_evaluator(case["evaluator"], **case["options"])
    planner = make_evaluator(case["evaluator"], **case["options"], max_memory=10**15)
    plans = planner.plan(net, data, torch.device("cpu")) if case["evaluator"] == "train" else (planner.plan(net, data),)
    estimate = max((p.estimate for p in plans), key=lambda e: e.total)
    peaks = []
    for _ in range(2):  # cold (the first run pages in library code), then warm
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _kb("VmRSS")
        evaluator.evaluate(net, data)
        peaks.append(_kb("VmHWM") - before)
    return {**case, "estimate_bytes": estimate.total, "estimate": estimate.describe(), "cold_bytes": peaks[0],
            "real_bytes": peaks[1], "ratio": peaks[1] / estimate.total}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(run_case(CASES[int(sys.argv[2])])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import torch

    rows = []
    for i, case in enumerate(CASES):
        if args.quick and not case.get("quick"):
            continue
        done = subprocess.run([sys.executable, __file__, "--case", str(i)], capture_output=True, text=True,
                              check=True, env={"OMP_NUM_THREADS": "1", **dict(__import__("os").environ)})
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['net']:24s} {row['size']:4d} px {row['evaluator']:9s} {json.dumps(row['options']):72s} "
              f"estimate {row['estimate_bytes'] / 1e6:9.1f} MB  real {row['real_bytes'] / 1e6:9.1f} MB (cold "
              f"{row['cold_bytes'] / 1e6:.1f})  "
              f"real/estimate {row['ratio']:.2f}", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"worst real/estimate {worst:.2f} ({'within' if worst <= GOAL else 'beyond'} the {GOAL} goal); "
          f"best {min(r['ratio'] for r in rows):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"goal": GOAL, "worst_ratio": worst, "rows": rows, "cpu": platform.processor(),
                                    "torch": torch.__version__,
                                    "date": datetime.datetime.now().isoformat(timespec="seconds")}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
