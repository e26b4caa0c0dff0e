"""The kernels the GPU estimate costs for each zoo model against the kernels timm's same-name module launches.

timm's benchmark tables, which the GPU factors are fitted on, measured timm's modules; the estimate costs ours. Where
the two launch the same kernels, a table row is a clean measurement of what the estimate models; where ours differs
(more fused, fewer copies), the row measures something else. Both are recorded on the meta device under autocast at
float16 (as timm's tables ran), by the estimator's own recorder (``latency.gpu``): ours node by node as the estimate
does, timm's module whole. Per model: kernels, FLOPs and bytes moved, ours / timm's, and the kernel classes whose
counts differ. Not a test (a test checks six models class by class: ``tests/latency/test_gpu_estimate.py``).

    python benchmarks/kernel_parity.py                  # every zoo model that is a timm model (about 3 minutes)
    python benchmarks/kernel_parity.py --models gcvit_tiny twins_svt_small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = ("matmul", "conv", "dwconv", "attention", "softmax", "norm", "reduction")
"""Kernel classes compared one by one; element-wise kernels and copies are reported but may differ by a few."""


def _compare(name: str, timm_name: str, batch: int) -> dict[str, Any]:
    import timm

    from metaformer_lab.core.meta import on_meta
    from metaformer_lab.graph.lower import lower
    from metaformer_lab.latency.gpu import graph_records, module_records
    from metaformer_lab.spec.load import read_spec

    spec = read_spec(name)
    size = spec.input.hw[0]
    with on_meta():  # shapes only: initialisers' value writes skipped
        reference = timm.create_model(timm_name, pretrained=False)
    theirs = module_records(reference, (batch, 3, size, size), dtype="float16", amp=True)
    ours = [k for ks in graph_records(lower(spec), batch_size=batch, dtype="float16", amp=True).values()
            for k in ks or ()]
    count_t, count_o = Counter(k.op_class for k in theirs), Counter(k.op_class for k in ours)
    differ = {c: [count_o[c], count_t[c]] for c in sorted(set(count_t) | set(count_o)) if count_t[c] != count_o[c]}
    return {"model": name, "timm_model": timm_name, "kernels": [len(ours), len(theirs)],
            "flops_ratio": sum(k.flops for k in ours) / max(1, sum(k.flops for k in theirs)),
            "bytes_ratio": sum(k.bytes_moved for k in ours) / max(1, sum(k.bytes_moved for k in theirs)),
            "differ": differ, "compute_kernels_equal": not any(c in differ for c in COMPUTE)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="these zoo models (default: every one that is a timm model)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_parity.json")
    args = parser.parse_args()

    from rich.progress import Progress

    from metaformer_lab.latency.gpu_calibrate import _zoo_by_timm

    by_timm = {zoo: timm_name for timm_name, (zoo, _) in _zoo_by_timm().items()}
    names = args.models or sorted(by_timm)
    unknown = [n for n in names if n not in by_timm]
    if unknown:
        print(f"--models: not zoo models that are timm models: {', '.join(unknown)}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("recording kernels", total=len(names))
        for name in names:
            rows.append(_compare(name, by_timm[name], args.batch))
            progress.advance(task)
    equal = [r for r in rows if r["compute_kernels_equal"]]
    print(f"| {'zoo model':34s} | kernels ours/timm | FLOPs | bytes | classes that differ (ours, timm) |")
    print(f"|{'-' * 36}|-------------------|-------|-------|-----------------------------------|")
    for r in rows:
        differ = ", ".join(f"{c} {o}/{t}" for c, (o, t) in r["differ"].items()) or "-"
        print(f"| {r['model']:34s} | {r['kernels'][0]:7d} / {r['kernels'][1]:7d} | {r['flops_ratio']:.3f} | "
              f"{r['bytes_ratio']:.3f} | {differ} |")
    seconds = time.perf_counter() - start
    print(f"\n{len(equal)} of {len(rows)} zoo models launch timm's compute kernels class by class "
          f"({', '.join(COMPUTE)}); {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "dtype": "float16 (autocast)", "models": len(rows),
                                    "compute_kernels_equal": len(equal), "seconds": round(seconds, 1),
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
