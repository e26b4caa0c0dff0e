"""Latency commands: ``latency SPEC`` (measure, predict, estimate), ``calibrate``, ``evaluate``, ``profiles``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from metaformer_lab.cli.common import (
    BlockDirs,
    Deploy,
    MaxMemory,
    app,
    check_output_file,
    console,
    exit_with,
    progress_bar,
    refuse_oversized,
    writing,
)
from metaformer_lab.core.errors import Issue, LatencyError, MetaformerLabError

if TYPE_CHECKING:
    from metaformer_lab.latency.target import LatencyTarget


class _SpecByDefault(TyperGroup):
    """``latency SPEC ...`` runs the hidden ``spec`` command; ``latency calibrate ...`` the subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: the click Context typer vendors
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["spec", *args]
        return super().parse_args(ctx, args)


latency_app = typer.Typer(
    cls=_SpecByDefault, no_args_is_help=True,
    help="Latency: `latency SPEC` measures a spec (and predicts it from a profile, or estimates it for a named "
         "GPU); `latency calibrate | evaluate | profiles` build, check and list profiles.\n\n"
         "Example: metaformer-lab latency poolformer_s12 --input-size 64")
app.add_typer(latency_app, name="latency")

Device = Annotated[str, typer.Option(help="cpu, cuda, or a GPU name for an estimate without that GPU (rtx5090, h100, "
                                          "t4, ...), from its fitted profile or its datasheet.")]
Threads = Annotated[int, typer.Option(min=1, help="CPU threads (1 is the default setting: immune to a busy "
                                                  "neighbour on a shared machine).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")]
Dtype = Annotated[str, typer.Option(help="float32, float16 or bfloat16.")]
HostCheckOpt = Annotated[bool, typer.Option("--host-check/--no-host-check",
                                            help="Rescale a CPU profile to this host from a few measured networks "
                                                 "first (seconds; machines of one kind differ in speed).")]


def _fail(path: str, message: str) -> None:
    exit_with(MetaformerLabError([Issue(path, message)]))


@latency_app.command("spec", hidden=True)
def latency_of(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="A YAML file or a zoo model name.")],
    device: Device = "cpu",
    batch_size: BatchSize = 1,
    input_size: Annotated[int | None, typer.Option("--input-size", min=8, help="Input side (default: the spec's).")]
    = None,
    dtype: Dtype = "float32",
    threads: Threads = 1,
    profile: Annotated[str | None, typer.Option(help="A profile file, a shipped profile's name, or `auto` (the "
                                                     "shipped profile matching the setting).")] = None,
    no_measure: Annotated[bool, typer.Option("--no-measure", help="Predict or estimate only.")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Time in channels-last memory format.")]
    = False,
    host_check: HostCheckOpt = True,
    deploy: Deploy = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    block_dir: BlockDirs = [],  # noqa: B006  (typer reads the default)
    max_memory: MaxMemory = None,
) -> None:
    """Measure a spec's forward latency, predict it from a profile, or estimate it for a named GPU.

    Examples: metaformer-lab latency poolformer_s12 --input-size 64;
    metaformer-lab latency vit_small_patch16_224 --device h100 --no-measure --dtype float16
    """
    from metaformer_lab.api import to_graph
    from metaformer_lab.latency.source import LatencySource
    from metaformer_lab.latency.target import LatencyTarget

    try:
        graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
        arch = graph.spec
        target = LatencyTarget(device=device.lower(), dtype=dtype,
                               batch_size=batch_size, threads=threads, channels_last=channels_last,
                               deploy=deploy).at(graph)
        if target.kind == "gpu":
            from metaformer_lab.latency.gpu import gpu_spec

            target = dataclasses.replace(target, device=gpu_spec(target.device).name)  # raises "did you mean"
        # --no-measure measures nothing, the host check included
        source = LatencySource(target, profile=profile, host_check=host_check and not no_measure)
        out: dict[str, Any] = {"spec": arch.name, "settings": source.target.to_json(), "measured_ms": None,
                               "predicted_ms": None, "estimated_ms": None}
        if source.kind == "estimated":
            est = source.estimated(graph)
            out.update(estimated_ms=est.ms, estimate=est.record.to_json(), label=est.record.label)
        else:
            if profile == "auto" and source.profile is None:
                raise LatencyError(source.unmatched)
            if source.profile is not None:
                host_line = source.fit_host()
                if host_line is not None:
                    out.update(host_check=source.host.to_json() if source.host is not None else None,
                               host_line=host_line)
                p = source.predicted(graph)
                out.update(predicted_ms=p.ms, prediction=p.record.to_json())
            elif no_measure:
                _fail("--no-measure", "nothing to report: give --profile (or auto), or a GPU name as --device")
            if not no_measure:
                refuse_oversized(graph, batch_size, max_memory, "cuda" if target.kind == "cuda" else "cpu")
                r = source.measure(graph, min_time_s=1.0)
                out.update(measured_ms=r.median_ms, measurement=r.to_json())
    except MetaformerLabError as err:
        exit_with(err)
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    _print_latency(out, source.target)


