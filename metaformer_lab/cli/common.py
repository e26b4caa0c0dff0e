"""What every command group shares: the app, the console, argument types, error exits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperArgument, TyperGroup, TyperOption

from metaformer_lab import __version__
from metaformer_lab.core.errors import MetaformerLabError


class _LabelledOption(TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:  # ctx: the click Context typer vendors
        return value_label(self)


class _LabelledArgument(TyperArgument):
    @property
    def display_name_raw(self) -> str:
        return argument_name(self)

    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the argument's name (SPEC, SPACE) is its label

    def _usage_display_name(self) -> str:
        name = argument_name(self)
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


def argument_name(param: TyperArgument) -> str:
    """An argument as help and usage show it: its metavar, else its name in capitals (``NAMES``)."""
    return param.metavar or (param.name or "").upper()


def value_label(param: TyperOption) -> str | None:
    """What an option's help shows after its name, as click programs do: nothing for a flag, its metavar when
    it has one (``DIR``, ``SIZE``), else ``[a|b]`` for choices, ``INTEGER``, ``FLOAT``, ``FILE`` or ``TEXT``."""
    if param.is_flag or param.count:
        return None
    label = param.metavar
    if label is None:
        kind = param.type_descriptor
        if kind.is_choice:
            label = "[" + "|".join(str(c) for c in kind.choices or ()) + "]"
        else:
            element = get_args(kind.annotation)[0] if kind.is_list else kind.annotation
            label = _LABELS.get(element, "FILE" if kind.is_path else "TEXT")
    return label + ("..." if param.nargs != 1 else "")


_LABELS: dict[Any, str] = {int: "INTEGER", float: "FLOAT", str: "TEXT"}


class _LabelledGroup(TyperGroup):
    """The root group: before anything is parsed or shown, every command's options and arguments (its help
    option too) take the labels above, instead of typer's ``<bool>``, ``<str>``, ``<int range>`` and ``{SPEC}``."""

    def get_params(self, ctx: Any) -> list[Any]:
        _relabel(self, ctx)
        return super().get_params(ctx)


def _relabel(command: Any, ctx: Any) -> None:
    for param in [*command.params, command.get_help_option(ctx)]:
        if type(param) is TyperOption:
            param.__class__ = _LabelledOption  # display methods only; parsing is the parent class's
        elif type(param) is TyperArgument:
            param.__class__ = _LabelledArgument
    for sub in getattr(command, "commands", {}).values():
        _relabel(sub, ctx)


app = typer.Typer(
    cls=_LabelledGroup,
    name="metaformer-lab",
    help="Vision architectures as declarative YAML: validate, inspect, build.\n\n"
         "Example: metaformer-lab build caformer_s18 --input-size 224",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(width=None if sys.stdout.isatty() else 160)  # piped output keeps whole table rows
progress_console = Console(stderr=True)  # progress bars never mix with what a command prints (--json)

SpecArg = Annotated[str, typer.Argument(metavar="SPEC", help="A YAML file or a zoo model name.")]


def fail(path: str, message: str) -> NoReturn:
    """One ``path: message`` line on stderr, exit 1 (bad input, never a traceback)."""
    exit_with(MetaformerLabError.single(path, message))


def input_folders(param: typer.CallbackParam, folders: list[Path] | None) -> list[Path] | None:
    """Folders given as input (``--block-dir``) must exist: one line and exit 1 otherwise."""
    for folder in folders or []:
        if not folder.is_dir():
            fail(_option(param), f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    return folders


BlockDirs = Annotated[list[Path], typer.Option("--block-dir", metavar="DIR", help="Extra folder of named block YAMLs.",
                                               callback=input_folders)]

BUILD_SHARE = 0.5
"""Default share of the memory available now that building and running one network may take."""

MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", metavar="SIZE", envvar="MFL_MAX_MEMORY",
    help="Refuse a spec whose parameters and activations need more than this (e.g. 8GB); default: half of the "
         "memory available now.")]

