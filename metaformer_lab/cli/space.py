"""Search-space commands: show, size, sample, contains."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from metaformer_lab.cli.common import SpecArg, app, console, exit_with, progress_console
from metaformer_lab.core.errors import MetaformerLabError, SpaceError

space_app = typer.Typer(help="Search spaces: declared, typed spaces of architectures.\n\n"
                             "Example: metaformer-lab space size tiny", no_args_is_help=True)
app.add_typer(space_app, name="space")

SpaceArg = Annotated[str, typer.Argument(metavar="SPACE", help="A space YAML file or a shipped space name (tiny, "
                                                               "metaformer).")]
Seed = Annotated[int, typer.Option(help="Seed of the random draws.")]


def _load(space: str) -> Any:
    from metaformer_lab.space import load_space

    try:
        return load_space(space)
    except MetaformerLabError as err:
        exit_with(err)


def _tree(node: Any, into: Tree) -> None:
    for child in node.children:
        _tree(child, into.add(Text(child.label)))


@space_app.command("show")
def show(space: SpaceArg) -> None:
    """Print the space's choices as a tree (options indented under the choice that offers them).

    Example: metaformer-lab space show tiny
    """
    from metaformer_lab.space import show_tree

    root = show_tree(_load(space))
    tree = Tree(Text(root.label, style="bold"))
    _tree(root, tree)
    console.print(tree)


def _power(n: int) -> str:
    return f"10^{math.log10(n):.1f}" if n > 0 else "0"


_GRID = re.compile(r"\b[0-9]+x[0-9]+\b")
_NUMBER = re.compile(r"(?<![\[])\b[0-9]+(?:[.][0-9]+)?(?:e-?[0-9]+)?")  # not indices such as stages[2]


def _grouped(reasons: dict[str, int]) -> list[tuple[str, int]]:
    """Invalidity reasons with their numbers folded (``head_dim: N does not divide dim N``)."""
    out: dict[str, int] = {}
    for reason, count in reasons.items():
        path, _, message = reason.partition(": ")
        message = _NUMBER.sub("N", _GRID.sub("NxN", message))
        key = f"{path}: {message}"
        out[key] = out.get(key, 0) + count
    return sorted(out.items(), key=lambda kv: -kv[1])


@space_app.command("size")
def size(
    space: SpaceArg,
    samples: Annotated[int, typer.Option(min=1, max=100_000, help="Random points drawn to estimate the valid share.")]
    = 500,
    seed: Seed = 0,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Processes drawing points (default: one per CPU this process may use; the result is the same "
                    "for any number).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Count the points of a space (exact) and estimate the share of valid ones by sampling.

    Example: metaformer-lab space size tiny --samples 1000
    """
    from metaformer_lab.space import continuous, count_points, valid_share

    loaded = _load(space)
    points = count_points(loaded)
    workers = processes or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # no refresh thread: the draws fork, and a child should not start with a lock another thread holds
    with Progress(console=progress_console, transient=True, disable=as_json, auto_refresh=False) as progress:
        task = progress.add_task("drawing points", total=samples)
        shown = [time.monotonic()]

        def drawn(k: int) -> None:  # redrawn ten times a second, as the refresh thread would
            now = time.monotonic()
            refresh = now - shown[0] >= 0.1 or k == samples
            if refresh:
                shown[0] = now
            progress.update(task, completed=k, refresh=refresh)

        validity = valid_share(loaded, samples, seed, progress=drawn, processes=workers)
    if as_json:
        typer.echo(json.dumps({"space": loaded.name, "points": points, "continuous": continuous(loaded),
                               "drawn": validity.drawn, "valid": validity.valid, "valid_share": validity.share,
                               "valid_share_95": [validity.low, validity.high],
                               "invalid_reasons": dict(_grouped(validity.reasons))}))
        return
    if points is None:
        console.print(f"[bold]{loaded.name}[/]: infinitely many points (continuous: {', '.join(continuous(loaded))})")
    else:
        console.print(f"[bold]{loaded.name}[/]: {points:,} points ({_power(points)})")
    console.print(f"valid: {validity.valid} of {validity.drawn} random points = {validity.share:.1%} "
                  f"(95% interval {validity.low:.1%} - {validity.high:.1%})"
                  + (f", about {_power(int(points * validity.share))} valid architectures" if points else ""))
    if validity.reasons:
        table = Table(title="why drawn points were invalid", title_justify="left")
        table.add_column("count", justify="right")
        table.add_column("reason")
        for reason, count in _grouped(validity.reasons)[:12]:
            table.add_row(str(count), reason)
        console.print(table)


@space_app.command("sample")
def sample(
    space: SpaceArg,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the spec YAMLs (created if missing).")],
    n: Annotated[int, typer.Option("--n", min=1, max=10_000, help="How many distinct valid specs.")] = 5,
    seed: Seed = 0,
) -> None:
    """Write N distinct valid spec YAMLs drawn at random (invalid draws are redrawn and counted).

    Example: metaformer-lab space sample tiny --n 20 --seed 1 --out samples/
    """
    from metaformer_lab.api import dump_spec
    from metaformer_lab.space import sample as draw

    loaded = _load(space)
    if out.exists() and not out.is_dir():
        exit_with(SpaceError.single("--out", f"{out} exists and is not a folder"))
    try:
        with Progress(console=progress_console, transient=True) as progress:
            task = progress.add_task("sampling", total=n)
            result = draw(loaded, n, seed, progress=lambda k: progress.update(task, completed=k))
    except MetaformerLabError as err:
        exit_with(err)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for point in result.points:
            (out / f"{point.spec.name}.yaml").write_text(dump_spec(point.spec))
    except OSError as err:
        exit_with(SpaceError.single("--out", f"cannot write to {out} ({err.strerror or err})"))
    console.print(f"{out}: {len(result.points)} specs from {loaded.name} (seed {seed}); redrew {result.invalid} "
                  f"invalid and {result.duplicates} repeated draw(s)")


@space_app.command("contains")
def contains(
    space: SpaceArg,
    spec: SpecArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the assignment as JSON.")] = False,
) -> None:
    """Print the assignment that decodes exactly to SPEC (a zoo name or a file), or which choice excludes it.

    Example: metaformer-lab space contains search_spaces/metaformer.yaml poolformer_s12
    """
    import yaml

    from metaformer_lab.api import load_spec
    from metaformer_lab.space import contains as find

    loaded = _load(space)
    try:
        target = load_spec(spec)
    except MetaformerLabError as err:
        exit_with(err)
    found = find(loaded, target)
    if not found.found:
        typer.echo(f"{found.path or spec}: {found.reason}", err=True)
        raise typer.Exit(code=1)
    if as_json:
        typer.echo(json.dumps(found.params))
        return
    typer.echo(f"# {target.name} is a point of {loaded.name}; its assignment (a reference entry):")
    typer.echo(yaml.safe_dump({target.name: dict(found.params or {})}, sort_keys=False, width=200), nl=False)