def _print_latency(out: dict[str, Any], target: LatencyTarget) -> None:
    console.print(f"[bold]{out['spec']}[/bold] at {target.describe()}")
    if out.get("measurement"):
        m = out["measurement"]
        flag = f"  [red]noisy: {'; '.join(m['noise_reasons'])}[/red]" if m["noisy"] else ""
        load = m.get("neighbour_cores")
        busy = f"; neighbours used {load:.2f} cores" if load is not None else ""
        console.print(f"  measured   {m['median_ms']:.3f} ms median (p10 {m['p10_ms']:.3f}, p90 {m['p90_ms']:.3f}, "
                      f"cv {m['cv']:.1%}, {m['runs']} runs{busy}){flag}")
    if out.get("prediction"):
        p = out["prediction"]
        est = f"; {len(p['estimated_nodes'])} op(s) estimated from neighbours" if p["estimated_nodes"] else ""
        host = f", x{p['host_scale']:.2f} for this host" if p.get("host_scale", 1.0) != 1.0 else ""
        console.print(f"  predicted  {p['predicted_ms']:.3f} ms from profile '{p['profile']}' (quiet-machine "
                      f"p10{host}, coverage {p['coverage']:.0%}{est})")
        if out.get("host_line"):
            console.print(f"  {out['host_line']}")
    if out.get("estimate"):
        e = out["estimate"]
        mode = f"AMP {e['dtype']} (autocast)" if e.get("amp") else e["dtype"]
        console.print(f"  estimated  {e['total_ms']:.4f} ms on {e['gpu']}, {mode} ([yellow]{out['label']}"
                      f"[/yellow])")
        if e.get("extrapolates"):
            console.print(f"  [red]extrapolates[/red]: {e['extrapolates']}")



