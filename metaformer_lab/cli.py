"""The command line: the only place that parses argv, prints and exits.

Exit codes: 0 success; 1 invalid input (one ``path: message`` line per problem on stderr, no
traceback); 2 usage errors.
"""

from __future__ import annotations

import json
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
console = Console()

SpecArg = Annotated[str, typer.Argument(metavar="SPEC", help="A YAML file or a zoo model name.")]
BlockDirs = Annotated[list[Path], typer.Option("--block-dir", help="Extra folder of named block YAMLs.")]


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
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
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
        graph = to_graph(load_spec(spec, block_dirs=block_dir), input_size=input_size)
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
    out: Annotated[Path, typer.Option("--out", help="DOT file, or a picture when it ends in .png/.svg/.pdf.")],
    input_size: Annotated[int | None, typer.Option(min=1, max=4096)] = None,
    block_dir: BlockDirs = [],  # noqa: B006
) -> None:
    """Write the typed graph: every op with its spec path, every edge with its tensor type."""
    from metaformer_lab.graph.render import write_graph

    try:
        arch_graph = to_graph(load_spec(spec, block_dirs=block_dir), input_size=input_size)
    except MetaformerLabError as err:
        _exit_with(err)
    write_graph(arch_graph, out)
    typer.echo(f"{out}: {arch_graph.number_of_nodes()} ops, {arch_graph.number_of_edges()} typed edges")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
