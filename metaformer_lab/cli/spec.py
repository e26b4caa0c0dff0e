"""Spec commands: validate, schema, build, graph, export.

The spec layer and the API are imported inside the commands: they pull in the op library and torch, which
``--help`` (and every other command group) should not wait for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from metaformer_lab.cli.common import (
    BlockDirs,
    Deploy,
    MaxMemory,
    SpecArg,
    app,
    console,
    exit_with,
    human,
    output_file,
    oversized,
    refuse_oversized,
    writing,
)
from metaformer_lab.core.errors import MetaformerLabError


@app.command()
def validate(spec: SpecArg, block_dir: BlockDirs = [],  # noqa: B006 - typer reads the default
             max_memory: MaxMemory = None) -> None:
    """Check a spec: exit 0 when valid, else 1 with one `path: message` line per problem. A valid spec too large
    for the machine (what `build` would refuse, --max-memory) gets a warning, and still exits 0.

    Example: metaformer-lab validate examples/tiny_caformer.yaml
    """
    from metaformer_lab.api import to_graph
    try:
        graph = to_graph(spec, block_dirs=block_dir)  # the checks load_spec makes, lowering once
        arch = graph.spec
        found = oversized(graph, 1, max_memory, cheap_first=True)
    except MetaformerLabError as err:
        exit_with(err)
    typer.echo(f"{spec}: valid ({arch.name}, {len(arch.stages)} stages, {arch.num_blocks} blocks)")
    if found is not None:
        part, message = found
        typer.echo(f"warning: {part}: {message}; build, export and latency refuse it", err=True)


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.",
                                                     callback=output_file)] = None,
) -> None:
    """Print the JSON Schema of the spec (point your editor's YAML plugin at it).

    Example: metaformer-lab schema --out metaformer-lab.schema.json
    """
    from metaformer_lab.spec.arch import ArchSpec

    text = json.dumps(ArchSpec.model_json_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        with writing("--out"):
            out.write_text(text + "\n")


@app.command()
def build(
    spec: SpecArg,
    input_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Square input size (overrides the spec).")]
    = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Batch size of the test forward.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    block_dir: BlockDirs = [],  # noqa: B006
    max_memory: MaxMemory = None,
    deploy: Deploy = False,
) -> None:
    """Build the PyTorch module: params, FLOPs, activation memory, output shape, per-stage table.

    A spec too large for the machine is refused before any tensor exists (--max-memory). With --deploy, the
    totals (params, FLOPs, output) are the deploy form's; the per-part table stays the training form's.
    Example: metaformer-lab build caformer_s18 --input-size 224 --batch-size 8
    """
    from metaformer_lab.api import to_graph
    from metaformer_lab.summary import summarize

    try:
        graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
    except MetaformerLabError as err:
        exit_with(err)
    refuse_oversized(graph, batch_size, max_memory)
    with console.status(f"building {graph.spec.name} and running one forward pass", spinner="dots"):
        summary = summarize(graph, batch_size, deploy=deploy)
    if as_json:
        typer.echo(json.dumps(summary.to_json()))
        return
    form = " (deploy form)" if deploy else ""
    table = Table(title=f"{summary.name}{form}: {graph.input_type} -> {graph.output_type}", title_justify="left")
    for column in ("part", "output", "params", "FLOPs", "activations"):
        table.add_column(column, justify="left" if column in ("part", "output") else "right")
    for part in summary.parts:
        table.add_row(part.name, part.output, f"{part.params:,}", human(part.flops),
                      human(part.activation_bytes, "B"))
    console.print(table)
    console.print(
        f"params [bold]{summary.params:,}[/] ({summary.trainable_params:,} trainable)   "
        f"FLOPs [bold]{human(summary.flops)}[/] at batch {summary.batch_size}   "
        f"activations {human(summary.activation_bytes, 'B')}   "
        f"input {tuple(summary.input_shape)} -> output {tuple(summary.output_shape)}"
    )


@app.command()
def graph(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="DOT file, or a picture when it ends in .png/.svg/.pdf.",
                                                callback=output_file)],
    input_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Square input size (overrides the spec).")]
    = None,
    block_dir: BlockDirs = [],  # noqa: B006
) -> None:
    """Write the typed graph: every op with its spec path, every edge with its tensor type.

    Example: metaformer-lab graph examples/tiny_caformer.yaml --out tiny_caformer.dot
    """
    from metaformer_lab.api import to_graph
    from metaformer_lab.graph.render import write_graph

    try:
        arch_graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
    except MetaformerLabError as err:
        exit_with(err)
    with writing("--out"):
        write_graph(arch_graph, out)
    typer.echo(f"{out}: {arch_graph.number_of_nodes()} ops, {arch_graph.number_of_edges()} typed edges")


@app.command()
def export(
    spec: SpecArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx or pt2 (torch.export).", case_sensitive=False)],
    out: Annotated[Path, typer.Option("--out", help="File to write.", callback=output_file)],
    input_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Square input size (overrides the spec).")]
    = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="Fix the batch size (default: dynamic).")]
    = False,
    atol: Annotated[float, typer.Option(min=0.0, help="Largest |exported - eager| accepted.")] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    block_dir: BlockDirs = [],  # noqa: B006
    max_memory: MaxMemory = None,
    deploy: Deploy = False,
) -> None:
    """Export to ONNX or .pt2; succeeds only when the exported outputs match eager ones.

    Example: metaformer-lab export poolformer_s12 --format onnx --out poolformer_s12.onnx
    """
    from metaformer_lab.api import to_graph
    from metaformer_lab.export import export as run_export

    if fmt.lower() not in ("onnx", "pt2"):
        raise typer.BadParameter(f"'{fmt}' is not one of onnx, pt2", param_hint="--format")
    try:
        graph = to_graph(spec, input_size=input_size, block_dirs=block_dir)
        refuse_oversized(graph, 1, max_memory)
        with console.status(f"exporting {graph.spec.name} to {fmt.lower()} and checking it", spinner="dots"), \
                writing("--out"):
            result = run_export(graph, fmt.lower(), out, dynamic_batch=not static_batch, atol=atol,  # type: ignore[arg-type]
                                deploy=deploy)
    except MetaformerLabError as err:
        exit_with(err)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    console.print(f"{out}: {result.bytes:,} bytes, max |exported - eager| = {result.max_abs_diff:.3g} "
                  f"(checked with {result.checked_with}; batch {'static' if static_batch else 'dynamic'})")