@latency_app.command("calibrate")
def calibrate(
    space: Annotated[str | None, typer.Option(help="The space whose ops the profile covers (a file or a shipped "
                                                   "name); not with --from-table.")] = None,
    out: Annotated[Path | None, typer.Option(help="The profile file to write (JSON); with --from-table the "
                                                  "default is gpu-GPU-DTYPE.json here.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda; with --from-table the GPU the table was measured on "
                                             "(rtx3090, rtx5090, rtx-pro-6000, h100, ...).")] = "cpu",
    threads: Threads = 1,
    batch_size: BatchSize = 1,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 (default: float32; float16 with "
                                                   "--from-table, timm's AMP tables).")] = None,
    from_table: Annotated[Path | None, typer.Option("--from-table", help="Fit a GPU's efficiency factors on a "
                                                    "benchmark table in timm's format instead of measuring here.")]
    = None,
    source: Annotated[str | None, typer.Option(help="With --from-table: where the table comes from (default: the "
                                                    "line of a README.md beside it that names it).")] = None,
    date: Annotated[str | None, typer.Option(help="With --from-table: when the table was measured.")] = None,
    prior_weight: Annotated[float | None, typer.Option("--prior-weight", min=0.0, help="With --from-table: pull of "
                                                       "each factor towards its default, per log unit (default "
                                                       "0.05; factors the table does not determine stay put).")]
    = None,
    name: Annotated[str | None, typer.Option(help="Profile name (default: the file's stem).")] = None,
    ops_archs: Annotated[int, typer.Option(min=1, help="Sampled architectures whose ops are timed.")] = 1000,
    fit_archs: Annotated[int, typer.Option(min=8, help="Whole networks measured for the correction.")] = 60,
    passes: Annotated[int, typer.Option(min=1, help="Timing passes per op (the fastest is kept).")] = 3,
    model_seconds: Annotated[float, typer.Option("--model-seconds", min=0.1, help="Seconds of timed runs per "
                                                 "network measured for the correction (taken in turns with the "
                                                 "other networks of its group; fewer is quicker and noisier).")]
    = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the draws (seed and seed+1; evaluate refuses both).")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the calibration in OUT.")] = False,
    deploy: Annotated[bool, typer.Option("--deploy", help="Profile the deploy form: each op folded as it ships, "
                                                          "the correction fitted on deploy-form networks.")]
    = False,
) -> None:
    """Build a latency profile: every op of sampled architectures timed in isolation, then a whole-model
    correction fitted on measured networks. Saved as it goes; `--resume` continues a killed run.

    With --from-table FILE --device GPU: fit that GPU's per-class efficiency factors and launch overhead on
    a published benchmark table (timm's format), no GPU needed; rows the zoo cannot express are listed and
    skipped.

    Examples: metaformer-lab latency calibrate --space tiny --threads 1 --out cpu-tiny-1t.json;
    metaformer-lab latency calibrate --from-table benchmark-infer-amp-nchw-pt291-cu130-5090.csv --device rtx5090
    """
    if from_table is not None:
        _calibrate_from_table(from_table, device, dtype or "float16", out, name, source, date, prior_weight)
        return
    if space is None:
        raise typer.BadParameter("give --space (the space to calibrate) or --from-table FILE",
                                 param_hint="--space")
    if out is None:
        raise typer.BadParameter("give --out (the profile file to write)", param_hint="--out")
    dtype = dtype or "float32"
    import torch

    from metaformer_lab.latency.calibrate import calibrate_space
    from metaformer_lab.latency.target import LatencyTarget
    from metaformer_lab.space import load_space, sample

    check_output_file("--out", out)
    if device not in ("cpu", "cuda"):
        _fail("--device", f"calibrate measures the device here: cpu or cuda, not '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device", "cuda is not available on this machine")
    try:
        sp = load_space(space)
        size = sp.template.parts["input"]["size"]
        target = LatencyTarget(device=device, dtype=dtype, batch_size=batch_size, threads=threads, input_size=size,
                               deploy=deploy)
        with progress_bar() as bar:
            tasks: dict[str, Any] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done, total=total)

            op_graphs = [p.graph for p in sample(sp, ops_archs, seed=seed).points]
            fit_graphs = [p.graph for p in sample(sp, fit_archs, seed=seed + 1).points]
            profile = calibrate_space(sp.name, op_graphs, fit_graphs, target, out, name=name or out.stem,
                                      seeds=(seed, seed + 1), passes=passes, model_seconds=model_seconds,
                                      resume=resume, progress=progress)
    except MetaformerLabError as err:
        exit_with(err)
    console.print(f"wrote {out}: {len(profile.ops)} ops, correction fitted on {profile.fit['archs']} networks "
                  f"(in-sample MAPE {profile.fit['mape']:.1%}); check it with `metaformer-lab latency evaluate "
                  f"--profile {out} --space {space} --seed {seed + 100}`")


