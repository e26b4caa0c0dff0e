"""Every CUDA path of the project, once, on a lent GPU: what it measures goes to one JSON file.

Not a test. Prepared on the CPU with ``--dry-run`` (it lists every step and the command it would run, and runs
for each a check that works without a GPU: the command's ``--help``, or the same command for a named GPU),
then run on the GPU machine in one call::

    python benchmarks/gpu_check.py --dry-run
    python benchmarks/gpu_check.py --out "$OUT" [--budget-s 480]

Steps (each a fresh process with its own time limit, so one failure does not end the check; a step that
fails is recorded with its last output lines and the check goes on):

1. provenance: GPU name, driver, torch and CUDA versions (``nvidia-smi``, torch);
2. CUDA measurement (CUDA events) of three zoo models at float32, float16 and bfloat16, batch 1 and 64;
3. a small CUDA profile: ``latency calibrate --device cuda`` on a few networks of the 224 px space;
4. the analytic estimate for this GPU (``latency SPEC --device GPU --no-measure``) against step 2's
   measurements: the estimator's error, uncalibrated;
5. ``search --device cuda --budget 2ms --trials 6 --evaluator zero-cost`` writing its run folder;
6. fixed-point parity of five zoo models on CUDA: our module against timm's with the same weights,
   float32, max |delta logit| against the tolerance stated in the step;
7. the cuda-marked tests: ``pytest -m cuda``.

The JSON (``gpu_check.json`` in ``--out``) holds the provenance and, per step, its command, return code,
seconds and parsed output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "metaformer_lab.cli"]
MODELS = ("poolformer_s12", "vit_small_patch16_224", "convnext_tiny")
PARITY = ("poolformer_s12", "poolformerv2_s12", "caformer_s18", "vit_small_patch16_224", "convnext_tiny")
PARITY_ATOL = 1e-3
"""Max |delta logit| allowed on CUDA at float32 (TF32 off): kernels differ from the CPU's, sums reorder."""

_PARITY_CODE = """
import json, sys, torch, timm
from metaformer_lab.zoo import from_timm
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
out = {}
for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval().cuda()
    ours = from_timm(ref).eval().cuda()
    size = ref.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *size, device="cuda")
    with torch.inference_mode():
        diff = (ours(x) - ref(x)).abs().max().item()
    out[name] = {"max_abs_diff": diff, "ok": diff <= float(sys.argv[2])}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout_s: float
    parse_json: bool = False
    check: list[str] | None = None  # a command whose success shows, on any machine, that ``command`` parses


def steps(out: Path) -> list[Step]:
    found: list[Step] = [Step("provenance: nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                          "--format=csv,noheader"], 20)]
    for model in MODELS:
        for dtype in ("float32", "float16", "bfloat16"):
            for batch in (1, 64):
                args = ["latency", model, "--device", "cuda", "--dtype", dtype, "--batch-size", str(batch),
                        "--json"]
                found.append(Step(f"measure {model} {dtype} batch {batch}", [*CLI, *args], 60, True,
                                  [*CLI, "latency", "--help"]))
    found.append(Step("calibrate a small CUDA profile", [
        *CLI, "latency", "calibrate", "--space", "metaformer", "--device", "cuda", "--dtype", "float16",
        "--out", str(out / "cuda-metaformer-fp16.json"), "--ops-archs", "4", "--fit-archs", "12", "--passes", "1"],
        150, False, [*CLI, "latency", "calibrate", "--help"]))
    for model in MODELS:  # the GPU name is filled in once provenance knows it
        found.append(Step(f"estimate {model}", [*CLI, "latency", model, "--device", "{gpu}", "--dtype", "float16",
                                                "--no-measure", "--json"], 60, True,
                          [*CLI, "latency", model, "--device", "h100", "--no-measure", "--json"]))
    found.append(Step("search on cuda", [
        *CLI, "search", "--device", "cuda", "--budget", "2ms", "--trials", "6", "--evaluator", "zero-cost",
        "--space", "metaformer", "--out", str(out / "search")], 240, False, [*CLI, "search", "--help"]))
    found.append(Step("zoo parity on cuda", [sys.executable, "-c", _PARITY_CODE, ",".join(PARITY), str(PARITY_ATOL)],
                      180, True, [sys.executable, "-c", "import timm, metaformer_lab.zoo"]))
    found.append(Step("pytest -m cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                      180, False, [sys.executable, "-m", "pytest", "--co", "-q", "-m", "cuda"]))
    return found


def gpu_key(device_name: str) -> str | None:
    """The estimator's key for a CUDA device name (``NVIDIA H100 80GB HBM3`` -> ``h100``)."""
    from metaformer_lab.latency import GPUS

    name = device_name.lower().replace(" ", "")
    return next((k for k in sorted(GPUS, key=len, reverse=True) if k in name), None)


