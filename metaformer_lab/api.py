"""The Python API (a contract): load_spec, dump_spec, to_graph, build.

Invalid input raises :class:`~metaformer_lab.core.errors.SpecError` carrying every ``(path, message)``
problem, whatever the input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

from metaformer_lab.graph.lower import ArchGraph, lower
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import SpecSource, read_spec, with_input_size
from metaformer_lab.spec.load import dump_spec as _dump_spec

if TYPE_CHECKING:  # the compiler is imported by build() alone: checking a spec never needs it
    from torch import nn

    from metaformer_lab.compile.network import Network


def load_spec(source: SpecSource, *, block_dirs: Sequence[str | os.PathLike[str]] = ()) -> ArchSpec:
    """A fully checked spec from a YAML path, a zoo name, a mapping or an ArchSpec.

    Named blocks are looked up in ``block_dirs``, then beside the spec file (``blocks/`` and the file's
    own folder), then in the shipped block library. The spec is also lowered once, so shape errors
    are reported here too.

    Raises:
        SpecError: listing every problem as ``path: message``.
    """
    spec = read_spec(source, block_dirs=block_dirs)
    lower(spec)
    return spec


def dump_spec(spec: ArchSpec) -> str:
    """YAML text of ``spec``; ``load_spec`` of it gives ``spec`` back."""
    return _dump_spec(spec)


def to_graph(spec: SpecSource, *, input_size: int | None = None,
             block_dirs: Sequence[str | os.PathLike[str]] = ()) -> ArchGraph:
    """The typed graph (a networkx DiGraph) of a spec, checked at ``input_size`` when given; raises SpecError."""
    return lower(with_input_size(read_spec(spec, block_dirs=block_dirs), input_size))


@overload
def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: Literal[False] = False,
          out_indices: int | Sequence[int] | None = None) -> Network: ...


@overload
def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: Literal[True],
          out_indices: int | Sequence[int] | None = None) -> nn.Module: ...


def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: bool = False,
          out_indices: int | Sequence[int] | None = None) -> nn.Module:
    """The PyTorch module of a spec (or of its typed graph), initialised as timm does.

    ``features_only``: a feature backbone instead (timm's ``FeatureGetterNet`` around the network, pruned to
    what it needs), returning NCHW maps at ``out_indices`` (positions in ``feature_info``: the last n if an
    int; default every stage, or the last 3 blocks of an isotropic network); its ``feature_info`` gives each
    one's channels and reduction.
    """
    from metaformer_lab.compile.compiler import compile_graph
    from metaformer_lab.compile.protocol import feature_backbone

    graph = spec if isinstance(spec, ArchGraph) else to_graph(spec, input_size=input_size)
    net = compile_graph(graph)
    return feature_backbone(net, out_indices) if features_only else net