def _calibrate_from_table(table: Path, device: str, dtype: str, out: Path | None, name: str | None,
                          source: str | None, date: str | None, prior_weight: float | None) -> None:
    from metaformer_lab.latency.gpu import gpu_spec
    from metaformer_lab.latency.gpu_calibrate import calibrate_from_table

    check_output_file("--out", out)
    try:
        if device in ("cpu", "cuda") or device.startswith("cuda:"):
            _fail("--device", f"with --from-table, name the GPU the table was measured on (rtx5090, h100, ...), "
                              f"not '{device}'")
        gpu = gpu_spec(device).name
        target = out or Path(f"gpu-{gpu}-{dtype}.json")
        bar = progress_bar()
        tasks: list[Any] = []

        def progress(done: int, total: int) -> None:  # the bar starts once the table has been read and mapped
            if not tasks:
                bar.start()
                tasks.append(bar.add_task("kernel records (meta device)", total=total))
            bar.update(tasks[0], completed=done)

        try:
            fitted = calibrate_from_table(table, gpu, dtype=dtype, name=name or (out.stem if out else None),
                                          source=source, date=date, progress=progress, prior_weight=prior_weight)
        finally:
            bar.stop()
    except MetaformerLabError as err:
        exit_with(err)
    profile = fitted.profile
    with writing("--out"):
        profile.save(target)
    skipped = profile.skipped
    console.print(f"{table}: {len(fitted.points)} rows used, {skipped['count']} skipped "
                  f"({len(skipped['no_zoo_model'])} models not in the zoo; listed in the profile)")
    for s in skipped["not_expressible"]:
        console.print(f"  skipped line {s['line']}: {s['reason']}")
    e = profile.efficiency
    shares, spread = profile.fit["governed_share"], profile.fit["spread_at_1pct_noise"]
    console.print("  factor (share of the fitted time, ± how well the table determines it at 1 % noise per row):")
    for kind, factors in (("compute", e.compute), ("memory", e.memory)):
        fitted = [f"{c} {v:.2f} ({shares[f'{kind}.{c}']:.0%}, ±{spread[f'{kind}.{c}']:.0%})"
                  for c, v in sorted(factors.items()) if f"{kind}.{c}" in shares]
        console.print(f"    {kind} efficiency: " + ", ".join(fitted))
    console.print(f"    launch overhead: {e.launch_us:.2f} us per kernel ({shares['launch']:.0%}, "
                  f"±{spread['launch']:.0%})")
    for key, what in (("in_sample", "in-sample"), ("leave_one_family_out", "leave-one-family-out")):
        m = profile.fit[key]
        console.print(f"  {what:21s} MAPE {m['mape']:.2%}  Spearman {m.get('spearman', float('nan')):.3f}  "
                      f"median ratio {m['median_ratio']:.3f}  (n={m['n']})")
    console.print(f"wrote {target}: {profile.efficiency.label}")


