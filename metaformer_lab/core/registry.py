"""Op registries: each op family registers its config class, shape rule and module builder.

Registries are built from explicit lists in :mod:`metaformer_lab.ops` (no registration as an import
side effect), refuse duplicate tags, and answer an unknown tag with close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from metaformer_lab.core.types import Layout, TensorType

if TYPE_CHECKING:  # annotations only: the bottom layer (and the command line above it) must not pay for torch
    from torch import Tensor, nn

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class Case:
    """An example the registry-wide tests run: a config (YAML mapping) and an input type.

    ``out_dim`` is the requested output width for stems and downsamplers, the number of classes for
    heads, and ignored elsewhere.
    """

    config: dict[str, Any]
    input: TensorType
    out_dim: int | None = None
    id: str = ""


Settings = dict[str, Any]
"""What an op's shape rule derives from its config and input (a head count, a padding) for its builder."""


@dataclass(frozen=True)
class Resolved:
    """One node's op, settled by its shape rule: the builder's only input besides the config.

    ``out_dim`` is what the graph asked for: the output width of stems and downsamplers, the number of
    classes of heads, None elsewhere. ``settings`` holds what the shape rule derived once (heads from
    ``head_dim``, ...), so the builder never derives it again.
    """

    in_type: TensorType
    out_type: TensorType
    out_dim: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]


@dataclass(frozen=True)
class ChannelAffine:
    """A per-channel ``weight * x + bias`` that a module applies last: ``module(x) = affine(rest(x))``.

    ``rest`` is the module without it (``nn.Identity`` when the module is nothing but the affine: a layer scale,
    an eval-mode BatchNorm); ``source`` is the module itself (a BatchNorm folds with torch's own fusion). Either
    tensor may be None (no scale, no shift).
    """

    weight: Tensor | None
    bias: Tensor | None
    rest: nn.Module
    source: nn.Module


@dataclass(frozen=True)
class Folding:
    """How a module an op built folds into its deploy form (``metaformer_lab.deploy``); every field optional.

    - ``reads``: the Linear / Conv2d modules that read the module's input, and nothing else does: a per-channel
      affine on that input (a norm's weight and bias) folds into each of them where exact;
    - ``writes``: the Linear / Conv2d (or affine norm) whose output is the module's output, channel for channel
      (reshapes and eval-mode dropout in between are fine): a per-channel affine on the output (a layer scale,
      a BatchNorm) folds into it;
    - ``affine``: the per-channel affine the module ends with, which can move into a neighbour (norms, scales);
    - ``commutes``: ``module(w * x + b) = w * module(x)`` for per-channel ``w`` and ``b`` (PoolFormer's
      ``pool(x) - x``): an affine before it passes through, its shift dropped, into the part after it;
    - ``deploy``: the module's own deploy form (BatchNorm folded into its conv, parallel convs made one), called
      after its children were folded; it may return the module itself, changed in place.
    """

    reads: tuple[nn.Module, ...] = ()
    writes: nn.Module | None = None
    affine: ChannelAffine | None = None
    commutes: bool = False
    deploy: Callable[[], nn.Module] | None = None


FoldHook = Callable[["nn.Module"], "Folding | None"]
"""An op's fold declaration: the :class:`Folding` of a module the op builds, None for any other module."""


@dataclass(frozen=True)
class OpDef(Generic[S]):
    """One leaf op: config class + shape rule + module builder, with one call signature for every role:

    - ``infer(spec, in_type, out_dim) -> out_type`` or ``(out_type, settings)``: the shape rule. ``out_dim``
      is the output width of stems and downsamplers, the number of classes of heads, None elsewhere.
      Raises :class:`~metaformer_lab.core.errors.ShapeIssue` for input it cannot take;
    - ``build(spec, resolved) -> nn.Module``: the module, from the :class:`Resolved` the rule settled.

    ``preserves_type`` says the op's output type always equals its input type (mixers, norms), which
    lets shape inference carry on after the op reports a problem. ``accepts`` lists the layouts a stem
    or downsampler takes; the graph converts its input to the first of them when needed. ``cases`` are
    the examples every op is tested on (shape rule = built module, in every layout it takes). ``fold``
    declares how the op's modules fold into the deploy form (:class:`Folding`); None: they do not.
    """

    spec: type[S]
    infer: Callable[[S, TensorType, int | None], TensorType | tuple[TensorType, Settings]]
    build: Callable[[S, Resolved], nn.Module]
    cases: tuple[Case, ...] = ()
    preserves_type: bool = False
    accepts: tuple[Layout, ...] = ()
    fold: FoldHook | None = None

    @property
    def tag(self) -> str:
        return tag_of(self.spec)

    @property
    def description(self) -> str:
        return description_of(self.spec)

    def resolve(self, spec: S, in_type: TensorType, out_dim: int | None = None) -> Resolved:
        """The shape rule's answer as a :class:`Resolved` (raises ShapeIssue)."""
        result = self.infer(spec, in_type, out_dim)
        out, settings = result if isinstance(result, tuple) else (result, {})
        return Resolved(in_type, out, out_dim, settings)

    def make(self, spec: S, in_type: TensorType, out_dim: int | None = None) -> nn.Module:
        """The module for ``in_type`` after the shape rule accepted it (raises ShapeIssue)."""
        return self.build(spec, self.resolve(spec, in_type, out_dim))


