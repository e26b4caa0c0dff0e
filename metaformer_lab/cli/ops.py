"""``metaformer-lab ops``: the block library, read from its registries (the README's op table too)."""

from __future__ import annotations

import difflib
import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from metaformer_lab.cli.common import app, console, exit_with


@app.command("ops")
def ops(
    which: Annotated[str | None, typer.Argument(
        metavar="ROLE|TYPE", help="A role (token_mixer, norm, ...), or an op type to show its fields.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Every listed op with its fields, as JSON.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="The README's op table.")] = False,
) -> None:
    """Every op a spec can name: role, type and what it is; with a TYPE, its fields and defaults.

    Examples: metaformer-lab ops token_mixer; metaformer-lab ops window_attention
    """
    from metaformer_lab.core.errors import SpecError
    from metaformer_lab.ops import REGISTRIES
    from metaformer_lab.spec.library import markdown_table, op_rows

    if markdown:
        typer.echo(markdown_table(), nl=False)
        return
    rows = op_rows()
    if which is not None:
        role = which.replace("-", "_").replace(" ", "_")
        rows = [r for r in rows if r.role == role] or [r for r in rows if r.tag == which]
        if not rows:
            known = sorted(REGISTRIES) + sorted({r.tag for r in op_rows()})
            close = difflib.get_close_matches(which, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; roles: {', '.join(sorted(REGISTRIES))}"
            exit_with(SpecError.single("ops", f"'{which}' is neither a role nor an op type{hint}"))
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows]))
        return
    if which is not None and all(r.tag == which for r in rows):
        for row in rows:
            title = f"{REGISTRIES[row.role].kind} '{row.tag}': {row.description}"
            table = Table(title=escape(title), title_justify="left")
            for column in ("field", "type", "default", "description"):
                table.add_column(column, overflow="fold")
            for f in row.fields:
                table.add_row(*map(escape, (f.name, f.type, f.default, f.description)))
            console.print(table)
        return
    table = Table(title=f"metaformer-lab ops: {len(rows)}", title_justify="left")
    for column in ("role", "type", "what it is"):
        table.add_column(column, overflow="fold", no_wrap=column != "what it is")
    for row in rows:
        table.add_row(REGISTRIES[row.role].kind, row.tag, escape(row.description))
    console.print(table)
