"""The main job: `search` (latency-constrained architecture search) and `report` (re-print a run)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from metaformer_lab.cli.common import app, console, exit_with, progress_bar
from metaformer_lab.core.errors import MetaformerLabError

Opt = typer.Option


def _config(study: Path | None, **values: Any) -> Any:
    from metaformer_lab.search.config import load_study_file, make_config

    if study is not None:
        return load_study_file(study, **values)
    return make_config(**values)


class _StopAfterTrial:
    """First Ctrl-C: finish the running trial, then stop; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]stopping after the running trial (Ctrl-C again to stop now); the study is kept[/]")


@app.command()
def search(
    space: Annotated[str | None, Opt(help="Search space: a file or a shipped name (tiny, metaformer).")] = None,
    budget: Annotated[str | None, Opt(help="Latency budget with a unit: 2ms, 500us, 0.1s.")] = None,
    budget_margin: Annotated[str | None, Opt(help="auto or a percentage (10%): an estimated or predicted latency "
                                                  "counts as within budget only with this margin; auto: the latency "
                                                  "source's measured error.")] = None,
    device: Annotated[str | None, Opt(help="cpu, cuda, or a GPU name for an estimate from its datasheet (h100, t4, "
                                           "...).")] = None,
    threads: Annotated[int | None, Opt(help="CPU threads for latency (default 1).")] = None,
    deploy: Annotated[bool, Opt("--deploy", help="The budget is for the deploy form (what ships: BatchNorms, norm "
                                                 "affines and layer scales folded); CPU or CUDA.")] = False,
    profile: Annotated[str | None, Opt(help="Latency profile (file or shipped name), 'auto', or 'none' to "
                                            "measure every candidate.")] = None,
    host_check: Annotated[bool, Opt("--host-check/--no-host-check", help="Rescale a CPU profile to this host from "
                                                                        "8 measured networks first.")] = True,
    batch_size: Annotated[int | None, Opt(help="Batch size of the latency budget (default 1).")] = None,
    dtype: Annotated[str | None, Opt(help="float32, float16 or bfloat16.")] = None,
    dataset: Annotated[str | None, Opt(help="digits, cifar10:PATH, imagefolder:PATH or synthetic[:N].")] = None,
    evaluator: Annotated[str | None, Opt(help="train (short training) or zero-cost (training-free proxy).")] = None,
    epochs: Annotated[int | None, Opt(help="Epochs of the train evaluator.")] = None,
    proxy: Annotated[str | None, Opt(help="Proxy of the zero-cost evaluator: grad_norm (default), naswot, synflow, "
                                          "params.")] = None,
    trials: Annotated[int | None, Opt(help="Trials in the study (a resumed study runs up to this many).")] = None,
    timeout: Annotated[float | None, Opt(help="Stop starting trials after this many seconds.")] = None,
    objectives: Annotated[str | None, Opt(help="score (best score within budget) or score,latency (Pareto).")]
    = None,
    storage: Annotated[str | None, Opt(help="SQLAlchemy URL of the study storage (default: SQLite in the run "
                                            "folder).")] = None,
    study_name: Annotated[str | None, Opt(help="Study name (default: SPACE-BUDGET-DEVICE).")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue an existing study (or join it from another "
                                                "process).")] = False,
    seed: Annotated[int | None, Opt(help="Seed of the sampler and of training.")] = None,
    out: Annotated[Path | None, Opt(metavar="DIR", help="Run folder (default: runs/STUDY_NAME).")] = None,
    study: Annotated[Path | None, Opt("--study", help="A study file (studies/*.yaml); options given here win.")]
    = None,
    max_memory: Annotated[str | None, Opt(help="Memory the process may hold while evaluating (2GB, 512MB; what "
                                               "it holds counts): a candidate whose estimated step does not fit "
                                               "is micro-batched, else recorded out_of_memory (default: a fifth "
                                               "of what is free).")] = None,
    score_references: Annotated[bool, Opt("--score-references", help="Also score the space's references far over "
                                                                     "the budget, after the searched trials.")]
    = False,
    backend: Annotated[str | None, Opt(help="optuna (trials in this process) or ray (trials spread over a Ray "
                                            "cluster).")] = None,
    address: Annotated[str | None, Opt(help="Ray: a cluster to join (default: a local Ray with this machine's "
                                            "CPUs).")] = None,
    workers: Annotated[int | None, Opt(help="Ray: trials at once (default: what the cluster's CPUs allow).")] = None,
    cpus_per_trial: Annotated[float | None, Opt(help="Ray: CPUs per trial (default 1).")] = None,
    gpus_per_trial: Annotated[float | None, Opt(help="Ray: GPUs per trial (default 0; with any, trials train on "
                                                     "CUDA).")] = None,
) -> None:
    """Search a space for the best architectures within a latency budget; write them as spec YAMLs.

    With no options: the tiny 32x32 space, scikit-learn's digits, 5 epochs of training per candidate, 40 trials,
    the CPU at 1 thread, a 2 ms budget.

    Examples:
      metaformer-lab search --budget 2ms
      metaformer-lab search --space metaformer --device h100 --dtype bfloat16 --budget 1ms --evaluator zero-cost
      metaformer-lab search --study studies/tiny_digits_2ms.yaml --resume
      metaformer-lab search --backend ray --workers 2 --trials 8
    """
    import optuna

    from metaformer_lab.search.latency import margin as latency_margin
    from metaformer_lab.search.run import execute, prepare

    options: dict[str, Any] = {}
    if epochs is not None:
        options["epochs"] = epochs
    if proxy is not None:
        options["proxy"] = proxy
    ray = {k: v for k, v in {"address": address, "workers": workers, "cpus_per_trial": cpus_per_trial,
                             "gpus_per_trial": gpus_per_trial}.items() if v is not None}
    try:
        config = _config(study, space=space, budget=budget, budget_margin=budget_margin, device=device, threads=threads,
                         deploy=deploy or None,
                         profile=None if profile is None else (None if profile == "none" else profile),
                         batch_size=batch_size, dtype=dtype, dataset=dataset, evaluator=evaluator,
                         evaluator_options=options or None, trials=trials, timeout_s=timeout, objectives=objectives,
                         storage=storage, study_name=study_name, seed=seed, out=None if out is None else str(out),
                         host_check=None if host_check else False, max_memory=max_memory,
                         score_references=score_references or None, backend=backend, ray=ray or None)
        if profile == "none":
            config = config.model_copy(update={"profile": None})
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar tells each trial's outcome
        prepared = prepare(config, resume=resume)  # every input checked before anything runs
        console.print(f"{config.name}: budget {config.budget_ms:g} ms, {config.dtype_note}, batch {config.batch_size}")
        margin = latency_margin(config, prepared.source)
        if config.budget_margin is not None:
            console.print(f"budget margin {margin.fraction:.1%}: {margin.why}")
        for note in prepared.notes:
            console.print(note)
        if config.backend == "ray":
            from metaformer_lab.search.ray_backend import describe

            console.print(describe(config) + "; Ctrl-C stops at once, --resume re-runs the unfinished trials")
        stop = _StopAfterTrial()
        previous = signal.signal(signal.SIGINT, stop)
        try:
            with progress_bar() as bar:
                task = bar.add_task("searching", total=config.trials)
                report = execute(prepared, progress=lambda e: _advance(bar, task, e),
                                 should_stop=lambda: stop.requested,
                                 finalist_progress=lambda k, n: bar.update(
                                     task, description=f"re-measuring finalist {k}/{n}"))
        finally:
            signal.signal(signal.SIGINT, previous)
    except MetaformerLabError as err:
        exit_with(err)
    _print_report(report, config.run_dir)



