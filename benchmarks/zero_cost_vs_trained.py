"""Zero-cost proxies against short training: does a proxy rank architectures the way training does?

Not a test. For each of N architectures of a search space (or each spec YAML of ``--specs DIR``): build it
(seeded), compute every zero-cost proxy and the parameter count, train it on digits for a few epochs, then
report each proxy's Spearman and Kendall correlation with the trained accuracy. A proxy is worth its cost
only if it beats ``params``, the log parameter count. With ``--repeats 2`` or more each architecture is trained
with several seeds: their mean accuracy is the target, and the correlation between two seeds' accuracies is
the ceiling (how well training agrees with itself).

    python benchmarks/zero_cost_vs_trained.py [--n 30] [--epochs 5] [--seed 0] [--space tiny] [--specs DIR]
        [--dataset digits] [--repeats 1] [--threads 1] [--out benchmarks/results/zero_cost_vs_trained.json]

Writes OUT (JSON: provenance, one row per architecture, correlations) and OUT with suffix ``.csv`` (the rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from scipy import stats

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.graph.lower import lower
from metaformer_lab.search.datasets import Dataset, load_dataset
from metaformer_lab.search.evaluators import PROXIES, EvaluationFailed, TrainEvaluator, ZeroCostEvaluator
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import read_spec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "zero_cost_vs_trained.json"
TARGET = "trained_acc"
CEILING = "training, seed 1 vs seed 0"


@dataclass
class Candidate:
    name: str
    spec: ArchSpec
    params: dict[str, Any] = field(default_factory=dict)  # the space's assignment, when sampled


def candidates_from_space(space_name: str, n: int, seed: int) -> list[Candidate]:
    from metaformer_lab.space import load_space, sample  # the space layer, imported only when used

    drawn: Any = sample(load_space(space_name), n, seed=seed)
    points = getattr(drawn, "points", None)
    if points is not None:  # a Sample: points with their assignments
        return [Candidate(p.spec.name, p.spec, dict(p.params)) for p in points]
    return [Candidate(spec.name, spec) for spec in drawn]  # a plain list of ArchSpec


def candidates_from_dir(folder: Path) -> list[Candidate]:
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise SystemExit(f"{folder}: no spec YAML files")
    return [Candidate(f.stem, read_spec(str(f))) for f in files]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Datasets:
    """One dataset per (input size, channels, classes) the candidates need, loaded once."""

    def __init__(self, source: str, seed: int) -> None:
        self.source, self.seed = source, seed
        self.loaded: dict[tuple[int, int, int, int], Dataset] = {}

    def for_spec(self, spec: ArchSpec) -> Dataset:
        key = (*spec.input.hw, spec.input.channels, spec.num_classes)
        if key not in self.loaded:
            self.loaded[key] = load_dataset(self.source, input_size=key[:2], channels=key[2], seed=self.seed,
                                            num_classes=key[3])
        return self.loaded[key]


def measure(candidate: Candidate, data: Dataset, proxies: dict[str, ZeroCostEvaluator], trainer: TrainEvaluator,
            seed: int, repeats: int) -> dict[str, Any]:
    """Every proxy and ``repeats`` training runs of one candidate; failures are recorded as reasons."""
    row: dict[str, Any] = {"name": candidate.name, "input_size": "x".join(map(str, candidate.spec.input.hw))}
    torch.manual_seed(seed)  # the same initial weights for every proxy and every training run
    net = compile_graph(lower(candidate.spec))
    row["num_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    for proxy, evaluator in proxies.items():
        try:
            result = evaluator.evaluate(net, data, seed=seed)
            row[proxy], row[f"{proxy}_s"] = result.score, round(result.seconds, 4)
        except EvaluationFailed as err:
            row[proxy], row[f"{proxy}_failed"] = None, err.reason
    accs = []
    for k in range(repeats):
        try:
            result = trainer.evaluate(net, data, seed=seed + k)
            accs.append(result.score)
            row[f"acc_seed{k}"], row[f"train_s_seed{k}"] = result.score, round(result.seconds, 2)
        except EvaluationFailed as err:
            row[f"acc_seed{k}"], row["train_failed"] = None, err.reason
    row[TARGET] = sum(accs) / len(accs) if len(accs) == repeats else None
    row["assignment"] = candidate.params
    return row


def correlations(rows: list[dict[str, Any]], keys: Iterable[str], target: str = TARGET) -> dict[str, dict[str, Any]]:
    """Spearman and Kendall correlation of each key with ``target``, over rows where both are finite."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        pairs = [(r[key], r[target]) for r in rows if _finite(r.get(key)) and _finite(r.get(target))]
        if len(pairs) < 3:
            out[key] = {"n": len(pairs), "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
            continue
        xs, ys = zip(*pairs, strict=True)
        rho, rho_p = stats.spearmanr(xs, ys)
        tau, tau_p = stats.kendalltau(xs, ys)
        out[key] = {"n": len(pairs), "spearman": _num(rho), "spearman_p": _num(rho_p), "kendall": _num(tau),
                    "kendall_p": _num(tau_p)}
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _num(value: Any) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def show(console: Console, table_rows: dict[str, dict[str, Any]]) -> None:
    table = Table(title=f"correlation with trained accuracy ({TARGET})")
    for column in ("score", "n", "spearman", "p", "kendall", "p", "beats params"):
        table.add_column(column, justify="left" if column == "score" else "right")
    base = table_rows.get("params", {}).get("spearman")
    for key, c in table_rows.items():
        beats = "" if key in ("params", CEILING) or c["spearman"] is None or base is None else \
            ("yes" if c["spearman"] > base else "no")
        table.add_row(key, str(c["n"]), *(f"{c[k]:.3f}" if c[k] is not None else "-" for k in
                                          ("spearman", "spearman_p", "kendall", "kendall_p")), beats)
    console.print(table)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    cands = candidates_from_dir(args.specs) if args.specs else candidates_from_space(args.space, args.n, args.seed)
    datasets = Datasets(args.dataset, args.seed)
    proxies = {p: ZeroCostEvaluator(proxy=p, batch_size=args.proxy_batch_size) for p in PROXIES}  # type: ignore[arg-type]
    trainer = TrainEvaluator(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             max_batches_per_epoch=args.max_batches_per_epoch)
    rows = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("architectures", total=len(cands))
        for cand in cands:
            progress.update(task, description=cand.name)
            try:
                rows.append(measure(cand, datasets.for_spec(cand.spec), proxies, trainer, args.seed, args.repeats))
            except MetaformerLabError as err:  # a spec or data problem: recorded, not fatal
                rows.append({"name": cand.name, "failed": str(err).splitlines()[0]})
            progress.advance(task)
    table = correlations(rows, PROXIES)
    if args.repeats >= 2:
        table[CEILING] = correlations(rows, ["acc_seed1"], target="acc_seed0")["acc_seed1"]
    return {"rows": rows, "correlations": table, "datasets": [d.provenance() for d in datasets.loaded.values()],
            "evaluators": {"train": trainer.options(), **{p: e.options() for p, e in proxies.items()}}}


def write(result: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    csv_path = out.with_suffix(".csv")
    rows = result["rows"]
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "assignment"))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="architectures sampled from the space")
    parser.add_argument("--epochs", type=int, default=TrainEvaluator.epochs, help="default: the train evaluator's")
    parser.add_argument("--seed", type=int, default=0, help="sampling, data split, init, batches")
    parser.add_argument("--space", default="tiny", help="a shipped space name or a space file")
    parser.add_argument("--specs", type=Path, default=None, help="a folder of spec YAMLs instead of a space")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--repeats", type=int, default=1, help="training runs per architecture (seeds)")
    parser.add_argument("--batch-size", type=int, default=TrainEvaluator.batch_size)
    parser.add_argument("--lr", type=float, default=TrainEvaluator.lr)
    parser.add_argument("--max-batches-per-epoch", type=int, default=None)
    parser.add_argument("--proxy-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    start = time.perf_counter()
    result = run(args, console)
    show(console, result["correlations"])
    import optuna
    import scipy
    import sklearn
    import timm

    result["provenance"] = {
        "benchmark": "zero_cost_vs_trained", "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "timm": timm.__version__, "optuna": optuna.__version__,
        "scipy": scipy.__version__, "sklearn": sklearn.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "threads": args.threads,
        "seconds": round(time.perf_counter() - start, 1),
    }
    csv_path = write(result, args.out)
    console.print(f"wrote {args.out} and {csv_path}")


if __name__ == "__main__":
    main()
