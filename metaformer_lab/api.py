"""The Python API (a contract): load_spec, dump_spec, to_graph, build, deploy.

Invalid input raises :class:`~metaformer_lab.core.errors.SpecError` carrying every ``(path, message)``
problem, whatever the input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

from metaformer_lab.core.errors import SpecError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.graph.lower import lower
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import SpecSource, read_spec_partial, with_input_size
from metaformer_lab.spec.load import dump_spec as _dump_spec

if TYPE_CHECKING:  # the compiler is imported by build() alone: checking a spec never needs it
    from torch import nn

    from metaformer_lab.compile.network import Network


def load_spec(source: SpecSource, *, block_dirs: Sequence[str | os.PathLike[str]] = ()) -> ArchSpec:
    """A fully checked spec from a YAML path, a zoo name, a mapping or an ArchSpec.

    Named blocks are looked up in ``block_dirs``, then beside the spec file (``blocks/`` and the file's
    own folder), then in the shipped block library. The spec is also lowered once, so shape errors
    are reported here too, together with the schema problems where those leave the shapes checkable (a
    wrong field in the head does not hide a shape error in stage 2).

    Raises:
        SpecError: listing every problem as ``path: message``.
    """
    return _checked(source, block_dirs, None).spec


def dump_spec(spec: ArchSpec) -> str:
    """YAML text of ``spec``; ``load_spec`` of it gives ``spec`` back."""
    return _dump_spec(spec)


def to_graph(spec: SpecSource, *, input_size: int | None = None,
             block_dirs: Sequence[str | os.PathLike[str]] = ()) -> ArchGraph:
    """The typed graph (a networkx DiGraph) of a spec, checked at ``input_size`` when given; raises SpecError."""
    return _checked(spec, block_dirs, input_size)


def _checked(source: SpecSource, block_dirs: Sequence[str | os.PathLike[str]], input_size: int | None) -> ArchGraph:
    """The lowered spec; with schema problems, a SpecError listing them and the shape problems of the parts
    they leave checkable (:mod:`metaformer_lab.spec.partial`)."""
    spec, issues = read_spec_partial(source, block_dirs=block_dirs)
    if isinstance(spec, ArchSpec):
        return lower(with_input_size(spec, input_size))
    if spec is not None:
        try:
            lower(with_input_size(spec.spec, input_size), unknown=spec.unknown)
        except SpecError as err:
            issues = [*issues, *err.issues]
    raise SpecError(issues)


@overload
def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: Literal[False] = False,
          out_indices: int | Sequence[int] | None = None, deploy: bool = False) -> Network: ...


@overload
def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: Literal[True],
          out_indices: int | Sequence[int] | None = None, deploy: bool = False) -> nn.Module: ...


def build(spec: SpecSource | ArchGraph, *, input_size: int | None = None, features_only: bool = False,
          out_indices: int | Sequence[int] | None = None, deploy: bool = False) -> nn.Module:
    """The PyTorch module of a spec (or of its typed graph), initialised as timm does.

    ``features_only``: a feature backbone instead (timm's ``FeatureGetterNet`` around the network, pruned to
    what it needs), returning NCHW maps at ``out_indices`` (positions in ``feature_info``: the last n if an
    int; default every stage, or the last 3 blocks of an isotropic network); its ``feature_info`` gives each
    one's channels and reduction.

    ``deploy``: the deploy form instead (see :func:`deploy`), in eval mode.
    """
    from metaformer_lab.compile.compiler import compile_graph
    from metaformer_lab.compile.protocol import feature_backbone

    graph = spec if isinstance(spec, ArchGraph) else to_graph(spec, input_size=input_size)
    net = compile_graph(graph)
    if deploy:
        from metaformer_lab.compile.folding import deploy_form

        net = deploy_form(net)  # type: ignore[assignment]
    return feature_backbone(net, out_indices) if features_only else net


def deploy(module: nn.Module) -> nn.Module:
    """The deploy form of a (trained) module: a copy in eval mode with the same outputs (float32, within 1e-4) and
    inference-only structure folded away: BatchNorms into the conv or linear before them, norm weights and biases
    into the linear after them, layer scales into the last linear of their branch, res scales into a shortcut's
    conv, parallel depthwise convs into one; its 4-D weights are channels-last, so its feature maps are too, and its
    Linears run large float32 CPU calls on oneDNN's reordered weights (``ops.packed.PackedLinear``).
    ``module`` is left as it was.

    The deploy form keeps the module names and timm's protocol (features, ``forward_intermediates``,
    ``reset_classifier``), but its state_dict lacks the folded parameters: load checkpoints before deploying.
    """
    from metaformer_lab.compile.folding import deploy_form

    return deploy_form(module)
