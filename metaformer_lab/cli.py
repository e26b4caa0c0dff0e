"""The command line: the only place that parses argv, prints and exits.

Exit codes: 0 success; 1 invalid input (one ``path: message`` line per problem on stderr, no
traceback); 2 usage errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from metaformer_lab import __version__
from metaformer_lab.api import load_spec, to_graph
from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.spec.arch import ArchSpec

app = typer.Typer(
    name="metaformer-lab",
    help="Vision architectures as declarative YAML: validate, inspect, build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(width=None if sys.stdout.isatty() else 160)  # piped output keeps whole table rows

SpecArg = Annotated[str, typer.Argument(metavar="SPEC", help="A YAML file or a zoo model name.")]
BlockDirs = Annotated[list[Path], typer.Option("--block-dir", help="Extra folder of named block YAMLs.")]


def _output_file(path: Path | None) -> Path | None:
    """An output path whose folder exists (a usage error otherwise, before any work is done)."""
    if path is not None and not path.parent.is_dir():
        raise typer.BadParameter(f"folder {path.parent} does not exist")
    return path


def _exit_with(err: MetaformerLabError) -> NoReturn:
    for issue in err.issues:
        typer.echo(str(issue), err=True)  # plain text, no markup
    raise typer.Exit(code=1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metaformer-lab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")]
    = False,
) -> None:
    """Vision architectures as declarative YAML: validate, inspect, build."""


@app.command()
def validate(spec: SpecArg, block_dir: BlockDirs = []) -> None:  # noqa: B006 - typer reads the default
    """Check a spec: exit 0 when valid, else 1 with one `path: message` line per problem."""
    try:
        arch = load_spec(spec, block_dirs=block_dir)
    except MetaformerLabError as err:
        _exit_with(err)
    typer.echo(f"{spec}: valid ({arch.name}, {len(arch.stages)} stages, {arch.num_blocks} blocks)")


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.",
                                                     callback=_output_file)] = None,
) -> None:
    """Print the JSON Schema of the spec (point your editor's YAML plugin at it)."""
    text = json.dumps(ArchSpec.model_json_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


@app.command()
def build(
    spec: SpecArg,
    input_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Square input size (overrides the spec).")]
    = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Batch size of the test forward.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    block_dir: BlockDirs = [],  # noqa: B006
) -> None:
    """Build the PyTorch module: params, FLOPs, activation memory, output shape, per-stage table."""
    from metaformer_lab.summary import summarize

    try:
        graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
    except MetaformerLabError as err:
        _exit_with(err)
    with console.status(f"building {graph.spec.name} and running one forward pass", spinner="dots"):
        summary = summarize(graph, batch_size)
    if as_json:
        typer.echo(json.dumps(summary.to_json()))
        return
    table = Table(title=f"{summary.name}: {graph.input_type} -> {graph.output_type}", title_justify="left")
    for column in ("part", "output", "params", "FLOPs", "activations"):
        table.add_column(column, justify="left" if column in ("part", "output") else "right")
    for part in summary.parts:
        table.add_row(part.name, part.output, f"{part.params:,}", _human(part.flops),
                      _human(part.activation_bytes, "B"))
    console.print(table)
    console.print(
        f"params [bold]{summary.params:,}[/] ({summary.trainable_params:,} trainable)   "
        f"FLOPs [bold]{_human(summary.flops)}[/] at batch {summary.batch_size}   "
        f"activations {_human(summary.activation_bytes, 'B')}   "
        f"input {tuple(summary.input_shape)} -> output {tuple(summary.output_shape)}"
    )


@app.command()
def graph(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="DOT file, or a picture when it ends in .png/.svg/.pdf.",
                                                callback=_output_file)],
    input_size: Annotated[int | None, typer.Option(min=1, max=4096)] = None,
    block_dir: BlockDirs = [],  # noqa: B006
) -> None:
    """Write the typed graph: every op with its spec path, every edge with its tensor type."""
    from metaformer_lab.graph.render import write_graph

    try:
        arch_graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
    except MetaformerLabError as err:
        _exit_with(err)
    write_graph(arch_graph, out)
    typer.echo(f"{out}: {arch_graph.number_of_nodes()} ops, {arch_graph.number_of_edges()} typed edges")


@app.command()
def export(
    spec: SpecArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx or pt2 (torch.export).", case_sensitive=False)],
    out: Annotated[Path, typer.Option("--out", help="File to write.", callback=_output_file)],
    input_size: Annotated[int | None, typer.Option(min=1, max=4096)] = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="Fix the batch size (default: dynamic).")]
    = False,
    atol: Annotated[float, typer.Option(min=0.0, help="Largest |exported - eager| accepted.")] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    block_dir: BlockDirs = [],  # noqa: B006
) -> None:
    """Export to ONNX or .pt2; succeeds only when the exported outputs match eager ones."""
    from metaformer_lab.export import export as run_export

    if fmt.lower() not in ("onnx", "pt2"):
        raise typer.BadParameter(f"'{fmt}' is not one of onnx, pt2", param_hint="--format")
    try:
        graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
        with console.status(f"exporting {graph.spec.name} to {fmt.lower()} and checking it", spinner="dots"):
            result = run_export(graph, fmt.lower(), out, dynamic_batch=not static_batch, atol=atol)  # type: ignore[arg-type]
    except MetaformerLabError as err:
        _exit_with(err)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    console.print(f"{out}: {result.bytes:,} bytes, max |exported - eager| = {result.max_abs_diff:.3g} "
                  f"(checked with {result.checked_with}; batch {'static' if static_batch else 'dynamic'})")


