"""What the memory guard's meta run costs, with every meta kernel run and with their layouts remembered.

Not a test. ``metaformer_lab.search.memory.estimate_step`` runs a training step (forward, backward, AdamW's
states) on the meta device before a candidate is evaluated; many of PyTorch's meta kernels are Python, and the
estimate remembers the layouts they give (``memory._meta_call``). For candidates sampled from the tiny space
(64 images at 32 px, what the search's train evaluator plans) and for zoo models at their own size (2 images),
at one thread, the median of three runs of each:

- ``every kernel``: the meta kernels run each time (the estimate before the layouts were remembered);
- ``first``: the layouts forgotten before each run (a search's first candidate: only the repeats within
  the network are remembered);
- ``remembered``: after the runs above (a candidate whose ops' shapes the search has seen).

Each run's estimate is compared with the ``every kernel`` one: they must be equal.

    python benchmarks/meta_step.py [--candidates 8] [--out benchmarks/results/meta_step.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
import torch

import metaformer_lab
from metaformer_lab.latency.target import cpu_name
from metaformer_lab.search import memory
from metaformer_lab.space import decode, load_space
from metaformer_lab.space.decode import InvalidPoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "meta_step.json"
ZOO = ["poolformer_s12", "caformer_b36", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224", "gcvit_tiny"]
REMEMBERED = memory._meta_call


def _every_kernel(func: Any, args: Any, kwargs: Any) -> Any:
    return func(*args, **kwargs)


def _time(net: torch.nn.Module, shape: tuple[int, ...], way: str) -> tuple[float, memory.MemoryEstimate]:
    memory._meta_call = _every_kernel if way == "every kernel" else REMEMBERED  # type: ignore[assignment]
    seconds, estimate = [], None
    for _ in range(3):
        if way == "first":
            memory._META_LAYOUTS.clear()
        start = time.perf_counter()
        estimate = memory.estimate_step(net.train(), shape, backward=True, optimizer_states=2)
        seconds.append(time.perf_counter() - start)
    memory._meta_call = REMEMBERED  # type: ignore[assignment]
    assert estimate is not None
    return statistics.median(seconds), estimate


def _row(name: str, net: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    times, estimates = {}, {}
    for way in ("every kernel", "first", "remembered"):
        times[way], estimates[way] = _time(net, shape, way)
    same = len({estimates[w] for w in estimates}) == 1
    row = {"network": name, "batch": shape[0], "size": shape[-1], **{f"{w} s": round(t, 4) for w, t in times.items()},
           "same_estimate": same}
    print(f"{name:34s} {shape[-1]:4d} px x{shape[0]:<3d} every kernel {times['every kernel']:.3f} s, first "
          f"{times['first']:.3f} s, remembered {times['remembered']:.3f} s, same estimate: {same}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=8, help="tiny-space points to sample")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("tiny")
    rows: list[dict[str, Any]] = []
    seed = 0
    while len(rows) < args.candidates:  # valid points: a sampler's invalid ones are never estimated
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        seed += 1
        try:
            net = metaformer_lab.build(decode(space, trial))
        except InvalidPoint:
            continue
        rows.append(_row(f"tiny space, seed {seed - 1}", net, (64, *net.input_type.shape(1)[1:])))
    for name in ZOO:
        net = metaformer_lab.build(name)
        rows.append(_row(name, net, (2, *net.input_type.shape(1)[1:])))
    summary = {}
    for group, members in (("tiny space", rows[:args.candidates]), ("zoo", rows[args.candidates:])):
        summary[group] = {w: round(statistics.median(r[f"{w} s"] for r in members), 4)
                          for w in ("every kernel", "first", "remembered")}
        print(f"{group}: median " + ", ".join(f"{w} {s:.3f} s" for w, s in summary[group].items()))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
              "torch": torch.__version__, "summary": summary, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["same_estimate"] for r in rows):
        raise SystemExit("an estimate differed from the one with every kernel run")


if __name__ == "__main__":
    main()