def run_step(step: Step, gpu: str | None, deadline: float) -> dict[str, Any]:
    command = [(gpu or "h100") if part == "{gpu}" else part for part in step.command]
    left = deadline - time.time()
    if left < 5:
        return {"command": command, "skipped": "out of time"}
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=min(step.timeout_s, left))
    except subprocess.TimeoutExpired:
        return {"command": command, "timed_out": True, "seconds": time.time() - start}
    except FileNotFoundError as err:
        return {"command": command, "error": str(err)}
    result: dict[str, Any] = {"command": command, "rc": done.returncode, "seconds": round(time.time() - start, 2)}
    if done.returncode == 0 and step.parse_json:
        try:
            result["output"] = json.loads(done.stdout)
        except json.JSONDecodeError:
            result["stdout_tail"] = done.stdout[-2000:]
    else:
        result["stdout_tail"] = done.stdout[-2000:]
        if done.returncode:
            result["stderr_tail"] = done.stderr[-2000:]
    return result


def estimator_error(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The uncalibrated estimate against the CUDA measurement, float16 batch 1, per model."""
    out = {}
    for model in MODELS:
        measured = results.get(f"measure {model} float16 batch 1", {}).get("output", {}).get("measured_ms")
        estimated = results.get(f"estimate {model}", {}).get("output", {}).get("estimated_ms")
        if measured and estimated:
            out[model] = {"measured_ms": measured, "estimated_ms": estimated,
                          "error": (estimated - measured) / measured}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of the whole check")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check their commands parse")
    args = parser.parse_args()
    plan = steps(args.out)
    if args.dry_run:
        checked: dict[tuple[str, ...], bool] = {}
        for k, step in enumerate(plan, 1):
            shown = " ".join(step.command).replace("\n", "; ")
            print(f"{k:2d}. {step.name} (<= {step.timeout_s:g} s): {shown[:160]}")
            if step.check is not None and tuple(step.check) not in checked:
                done = subprocess.run(step.check, cwd=ROOT, capture_output=True, text=True, timeout=120)
                checked[tuple(step.check)] = done.returncode == 0
                print(f"    check {'ok' if done.returncode == 0 else 'FAILED'}: {' '.join(step.check)[:120]}")
        bad = sum(not ok for ok in checked.values())
        print(f"{len(plan)} steps; nvidia-smi {'found' if shutil.which('nvidia-smi') else 'not found (no GPU here)'}")
        sys.exit(1 if bad else 0)
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run here, the check on the GPU machine")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    name = torch.cuda.get_device_name(0)
    provenance = {"gpu": name, "gpu_key": gpu_key(name), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results: dict[str, dict[str, Any]] = {}
    for step in plan:
        results[step.name] = run_step(step, provenance["gpu_key"], deadline)
        print(f"{step.name}: rc {results[step.name].get('rc')} in {results[step.name].get('seconds')} s", flush=True)
    report = {"provenance": provenance, "steps": results, "estimator_error_fp16_b1": estimator_error(results)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["estimator_error_fp16_b1"], indent=1))


if __name__ == "__main__":
    main()
