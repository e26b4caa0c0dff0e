"""Prefix tokens around grid-only ops: the class tokens split off, the op on the token grid, re-joined in front.

An op whose module sees the token grid only (a depthwise conv, strided K/V convs, a conv downsampler) has a
config derived from :class:`GridOpSpec` and is registered as ``around_prefix(OpDef(...))``. With its ``prefix``
field set and an input with P prefix tokens, the op's own shape rule runs on the grid alone (in the layout its
module needs), its module is wrapped in :class:`PrefixRouted`, and the prefix tokens ``pass`` unchanged (CeiT's
LeFF), become ``zero`` (LocalViT's FFN: a residual branch then leaves them as they were), or go through a
``linear`` layer to the op's output width (PiT's ``ConvHeadPooling``, MViT's stage transitions). The node's
``resolved`` settings hold what was routed (:class:`PrefixRoute`), so the graph, the costs, the latency keys
and the deploy form see it as data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import FoldHook, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import Layout, TensorType
from metaformer_lab.ops.common import OpSpec, join_prefix, require_grid, split_prefix
from metaformer_lab.ops.folds import folding_of

PrefixMode = Literal["pass", "zero", "linear"]

ROUTE = "prefix_route"
"""The settings key of a routed node's :class:`PrefixRoute`."""


class GridOpSpec(OpSpec):
    """Base of the configs of ops that see the token grid only; ``prefix`` routes prefix tokens around them."""

    prefix: PrefixMode | None = Field(None, description="prefix (class) tokens go around the op, which sees the "
                                                        "grid only: pass (unchanged), zero, or linear (a Linear "
                                                        "to the output width); null: the op's own rule")

    key_optional = frozenset({"prefix"})


@dataclass(frozen=True)
class PrefixRoute:
    """How prefix tokens go around a grid-only op: ``mode`` (the config's ``prefix``), ``count`` tokens, and
    the op resolved on the grid alone (``grid``: its input and output types, its settings)."""

    mode: PrefixMode
    count: int
    grid: Resolved


def routes_prefix(spec: Any, x: TensorType | None) -> bool:
    """Whether the op ``spec`` configures sees ``x``'s grid alone, its prefix tokens routed around it."""
    return x is not None and x.prefix > 0 and isinstance(spec, GridOpSpec) and spec.prefix is not None


class PrefixRouted(nn.Module):
    """Prefix tokens around an op on the token grid: ``cat(route(x[:, :P]), op(grid(x[:, P:])))``."""

    def __init__(self, op: nn.Module, route: PrefixRoute, proj: nn.Module | None) -> None:
        super().__init__()
        self.op = op
        self.proj = proj
        self.mode, self.count = route.mode, route.count
        self.grid, self.maps = route.grid.in_type.grid, route.grid.in_type.layout == "maps"
        self.out_maps, self.out_channels = route.grid.out_type.layout == "maps", route.grid.out_type.channels

    def forward(self, x: Tensor) -> Tensor:  # (B, P + H*W, C) -> (B, P + H'*W', C')
        prefix, grid = split_prefix(x, self.count, self.grid)  # (B, P, C), (B, H, W, C)
        y = self.op(grid.permute(0, 3, 1, 2) if self.maps else grid)
        y = y.permute(0, 2, 3, 1) if self.out_maps else y  # (B, H', W', C')
        if self.proj is not None:
            prefix = self.proj(prefix)  # (B, P, C')
        elif self.mode == "zero":
            prefix = torch.zeros_like(prefix[..., :1]).expand(-1, -1, self.out_channels)
        return join_prefix(prefix, y)


def fold_prefix_routed(module: nn.Module) -> Folding | None:
    """Around a routed op, an affine on the input folds into the op's readers only when the prefix tokens are
    read by a layer too (``linear``) or not at all (``zero``); one on the output into the op's writer only when
    the prefix tokens are zero. The op folds as it does alone."""
    if not isinstance(module, PrefixRouted):
        return None
    inner = folding_of(module.op)
    if module.mode == "zero":
        return Folding(reads=inner.reads, writes=inner.writes)
    if module.mode == "linear" and inner.reads:
        return Folding(reads=(*inner.reads, module.proj))
    return Folding()


def _routed_fold(fold: FoldHook | None) -> FoldHook:
    """The op's own ``fold`` hook, answering for the op's modules wrapped in :class:`PrefixRouted` too."""

    def hook(module: nn.Module) -> Folding | None:
        if isinstance(module, PrefixRouted):
            return fold_prefix_routed(module)
        return fold(module) if fold is not None else None

    return hook


def _grid_layout(x: TensorType, opdef: OpDef[Any], layout: Layout | None) -> Layout:
    if layout is not None:
        return layout
    return opdef.accepts[0] if opdef.accepts and x.layout not in opdef.accepts else x.layout


def around_prefix(opdef: OpDef[Any], layout: Layout | None = None) -> OpDef[Any]:
    """``opdef`` taking prefix tokens around it when its config's ``prefix`` is set (a :class:`GridOpSpec`).

    ``layout``: the layout the op's module runs the grid in (default: the first layout the op ``accepts``, or
    tokens).
    """
    if not issubclass(opdef.spec, GridOpSpec):
        raise TypeError(f"{opdef.spec.__name__} needs GridOpSpec as its base to route prefix tokens")

    def infer(spec: GridOpSpec, x: TensorType, out_dim: int | None) -> TensorType | tuple[TensorType, Settings]:
        if not routes_prefix(spec, x):
            try:
                return opdef.infer(spec, x, out_dim)
            except ShapeIssue as issue:
                if issue.field != "type" or not x.prefix:
                    raise
                raise ShapeIssue("type", f"{issue.message}; its prefix field (pass, zero or linear) routes the "
                                         f"{x.prefix} prefix token(s) around it") from None
        require_grid(x, op=opdef.tag)
        inner = opdef.resolve(spec, TensorType(_grid_layout(x, opdef, layout), x.channels, x.height, x.width),
                              out_dim)
        y = inner.out_type
        if y.layout == "vector" or y.height * y.width == 0:
            raise ShapeIssue("prefix", f"{opdef.tag} gives {y}; prefix tokens join a token grid only")
        if spec.prefix == "pass" and y.channels != x.channels:
            raise ShapeIssue("prefix", f"pass keeps the {x.prefix} prefix token(s) at {x.channels} channels, but "
                                       f"{opdef.tag} gives {y.channels}; use linear")
        out = TensorType("tokens", y.channels, y.height, y.width, prefix=x.prefix)
        return out, {ROUTE: PrefixRoute(spec.prefix, x.prefix, inner)}  # type: ignore[arg-type]

    def build(spec: GridOpSpec, r: Resolved) -> nn.Module:
        route: PrefixRoute | None = r.settings.get(ROUTE)
        if route is None:
            return opdef.build(spec, r)
        proj = nn.Linear(r.in_type.channels, r.out_type.channels) if route.mode == "linear" else None
        return PrefixRouted(opdef.build(spec, route.grid), route, proj)

    return replace(opdef, infer=infer, build=build, fold=_routed_fold(opdef.fold))


__all__ = ["ROUTE", "GridOpSpec", "PrefixMode", "PrefixRoute", "PrefixRouted", "around_prefix",
           "fold_prefix_routed", "routes_prefix"]
