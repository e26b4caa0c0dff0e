"""What every command group shares: the app, the console, argument types, error exits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metaformer_lab import __version__
from metaformer_lab.core.errors import MetaformerLabError

app = typer.Typer(
    name="metaformer-lab",
    help="Vision architectures as declarative YAML: validate, inspect, build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(width=None if sys.stdout.isatty() else 160)  # piped output keeps whole table rows
progress_console = Console(stderr=True)  # progress bars never mix with what a command prints (--json)

SpecArg = Annotated[str, typer.Argument(metavar="SPEC", help="A YAML file or a zoo model name.")]
BlockDirs = Annotated[list[Path], typer.Option("--block-dir", help="Extra folder of named block YAMLs.")]


def output_file(path: Path | None) -> Path | None:
    """An output path whose folder exists (a usage error otherwise, before any work is done)."""
    if path is not None and not path.parent.is_dir():
        raise typer.BadParameter(f"folder {path.parent} does not exist")
    return path


def progress_bar() -> Progress:
    """The bar of long commands (calibrate, evaluate, search), on stderr."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=progress_console, transient=False)


def exit_with(err: MetaformerLabError) -> NoReturn:
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


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


