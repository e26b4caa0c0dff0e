"""Costing the zoo (params and FLOPs from the graph, what ``zoo list`` and the search's ``record_size`` do):
every node costed on its own, against ``graph_cost``, which costs each distinct op once. Ratio in one run.

Not a test. ``python benchmarks/zoo_costing.py [--repeats 3] [--out benchmarks/results/zoo_costing.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metaformer_lab.graph import cost
from metaformer_lab.graph.lower import lower
from metaformer_lab.spec.load import read_spec
from metaformer_lab.zoo import list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_costing.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list_models()
    graphs = [lower(read_spec(n)) for n in names]
    per_node, cached = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        start = time.perf_counter()
        expected = [sum(cost.node_cost(g, n).flops for n in g.nodes) for g in graphs]
        per_node.append(time.perf_counter() - start)
        cost._NODE_COSTS.clear()  # a cold cache each time: the ratio is what one zoo listing gains
        start = time.perf_counter()
        got = [cost.graph_cost(g).flops for g in graphs]
        cached.append(time.perf_counter() - start)
        assert got == expected, "the cached costs differ"
    result = {"models": len(names), "per_node_s": statistics.median(per_node), "cached_s": statistics.median(cached),
              "ratio": statistics.median(per_node) / statistics.median(cached), "repeats": args.repeats}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(names)} zoo models: every node {result['per_node_s']:.2f} s, each distinct op once "
          f"{result['cached_s']:.2f} s (median of {args.repeats}), {result['ratio']:.1f}x")


if __name__ == "__main__":
    main()
