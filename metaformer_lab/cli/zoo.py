"""Zoo commands: list, show, check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.table import Table

from metaformer_lab.cli.common import app, console, exit_with, fail, output_file, progress_console, writing
from metaformer_lab.core.errors import MetaformerLabError

if TYPE_CHECKING:
    from metaformer_lab.zoo.listing import ModelRow

zoo_app = typer.Typer(help="Known models: timm architectures reproduced exactly (fixed points).\n\n"
                           "Example: metaformer-lab zoo list --family vit", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
    recompute: Annotated[bool, typer.Option("--recompute", help="Size each model from its graph instead of reading "
                                                                "the recorded listing (seconds).")] = False,
    record: Annotated[Path | None, typer.Option(help="Recompute, and write the listing to this JSON file (how "
                                                     "metaformer_lab/zoo/listing.json is made).", callback=output_file)]
    = None,
) -> None:
    """Every zoo model: family, token mixers, params, GFLOPs at its input size, fixed-point status.

    Read from the recorded listing (nothing is built); --recompute sizes the models from their graphs.

    Example: metaformer-lab zoo list --family metaformer
    """
    if record is not None and family is not None:
        raise typer.BadParameter("the listing holds every model; leave out --family", param_hint="--record")
    rows = _size(family, quiet=as_json) if recompute or record is not None else _recorded(family)
    if record is not None:
        from metaformer_lab.zoo.listing import write_listing

        with writing("--record"):
            write_listing(rows, record)
    if as_json:
        typer.echo(json.dumps([row.to_json() for row in rows]))
        return
    table = Table(title=f"metaformer-lab zoo: {len(rows)} models", title_justify="left")
    for column in ("name", "family", "token mixers", "params", "GFLOPs", "input", "checked"):
        table.add_column(column, justify="right" if column in ("params", "GFLOPs", "input") else "left",
                         no_wrap=column != "token mixers", min_width=20 if column == "name" else None)
    for row in rows:
        table.add_row(row.name, row.family, ", ".join(row.token_mixers), f"{row.params:,}", f"{row.gflops:.3f}",
                      str(row.input_size), row.status)
    console.print(table)


def _recorded(family: str | None) -> list[ModelRow]:
    from metaformer_lab.zoo.listing import recorded_rows

    rows = recorded_rows()
    chosen = [row for row in rows if family is None or row.family == family]
    if not chosen:
        _unknown_family(family, {row.family for row in rows})
    return chosen


def _size(family: str | None, quiet: bool) -> list[ModelRow]:
    """The rows computed from the graphs (every catalog model of ``family``), with a progress bar unless quiet."""
    from rich.progress import track

    from metaformer_lab.zoo import catalog, list_models
    from metaformer_lab.zoo.listing import size_models

    try:
        names = list_models(family)
        if not names:
            _unknown_family(family, {model.family for model in catalog().values()})
        return size_models(names if quiet else
                           track(names, description="sizing the zoo", console=progress_console, transient=True))
    except MetaformerLabError as err:
        exit_with(err)


def _unknown_family(family: str | None, families: set[str]) -> NoReturn:
    fail("--family", f"unknown family '{family}'; one of: {', '.join(sorted(families))}")


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="A zoo model name.")]) -> None:
    """Print a zoo model's YAML.

    Example: metaformer-lab zoo show caformer_s18 > my_caformer.yaml
    """
    from metaformer_lab.spec.load import zoo_dir
    from metaformer_lab.zoo import get

    try:
        get(name)
    except MetaformerLabError as err:
        exit_with(err)
    typer.echo((zoo_dir() / f"{name}.yaml").read_text(), nl=False)


@zoo_app.command("check")
def zoo_check(
    names: Annotated[list[str] | None, typer.Argument(help="Zoo model names.", show_default=False)] = None,
    check_all: Annotated[bool, typer.Option("--all", help="Check every zoo model.")] = False,
    record: Annotated[Path | None, typer.Option(help="Write the results (with provenance) to this JSON file.",
                                                        callback=output_file)]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """Run the fixed-point protocol against the installed timm: params, keys loaded, max |Δlogit|. A paper model
    (one timm does not have) is checked against its paper instead: params = the authors' code, GMACs = the paper's.

    Example: metaformer-lab zoo check poolformer_s12 deit_tiny_patch16_224 pvt_tiny
    """
    from rich.progress import Progress

    from metaformer_lab.core.errors import Issue, SpecError
    from metaformer_lab.zoo import check, get, list_models
    from metaformer_lab.zoo.papers import check_paper
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
        exit_with(SpecError(unknown))
    results, failures = [], []
    with Progress(console=progress_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("checking", total=len(targets))
        for name in targets:
            progress.update(task, description=f"checking {name}")
            try:
                results.append(check(name) if get(name).fixed_point else check_paper(name))
            except MetaformerLabError as err:
                failures.append((name, err))
            progress.advance(task)
    if record is not None:
        with writing("--record"):
            write_record(results, failures, record)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in results] +
                              [{"name": n, "passed": False, "error": str(e)} for n, e in failures]))
    else:
        _print_checks(results, failures)
    if failures or not all(r.passed for r in results):
        raise typer.Exit(code=1)


def _print_checks(results: list, failures: list) -> None:  # type: ignore[type-arg]
    from metaformer_lab.zoo.papers import PaperResult

    papers = [r for r in results if isinstance(r, PaperResult)]
    results = [r for r in results if not isinstance(r, PaperResult)]
    if papers:
        _print_paper_checks(papers)
        if not results and not failures:
            return
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


def _print_paper_checks(results: list) -> None:  # type: ignore[type-arg]
    table = Table(title=("paper models (params: the authors' code, within 1%; GMACs: the paper's, or the authors' "
                         "code's where the two disagree, within 5%)"),
                  title_justify="left")
    for column in ("model", "arXiv", "params", "authors' code", "GMACs", "paper", "passed"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True,
                         min_width=20 if column == "model" else None)
    for r in results:
        table.add_row(r.name, r.arxiv, f"{r.params:,}", f"{r.authors_params:,} ({r.params_error:+.2%})",
                      f"{r.gmacs:.2f}", f"{r.paper_gmacs:g} ({r.gmacs_error:+.1%})"
                      + (f"; code {r.code_gmacs:g}" if r.code_gmacs else ""),
                      "[green]yes[/]" if r.passed else "[red]NO[/]")
    console.print(table)
