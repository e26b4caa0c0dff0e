"""Build time of our module divided by ``timm.create_model`` time for the same architecture.

Not a test: a ratio measured in one process, at one thread, interleaving the two builders so that
machine noise hits both alike. Goal: ratio <= 1.0. Our time covers everything from the zoo YAML
(read, resolve, validate, lower, compile, initialise); timm's covers ``create_model(pretrained=False)``.

    python benchmarks/build_time.py [--repeats 15] [--out benchmarks/results/build_time.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import metaformer_lab as ml

ROOT = Path(__file__).resolve().parents[1]
CASES = ["poolformer_s12", "caformer_s18", "swin_tiny_patch4_window7_224"]  # zoo name = timm name


def _seconds(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(spec: str, timm_name: str, repeats: int) -> dict[str, object]:
    ours, theirs = [], []
    ml.build(spec), timm.create_model(timm_name)  # warm-up: imports, caches, allocator
    for _ in range(repeats):
        ours.append(_seconds(lambda: ml.build(spec)))
        theirs.append(_seconds(lambda: timm.create_model(timm_name)))
    ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    return {"spec": spec, "timm_model": timm_name, "ours_median_ms": round(ours_ms, 2),
            "timm_median_ms": round(theirs_ms, 2), "ratio": round(ours_ms / theirs_ms, 3), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_time.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, name, args.repeats) for name in CASES]
    for row in rows:
        print(f"{row['timm_model']:<32} ours {row['ours_median_ms']:8.1f} ms   timm {row['timm_median_ms']:8.1f} ms"
              f"   ratio {row['ratio']:.3f}")
    result = {"benchmark": "build_time", "goal": "ratio <= 1.0", "rows": rows,
              "provenance": {"torch": torch.__version__, "timm": timm.__version__, "metaformer_lab": ml.__version__,
                             "python": platform.python_version(), "machine": platform.machine(), "threads": 1}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