def _advance(bar: Progress, task: Any, event: Any) -> None:
    what = event.reason if event.score is None else f"score {event.score:.3f}"
    lat = f" at {event.latency_ms:.2f} ms" if event.latency_ms is not None else ""
    ref = f" ({event.reference})" if event.reference else ""
    best = f" | best {event.best_score:.3f}" if event.best_score is not None else ""
    bar.update(task, completed=min(event.finished, event.total),
               description=f"trial {event.number}{ref}: {what}{lat}{best}")


def _print_report(report: dict[str, Any], run_dir: Path) -> None:
    margin = (report.get("budget_margin") or {}).get("fraction") or 0.0
    with_margin = f" with a {margin:.1%} margin" if margin else ""
    console.print(f"[bold]{report['study']}[/]: budget {report['budget_ms']:g} ms{with_margin}, latency "
                  f"{report['latency']}")
    table = Table(title="trials by outcome", title_justify="left")
    table.add_column("outcome")
    table.add_column("trials", justify="right")
    for reason, n in sorted(report["trials"]["by_reason"].items(), key=lambda kv: -kv[1]):
        table.add_row(reason, str(n))
    console.print(table)
    refs = report.get("references") or {}
    counted = report.get("reference_counts")
    if counted and refs:
        console.print(f"references: {counted['scored']} scored, {counted['placed']} placed from their latency "
                      f"alone (far over the budget; --score-references scores them); none takes one of --trials")
    if refs:
        rt = Table(title="reference models", title_justify="left")
        for c in ("reference", "score", "latency ms", "outcome"):
            rt.add_column(c, justify="left" if c in ("reference", "outcome") else "right")
        for name, r in refs.items():
            outcome = r["reason"] if r.get("evaluated", True) else f"{r['reason']} (not scored)"
            rt.add_row(name, "-" if r["score"] is None else f"{r['score']:.4f}",
                       "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}", outcome)
        console.print(rt)
    for violator in report.get("finalists_over_budget", []):
        console.print(f"[red]trial {violator['trial']} (score {violator['score']:.4f}) was predicted at "
                      f"{violator['latency_ms']:.3f} ms but measured {violator['measured_ms']:.3f} ms: over budget, "
                      "not chosen[/]")
    best = report.get("best")
    if best is None and report.get("finalists_over_budget"):
        console.print("[red]no trial within budget: every finalist measured broke it; relax the budget or run "
                      "more trials (--resume --trials N)[/]")
    elif best is None:
        console.print("[red]no trial within budget finished[/]")
    else:
        measured = "" if best["measured_ms"] is None else f", measured {best['measured_ms']:.3f} ms"
        console.print(f"best: trial {best['trial']}, score {best['score']:.4f}, latency {best['latency_ms']:.3f} ms "
                      f"({best['latency_label']}){measured}, {best['params']:,} params")
    if report.get("interrupted"):
        console.print("[yellow]interrupted: the run folder holds what finished; resume with --resume[/]")
    written = [n for n in ("best.yaml", "pareto/", "trials.csv", "pareto.png", "summary.json")
               if (run_dir / n.rstrip("/")).exists()]
    console.print(f"run folder: {run_dir} ({', '.join(written)})")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder written by `search`.")]) -> None:
    """Re-print and re-plot a search from its storage (best.yaml, pareto/, trials.csv, pareto.png, summary.json).

    Example: metaformer-lab report runs/tiny-2ms-cpu
    """
    from metaformer_lab.search.report import load_run, write_run

    try:
        study, url = load_run(run_dir)
        summary = write_run(study, run_dir, url)
    except MetaformerLabError as err:
        exit_with(err)
    _print_report(summary, run_dir)
