"""The typed graph as DOT text, or as a picture (PNG/SVG/PDF) drawn with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from metaformer_lab.graph.arch import ArchGraph

_COLORS = {
    "input": "#dddddd", "stem": "#f4cccc", "downsample": "#f4cccc", "layout": "#eeeeee", "prefix": "#d9d2e9",
    "pos_embed": "#d9d2e9", "norm": "#fff2cc", "token_mixer": "#c9daf8", "fork": "#c9daf8",
    "channel_mixer": "#d9ead3", "scale": "#eeeeee", "add": "#ffffff", "head": "#f4cccc",
}


def _label(name: str, node: dict[str, Any]) -> str:
    spec = node.get("spec")
    op = getattr(spec, "type", None)
    what = f"{node['kind']}: {op}" if op and node["kind"] != "fork" else node["kind"]
    return f"{name}\n{what}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: ArchGraph) -> str:
    """Graphviz DOT: one box per op (module path, kind and op type), edges labelled with tensor types."""
    lines = [f"digraph {_quote(graph.spec.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    for name in nx.topological_sort(graph):
        node = graph.nodes[name]
        color = _COLORS.get(node["kind"], "#ffffff")
        lines.append(f"  {_quote(name)} [label={_quote(_label(name, node))}, fillcolor={_quote(color)}];")
    for u, v, data in graph.edges(data=True):
        lines.append(f"  {_quote(u)} -> {_quote(v)} [label={_quote(str(data['type']))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layers(graph: ArchGraph) -> dict[str, tuple[float, float]]:
    """Top-down layered positions: depth = longest path from the input, x = slot within the depth."""
    depth: dict[str, int] = {}
    for name in nx.topological_sort(graph):
        depth[name] = max((depth[p] + 1 for p in graph.predecessors(name)), default=0)
    slots: dict[int, list[str]] = {}
    for name, d in depth.items():
        slots.setdefault(d, []).append(name)
    pos: dict[str, tuple[float, float]] = {}
    for d, names in slots.items():
        for k, name in enumerate(names):
            pos[name] = (2.0 * (k - (len(names) - 1) / 2), -d)
    return pos


def draw(graph: ArchGraph, out: Path) -> None:
    """Draw the graph into ``out``; the format follows the suffix (png, svg, pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = _layers(graph)
    rows = 1 - min(y for _, y in pos.values())
    width = max(x for x, _ in pos.values()) - min(x for x, _ in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * width + 3), min(0.55 * rows + 1, 300.0)))
    for u, v, data in graph.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        skip = y0 - y1 > 1  # a shortcut: bend it around the boxes in between
        ax.annotate("", xy=(x1, y1 + 0.25), xytext=(x0, y0 - 0.25),
                    arrowprops={"arrowstyle": "->", "color": "#999999" if skip else "#666666", "lw": 0.8,
                                "connectionstyle": f"arc3,rad={0.5 if skip else 0.0}"})
        if not skip:
            ax.text((x0 + x1) / 2 + 0.08, (y0 + y1) / 2, str(data["type"]), fontsize=5.5, color="#666666",
                    va="center")
    for name, (x, y) in pos.items():
        node = graph.nodes[name]
        ax.text(x, y, _label(name, node), ha="center", va="center", fontsize=6.5,
                bbox={"boxstyle": "round,pad=0.3", "fc": _COLORS.get(node["kind"], "#ffffff"), "ec": "#999999"})
    ax.set_xlim(min(x for x, _ in pos.values()) - 1.5, max(x for x, _ in pos.values()) + 1.5)
    ax.set_ylim(-rows, 1)
    ax.axis("off")
    ax.set_title(f"{graph.spec.name}: {graph.input_type} -> {graph.output_type}", fontsize=9)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def write_graph(graph: ArchGraph, out: Path) -> None:
    """DOT text, or a picture when ``out`` ends in .png, .svg or .pdf."""
    if out.suffix.lower() in PICTURE_SUFFIXES:
        draw(graph, out)
    else:
        out.write_text(to_dot(graph))
