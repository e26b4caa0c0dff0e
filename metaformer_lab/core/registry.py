"""Op registries: each op family registers its config class, shape rule and module builder.

Registries are built from explicit lists in :mod:`metaformer_lab.ops` (no registration as an import
side effect), refuse duplicate tags, and answer an unknown tag with close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from metaformer_lab.core.types import Layout, TensorType

if TYPE_CHECKING:  # annotations only: the bottom layer (and the command line above it) must not pay for torch
    from torch import nn

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


@dataclass(frozen=True)
class OpDef(Generic[S]):
    """One leaf op: config class + shape rule + module builder.

    The call signatures depend on the registry (role) the op is in:

    - norms, token mixers, channel mixers, position encodings: ``infer(spec, x)``, ``build(spec, x)``;
    - stems and downsamplers: ``infer(spec, x, dim)``, ``build(spec, x, dim)`` (``dim``: output width);
    - heads: ``infer(spec, x, num_classes)``, ``build(spec, x, num_classes)``.

    ``infer`` raises :class:`~metaformer_lab.core.errors.ShapeIssue` for input it cannot take.
    ``preserves_type`` says the op's output type always equals its input type (mixers, norms), which
    lets shape inference carry on after the op reports a problem. ``accepts`` lists the layouts a stem
    or downsampler takes; the graph converts its input to the first of them when needed.
    """

    spec: type[S]
    infer: Callable[..., TensorType]
    build: Callable[..., nn.Module]
    cases: tuple[Case, ...] = ()
    preserves_type: bool = False
    accepts: tuple[Layout, ...] = ()

    @property
    def tag(self) -> str:
        return tag_of(self.spec)


@dataclass(frozen=True)
class CompositeDef(Generic[S]):
    """An op made of child token mixers: the graph branches into ``branches(spec)`` and joins again.

    ``split(spec, x)`` gives each branch's input type (raises ShapeIssue), ``join(spec, x, outs)`` the
    output type from the branches' output types, ``build(spec, x, children)`` the module around the
    already-built children.
    """

    spec: type[S]
    branches: Callable[[S], Sequence[BaseModel]]
    split: Callable[[S, TensorType], list[TensorType]]
    join: Callable[[S, TensorType, list[TensorType]], TensorType]
    build: Callable[[S, TensorType, list[nn.Module]], nn.Module]
    cases: tuple[Case, ...] = ()
    preserves_type: bool = True

    @property
    def tag(self) -> str:
        return tag_of(self.spec)


AnyDef = OpDef[Any] | CompositeDef[Any]


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

    def get(self, tag: str) -> AnyDef:
        try:
            return self.defs[tag]
        except KeyError:
            raise UnknownTag(self.kind, tag, list(self.defs)) from None

    def of_spec(self, spec: BaseModel) -> AnyDef:
        return self.get(tag_of(type(spec)))

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