zoo_app = typer.Typer(help="Known models: timm architectures reproduced exactly (fixed points).",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every zoo model: family, token mixers, params, GFLOPs at its input size, fixed-point status."""
    from rich.progress import track

    from metaformer_lab.zoo.report import model_rows

    try:
        names = _zoo_names(family)
        rows = model_rows(track(names, description="sizing the zoo", console=console, transient=True)
                          if not as_json else names)
    except MetaformerLabError as err:
        _exit_with(err)
    if as_json:
        typer.echo(json.dumps([row.to_json() for row in rows]))
        return
    table = Table(title=f"metaformer-lab zoo: {len(rows)} models", title_justify="left")
    for column in ("name", "family", "token mixers", "params", "GFLOPs", "input", "fixed point"):
        table.add_column(column, justify="right" if column in ("params", "GFLOPs", "input") else "left",
                         no_wrap=column != "token mixers", min_width=20 if column == "name" else None)
    for row in rows:
        table.add_row(row.name, row.family, ", ".join(row.token_mixers), f"{row.params:,}", f"{row.gflops:.3f}",
                      str(row.input_size), row.status)
    console.print(table)


def _zoo_names(family: str | None) -> list[str]:
    from metaformer_lab.core.errors import SpecError
    from metaformer_lab.zoo import catalog, list_models

    names = list_models(family)
    if family is not None and not names:
        families = sorted({m.family for m in catalog().values()})
        raise SpecError.single("--family", f"unknown family '{family}'; one of: {', '.join(families)}")
    return names


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="A zoo model name.")]) -> None:
    """Print a zoo model's YAML."""
    from metaformer_lab.spec.load import zoo_dir
    from metaformer_lab.zoo import get

    try:
        get(name)
    except MetaformerLabError as err:
        _exit_with(err)
    typer.echo((zoo_dir() / f"{name}.yaml").read_text(), nl=False)


@zoo_app.command("check")
def zoo_check(
    names: Annotated[list[str] | None, typer.Argument(help="Zoo model names.", show_default=False)] = None,
    check_all: Annotated[bool, typer.Option("--all", help="Check every zoo model.")] = False,
    record: Annotated[Path | None, typer.Option(help="Write the results (with provenance) to this JSON file.",
                                                        callback=_output_file)]
    = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the fixed-point protocol against the installed timm: params, keys loaded, max |Δlogit|."""
    from rich.progress import Progress

    from metaformer_lab.core.errors import Issue, SpecError
    from metaformer_lab.zoo import check, get, list_models
    from metaformer_lab.zoo.report import write_record

    if check_all == bool(names):
        raise typer.BadParameter("give model names or --all (not both)")
    targets = list_models() if check_all else list(names or [])
    unknown: list[Issue] = []
    for name in targets:
        try:
            get(name)
        except SpecError as err:
            unknown.extend(err.issues)
    if unknown:
        _exit_with(SpecError(unknown))
    results, failures = [], []
    with Progress(console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("checking", total=len(targets))
        for name in targets:
            progress.update(task, description=f"checking {name}")
            try:
                results.append(check(name))
            except MetaformerLabError as err:
                failures.append((name, err))
            progress.advance(task)
    if record is not None:
        write_record(results, failures, record)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in results] +
                              [{"name": n, "passed": False, "error": str(e)} for n, e in failures]))
    else:
        _print_checks(results, failures)
    if failures or not all(r.passed for r in results):
        raise typer.Exit(code=1)


def _print_checks(results: list, failures: list) -> None:  # type: ignore[type-arg]
    table = Table(title="fixed-point protocol (timm weights + N(0, .02) noise, batch 2, eval)", title_justify="left")
    for column in ("model", "params (= timm)", "keys", "max |Δlogit|", "back to timm", "passed"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True,
                         min_width=20 if column == "model" else None)
    for r in results:
        params = f"{r.params:,}" if r.params == r.timm_params else f"{r.params:,} != {r.timm_params:,}"
        table.add_row(r.name, params, str(r.keys_loaded), f"{r.max_abs_diff:.2e}", "yes" if r.round_trip else "NO",
                      "[green]yes[/]" if r.passed else "[red]NO[/]")
    for name, err in failures:
        table.add_row(name, "-", "-", "-", "-", f"[red]{err.issues[0]}[/]")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