Deploy = Annotated[bool, typer.Option("--deploy", help="The deploy form: BatchNorms, norm affines and layer scales "
                                                         "folded into the neighbouring weights (same outputs, eval).")]


def oversized(graph: Any, batch_size: int, max_memory: str | None, device: str = "cpu", *,
              cheap_first: bool = False) -> tuple[str, str] | None:
    """``(part, message)`` for a network whose estimated memory (:func:`metaformer_lab.graph.cost.memory_need`)
    exceeds the limit (``max_memory``, else half of what is available now), naming the part that dominates;
    None when it fits. ``cheap_first``: skip the estimate (seconds: it imports timm) when the network's
    :func:`~metaformer_lab.graph.cost.dense_scale_bytes` is under 1 % of the limit."""
    from metaformer_lab.core.sizes import available_bytes, format_bytes, parse_bytes
    from metaformer_lab.graph.cost import dense_scale_bytes, memory_need

    try:
        limit = parse_bytes(max_memory) if max_memory else int(BUILD_SHARE * available_bytes(device))
    except ValueError as err:
        fail("--max-memory", str(err))
    if cheap_first and dense_scale_bytes(graph) * 100 < limit:
        return None
    need = memory_need(graph, batch_size)
    if need.total_bytes <= limit:
        return None
    why = (f"--max-memory {max_memory}" if max_memory else
           "half of the memory available now; --max-memory or MFL_MAX_MEMORY sets it")
    part, part_bytes = need.dominant
    return part, (f"the network needs about {format_bytes(need.total_bytes)} to build and run "
                  f"({format_bytes(need.params_bytes)} of parameters), more than the {format_bytes(limit)} allowed "
                  f"({why}); {part} alone needs {format_bytes(part_bytes)}")


def refuse_oversized(graph: Any, batch_size: int, max_memory: str | None, device: str = "cpu") -> None:
    """Before any tensor exists: one ``path: message`` line naming the part that dominates, and exit 1, for a
    network too large for the machine (:func:`oversized`)."""
    found = oversized(graph, batch_size, max_memory, device)
    if found is not None:
        fail(*found)


def check_output_file(option: str, path: Path) -> Path:
    """A file path to write: not a folder, in a folder that exists and can be written (one ``option: message``
    line and exit 1 otherwise, before any work is done)."""
    if path.is_dir():
        fail(option, f"{path} is a folder; give the name of a file to write")
    if not path.parent.is_dir():
        fail(option, f"folder {path.parent} does not exist")
    existed = path.exists()
    try:  # the file system decides (permissions, read-only mounts, root): open it for appending, touching nothing
        with open(path, "a"):
            pass
    except OSError as err:
        fail(option, f"cannot write {path}: {err.strerror or err}")
    if not existed:
        path.unlink(missing_ok=True)
    return path


def output_file(param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Typer callback of a file option: :func:`check_output_file`."""
    return None if path is None else check_output_file(_option(param), path)


def _option(param: typer.CallbackParam) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


@contextmanager
def writing(option: str) -> Iterator[None]:
    """Turn an OSError while writing an output into one ``option: message`` line (a full disk, a file system
    that refuses the file) instead of a traceback."""
    try:
        yield
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        fail(option, f"cannot write{where}: {err.strerror or err}")


def progress_bar() -> Progress:
    """The bar of long commands (calibrate, evaluate, search), on stderr."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=progress_console, transient=False)


def exit_with(err: MetaformerLabError) -> NoReturn:
    for issue in err.issues:
        typer.echo(str(issue), err=True)  # plain text, no markup
    raise typer.Exit(code=1)


def _version(value: bool) -> None:
    """The version, and those of the libraries results depend on (read from their metadata: nothing imported)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(f"metaformer-lab {__version__} (torch {of('torch')}, timm {of('timm')}, optuna {of('optuna')}, "
                   f"python {sys.version.split()[0]})")
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


