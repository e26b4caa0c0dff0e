"""Building a profile: every op of a set of architectures timed in isolation, then the whole-model
correction fitted on measured networks.

Ops are timed as the compiled network runs them: the node's own module (built by the same registry
entry the compiler uses) on a tensor of the node's input type, in the memory order the graph delivers
it (a permuted view after a layout change), at the profile's dtype, batch size and thread count. The
order of the op's output is recorded with it, so the keys of the ops after it are right.

The correction is a least-squares fit, on relative error, of ``measured ~ a * sum(op ms) + b * blocks +
c * residual branches + d * stages + e`` over whole networks measured with :func:`measure`: the
Python work of the containers and what isolation misses (cache state between ops) that data shows.

Calibration can be resumed: the profile file is written every few ops and after every network, and
a run with the same settings and output file skips what is there.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metaformer_lab.compile.folding import deploy_form, to_channels_last
from metaformer_lab.core.errors import Issue, LatencyError
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.nodes import build_node
from metaformer_lab.latency.interleave import measure_interleaved
from metaformer_lab.latency.keys import NodeKey, node_inputs, walk_keys
from metaformer_lab.latency.measure import DTYPES
from metaformer_lab.latency.predict import corrected, op_latencies, structure
from metaformer_lab.latency.profile import FEATURES, OpEntry, Profile, load_profile, relative_errors
from metaformer_lab.latency.target import LatencyTarget
from metaformer_lab.ops.common import init_weights

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase is ``ops`` or ``models``."""


def profile_settings(target: LatencyTarget) -> dict[str, Any]:
    """What a profile file records about what it is for: the target on this host, and the torch version."""
    return {**target.here().to_json(), "torch": torch.__version__}


# --- timing one op -------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any], *, min_runs: int = 25, min_time_s: float = 0.04, max_time_s: float = 0.5,
              sync: Callable[[], None] = lambda: None) -> tuple[float, float, float]:
    """(median, p10, p90) in ms of ``fn()``, each call timed alone after a short warm-up."""
    for _ in range(3):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter_ns()
        fn()
        sync()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
        spent = time.perf_counter() - start
        if (len(samples) >= min_runs and spent >= min_time_s) or spent >= max_time_s and len(samples) >= 3:
            break
    ordered = sorted(samples)
    k = len(ordered) - 1
    return statistics.median(ordered), ordered[int(0.1 * k)], ordered[int(math.ceil(0.9 * k))]


def make_input(t: TensorType, mem: str, batch: int, dtype: torch.dtype, device: str) -> Tensor:
    """A random tensor of type ``t``; ``mem == 'p'``: a permuted view of the other layout, as a layout
    change delivers it."""
    if mem == "p" and t.layout in ("maps", "tokens") and not t.prefix:
        other = t.to("tokens" if t.layout == "maps" else "maps")
        x = torch.randn(other.shape(batch), dtype=dtype, device=device)
        return x.permute(0, 2, 3, 1) if t.layout == "tokens" else x.permute(0, 3, 1, 2)
    return torch.randn(t.shape(batch), dtype=dtype, device=device)


def _module(graph: ArchGraph, name: str) -> nn.Module:
    module = build_node(graph, name)
    module.apply(init_weights)
    return module


def op_call(graph: ArchGraph, name: str, key: NodeKey, target: LatencyTarget) -> tuple[Callable[[], Tensor], str]:
    """A zero-argument call running node ``name`` as the network does, and a label of what it is."""
    dtype = DTYPES[target.dtype]
    inputs = [graph.nodes[i]["out"] for i in node_inputs(graph, name)]
    if graph.is_composite(name):
        inputs = [graph.nodes[graph.nodes[name]["fork"]]["in_type"]]
    xs = [make_input(t, m, target.batch_size, dtype, target.device) for t, m in zip(inputs, key.in_mem, strict=True)]
    kind = graph.nodes[name]["kind"]
    if kind == "add":
        if len(xs) == 3:  # the prefix tokens get the sum; the grid tokens pass through (Block.forward)
            prefix = xs[0].shape[1]
            return (lambda: torch.cat([xs[0] + xs[1], xs[2][:, prefix:]], dim=1)), "add"
        return (lambda: xs[0] + xs[1]), "add"
    module = _module(graph, name)
    if target.deploy:  # the op's own folds; those across ops show in the networks the correction is fitted on
        module = deploy_form(module)
    module = module.to(device=target.device, dtype=dtype).eval()
    if target.channels_last and xs[0].dim() == 4:
        module = to_channels_last(module)
    return (lambda: module(xs[0])), kind