@dataclass(frozen=True)
class CompositeDef(Generic[S]):
    """An op made of child token mixers: the graph branches into ``branches(spec)`` and joins again.

    ``split(spec, x)`` gives each branch's input type (raises ShapeIssue), ``join(spec, x, outs)`` the
    output type from the branches' output types, ``build(spec, resolved, children)`` the module around
    the already-built children; ``fold`` as for :class:`OpDef`. ``out_dims(spec, x)``, where given, is the
    output width each branch is asked for (its shape rule's ``out_dim``; raises ShapeIssue); without it
    every branch gets None, and keeps its width.
    """

    spec: type[S]
    branches: Callable[[S], Sequence[BaseModel]]
    split: Callable[[S, TensorType], list[TensorType]]
    join: Callable[[S, TensorType, list[TensorType]], TensorType]
    build: Callable[[S, Resolved, list[nn.Module]], nn.Module]
    cases: tuple[Case, ...] = ()
    preserves_type: bool = True
    fold: FoldHook | None = None
    out_dims: Callable[[S, TensorType], list[int | None]] | None = None

    @property
    def tag(self) -> str:
        return tag_of(self.spec)

    @property
    def description(self) -> str:
        return description_of(self.spec)

    def branch_inputs(self, spec: S, x: TensorType) -> list[tuple[TensorType, int | None]]:
        """Each branch's input type and requested output width (raises ShapeIssue)."""
        types = self.split(spec, x)
        dims = self.out_dims(spec, x) if self.out_dims is not None else [None] * len(types)
        return list(zip(types, dims, strict=True))


AnyDef = OpDef[Any] | CompositeDef[Any]


def description_of(spec_cls: type[BaseModel]) -> str:
    """The first line of a config class's docstring."""
    doc = (spec_cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def tag_of(spec_cls: type[BaseModel]) -> str:
    """The ``type`` tag of a config class (the default of its ``type`` Literal field)."""
    default = spec_cls.model_fields["type"].default
    if not isinstance(default, str):
        raise TypeError(f"{spec_cls.__name__}.type needs a string default")
    return default


class UnknownTag(LookupError):
    def __init__(self, kind: str, tag: str, known: Sequence[str]) -> None:
        self.kind, self.tag, self.known = kind, tag, tuple(known)
        close = difflib.get_close_matches(tag, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; one of: {', '.join(known)}"
        super().__init__(f"unknown {kind} '{tag}'{hint}")


@dataclass
class Registry:
    """A listable, duplicate-free map from ``type`` tag to op definition, for one role."""

    kind: str
    defs: dict[str, AnyDef] = field(default_factory=dict)
    by_class: dict[type[BaseModel], AnyDef] = field(default_factory=dict)  # config class -> its op

    @classmethod
    def of(cls, kind: str, defs: Iterable[AnyDef]) -> Registry:
        registry = cls(kind)
        for d in defs:
            registry.register(d)
        return registry

    def register(self, op: AnyDef) -> None:
        if op.tag in self.defs:
            raise ValueError(f"{self.kind} '{op.tag}' is registered twice")
        self.defs[op.tag] = op
        self.by_class[op.spec] = op

    def get(self, tag: str) -> AnyDef:
        try:
            return self.defs[tag]
        except KeyError:
            raise UnknownTag(self.kind, tag, list(self.defs)) from None

    def of_spec(self, spec: BaseModel) -> AnyDef:
        found = self.by_class.get(type(spec))
        return found if found is not None else self.get(tag_of(type(spec)))

    def tags(self) -> list[str]:
        return list(self.defs)

    def specs(self) -> list[type[BaseModel]]:
        return [d.spec for d in self.defs.values()]

    def __iter__(self) -> Iterator[AnyDef]:
        return iter(self.defs.values())

    def __contains__(self, tag: object) -> bool:
        return tag in self.defs

    def __len__(self) -> int:
        return len(self.defs)