@latency_app.command("evaluate")
def evaluate(
    profile: Annotated[str, typer.Option(help="A profile file or a shipped profile's name.")],
    space: Annotated[str, typer.Option(help="The space to sample architectures from.")],
    n: Annotated[int, typer.Option(min=2, help="Architectures to measure and predict.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the draw (not one the calibration used).")] = 100,
    plot: Annotated[Path | None, typer.Option(help="Scatter plot PNG (default: next to the profile).")] = None,
    record: Annotated[bool, typer.Option("--record", help="Store the report in the profile file.")] = False,
    host_check: HostCheckOpt = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure and predict sampled architectures; print the share within ±5 % and ±10 %, MAPE and
    Spearman rank correlation, and plot predicted against measured.

    Example: metaformer-lab latency evaluate --profile cpu-tiny-1t --space tiny --n 200 --seed 100
    """
    from metaformer_lab.latency.evaluate import evaluate as run_evaluate
    from metaformer_lab.latency.evaluate import scatter_plot
    from metaformer_lab.latency.profile import resolve_profile
    from metaformer_lab.space import load_space, sample

    try:
        prof = resolve_profile(profile)
        sp = load_space(space)
        used = prof.fit.get("calibration", {})
        if used.get("space") == sp.name and seed in used.get("seeds", []):
            _fail("--seed", f"seed {seed} drew the architectures profile '{prof.name}' was calibrated on; "
                            f"evaluate on others (not {', '.join(map(str, used['seeds']))})")
        size = sp.template.parts["input"]["size"]
        want = (size, size) if isinstance(size, int) else tuple(size)
        have = prof.target.input_size
        if have is not None and have != want:
            _fail("--space", f"space '{sp.name}' is {want[0]}x{want[1]}; profile '{prof.name}' was measured at "
                             f"{have[0]}x{have[1]}")
        graphs = [p.graph for p in sample(sp, n, seed=seed).points]
        host_line = None
        if host_check and prof.target.kind == "cpu":
            from metaformer_lab.latency.host import HOST_SEED, fit_to_host

            if seed == HOST_SEED:
                _fail("--seed", f"seed {seed} draws the host check's networks; evaluate on others")
            prof, _, host_line = fit_to_host(prof, sp)
        with progress_bar() as bar:
            task = bar.add_task(f"measuring {n} networks", total=n)
            report = run_evaluate(prof, graphs, progress=lambda done, total: bar.update(task, completed=done),
                                  context={"space": sp.name, "seed": seed, "host_scale": prof.host_scale})
    except MetaformerLabError as err:
        exit_with(err)
    target = plot or (prof.path.with_suffix(".png") if prof.path is not None else Path(f"{prof.name}.png"))
    scatter_plot(report, target)
    summary = report.to_json()
    if host_line:
        summary["host_line"] = host_line
    if record and prof.path is not None:
        prof.accuracy = summary
        prof.save(prof.path)
    if as_json:
        typer.echo(json.dumps({**summary, "plot": str(target)}, indent=1))
        return
    if host_line:
        console.print(host_line)
    console.print(f"profile '{prof.name}' ({prof.target.describe()}) on {n} '{sp.name}' networks, seed {seed}:")
    console.print(f"  within ±5 %: {report.within_5:.1%}   within ±10 %: {report.within_10:.1%}   "
                  f"MAPE: {report.mape:.2%}   Spearman: {report.spearman:.3f}   max error: {report.max_abs_error:.1%}")
    if report.noisy:
        console.print(f"  [red]{report.noisy} measurement(s) flagged noisy[/red] (see the plot's crosses)")
    console.print(f"  scatter plot: {target}")


@latency_app.command("profiles")
def profiles(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the shipped latency profiles with their provenance and measured accuracy.

    Example: metaformer-lab latency profiles --json
    """
    from metaformer_lab.latency.gpu_calibrate import shipped_gpu_profiles
    from metaformer_lab.latency.profile import shipped_profiles

    found = shipped_profiles()
    gpu_found = shipped_gpu_profiles()
    if as_json:
        typer.echo(json.dumps([{"kind": "cpu", **p.summary()} for p in found] + [p.summary() for p in gpu_found],
                              indent=1))
        return
    table = Table("profile", "setting", "device", "torch", "created", "ops", "within ±10 %", "MAPE", "Spearman")
    for p in found:
        acc = p.accuracy or {}
        s = p.settings
        table.add_row(p.name, p.target.describe(), str(s.get("device_name", "")), str(s.get("torch", "")),
                      str(s.get("created", ""))[:10], str(len(p.ops)),
                      f"{acc['within_10']:.1%} (n={acc['n']})" if acc else "not evaluated",
                      f"{acc['mape']:.2%}" if acc else "", f"{acc['spearman']:.3f}" if acc else "")
    console.print(table)
    if gpu_found:
        console.print(_gpu_profiles_table(gpu_found))


def _gpu_profiles_table(found: Any) -> Table:
    def err(m: dict[str, Any] | None) -> str:
        if not m:
            return ""
        return f"{m['mape']:.1%} / {m.get('spearman', float('nan')):.3f} / {m['median_ratio']:.2f}"

    table = Table("GPU profile", "GPU", "fitted on", "rows", "batch", "in-sample", "leave-one-family-out",
                  "leave-one-GPU-out", title="GPU profiles (MAPE / Spearman / median estimate:measured)")
    for p in found:
        s = p.summary()
        logo = s["leave_one_gpu_out"]
        table.add_row(p.name, p.gpu or "any (datasheet)", ", ".join(s["fitted_on"]), str(s["rows"]),
                      "-".join(map(str, s["batch_range"])) if s["batch_range"] else "", err(s["in_sample"]),
                      err(s["leave_one_family_out"]), err(logo))
    return table