def measure_op(graph: ArchGraph, name: str, key: NodeKey, target: LatencyTarget) -> OpEntry:
    call, _ = op_call(graph, name, key, target)
    sync = torch.cuda.synchronize if target.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        out = call()
        median, p10, p90 = time_call(call, sync=sync)
    contiguous = out.is_contiguous() if isinstance(out, Tensor) else True
    # the profile's statistic is the p10 (see latency.interleave): it repeats where the median wanders
    return OpEntry(ms=p10, p10=p10, p90=p90, out_mem="c" if contiguous else "p", config=key.config,
                   kind=key.kind, op=key.op, numel_in=key.numel_in, numel_out=key.numel_out, mem=key.in_mem)


# --- the whole calibration ------------------------------------------------------------------------


def _threads(target: LatencyTarget) -> Callable[[], None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(target.threads or previous)
    return lambda: torch.set_num_threads(previous)


def calibrate_ops(profile: Profile, graphs: Sequence[ArchGraph], target: LatencyTarget, *, passes: int = 3,
                  out: Path | None = None, progress: Progress | None = None, save_every: int = 100,
                  seed: int = 0) -> int:
    """Time every op of ``graphs`` in ``passes`` passes and keep each op's fastest median: a shared machine
    slows down for seconds at a time, and a slow pass is what that looks like. The first pass walks the
    graphs (an op's output order, measured, decides the keys after it); later passes visit the ops in a
    new random order each. Ops the profile has from as many passes are skipped. Returns the timings taken."""
    found: dict[str, tuple[ArchGraph, str, NodeKey]] = {}
    timed = 0
    restore = _threads(target)

    def tick() -> None:
        nonlocal timed
        timed += 1
        if out is not None and timed % save_every == 0:
            profile.save(out)

    try:
        for i, graph in enumerate(graphs):
            def out_mem(name: str, key: NodeKey, graph: ArchGraph = graph) -> str:
                found.setdefault(key.key, (graph, name, key))
                if key.key not in profile.ops:
                    profile.ops[key.key] = measure_op(graph, name, key, target)
                    tick()
                return profile.ops[key.key].out_mem

            for _ in walk_keys(graph, target.batch_size, out_mem):
                pass
            if progress is not None:
                progress("ops", i + 1, len(graphs))
        todo = [item for item in found.items() if profile.ops[item[0]].passes < passes]
        rng = random.Random(seed)
        for p in range(2, passes + 1):
            rng.shuffle(todo)
            for j, (hashed, (graph, name, key)) in enumerate(todo):
                old = profile.ops[hashed]
                if old.passes < p:
                    new = measure_op(graph, name, key, target)
                    profile.ops[hashed] = replace(old, ms=min(old.ms, new.ms), p10=min(old.p10, new.p10),
                                             p90=min(old.p90, new.p90), passes=old.passes + 1)
                    tick()
                if progress is not None:
                    progress(f"ops, pass {p}", j + 1, len(todo))
    finally:
        restore()
    _forget_groups(profile)
    return timed


def _forget_groups(profile: Profile) -> None:
    for attr in ("by_config", "by_op", "by_kind"):
        profile.__dict__.pop(attr, None)


def measure_models(profile: Profile, graphs: Sequence[ArchGraph], target: LatencyTarget, *, group: int = 8,
                   out: Path | None = None, progress: Progress | None = None, time_per_model_s: float = 2.0) -> None:
    """Measure whole networks for the correction, interleaved in groups (:func:`measure_interleaved`);
    each one's p10, median and spread accumulate in ``profile.fit['models']``."""
    models: dict[str, dict[str, Any]] = profile.fit.setdefault("models", {})
    todo = [g for g in graphs if "measured_ms" not in models.get(g.spec.name, {})]
    for k in range(0, len(todo), group):
        chunk = todo[k:k + group]
        results = measure_interleaved(chunk, target, time_per_item_s=time_per_model_s)
        for graph, r in zip(chunk, results, strict=True):
            models[graph.spec.name] = {"measured_ms": r.p10_ms, "median_ms": r.median_ms, "cv": r.cv,
                                       "noisy": r.noisy}
        if out is not None:
            profile.save(out)
        if progress is not None:
            progress("models", min(k + group, len(todo)), len(todo))
    for graph in graphs:
        models[graph.spec.name].update(_features(graph, profile))


def _features(graph: ArchGraph, profile: Profile) -> dict[str, float]:
    nodes, _ = op_latencies(graph, profile)
    return {"ops_ms": sum(nodes.values()), **structure(graph)}


def fit_correction(profile: Profile) -> None:
    """Weighted least squares (relative error) of measured latency on the correction features."""
    models = [m for m in profile.fit.get("models", {}).values() if "ops_ms" in m and not m["noisy"]]
    if len(models) < len(FEATURES) + 2:
        raise LatencyError.single("--models", f"{len(models)} quiet network measurements are too few to fit the "
                                              f"correction; need at least {len(FEATURES) + 2}")
    x = torch.tensor([[m[f] for f in FEATURES] for m in models], dtype=torch.float64)
    y = torch.tensor([m["measured_ms"] for m in models], dtype=torch.float64)
    w = 1.0 / y  # rows scaled by 1/measured: least squares on relative error
    coef = torch.linalg.lstsq(x * w[:, None], y * w).solution
    profile.correction = [float(c) for c in coef]
    predicted = [corrected(profile, {f: m[f] for f in FEATURES}) for m in models]
    errors = relative_errors(predicted, [m["measured_ms"] for m in models])
    profile.fit.update(archs=len(models), coef=dict(zip(FEATURES, profile.correction, strict=True)),
                       mape=sum(abs(e) for e in errors) / len(errors))


def start_profile(name: str, target: LatencyTarget, out: Path | None, *, resume: bool,
                  description: str = "") -> Profile:
    """A new profile, or the one in ``out`` when resuming with the same settings."""
    created = datetime.now(timezone.utc).isoformat()
    fresh = Profile(name=name, settings={**profile_settings(target), "created": created},
                    description=description)
    if not (resume and out is not None and out.exists()):
        return fresh
    old = load_profile(out)
    differ = old.target.mismatches(fresh.target)
    if old.settings.get("torch") != fresh.settings["torch"]:
        differ.append(f"torch {old.settings.get('torch')} (want {fresh.settings['torch']})")
    if differ:
        raise LatencyError([Issue("--resume", f"{out} was calibrated with other settings: {', '.join(differ)}")])
    return old




def calibrate_space(space: str, op_graphs: list[ArchGraph], fit_graphs: list[ArchGraph], target: LatencyTarget,
                    out: Path, *, name: str, seeds: tuple[int, int], passes: int = 3, model_seconds: float = 2.0,
                    resume: bool = False, progress: Progress | None = None) -> Profile:
    """The whole calibration of a profile for the networks of ``space``: every op of ``op_graphs + fit_graphs``
    timed in ``passes`` passes, the ``fit_graphs`` networks measured (``model_seconds`` of runs each), the
    correction fitted. ``seeds`` are the
    seeds the two lists were drawn with; they are recorded, and ``latency evaluate`` refuses them. The profile
    is saved to ``out`` as it grows (resumable) and when done."""
    profile = start_profile(name, target, out, resume=resume,
                            description=f"{space} space, {target.threads} thread(s), {target.dtype}, "
                                        f"batch {target.batch_size}" + (", deploy form" if target.deploy else ""))
    profile.fit["calibration"] = {"space": space, "seeds": list(seeds), "ops_archs": len(op_graphs),
                                  "fit_archs": len(fit_graphs), "passes": passes, "model_seconds": model_seconds}
    calibrate_ops(profile, op_graphs + fit_graphs, target, passes=passes, out=out, progress=progress,
                  seed=seeds[0])
    profile.save(out)
    measure_models(profile, fit_graphs, target, out=out, progress=progress, time_per_model_s=model_seconds)
    fit_correction(profile)
    profile.save(out)
    return profile
