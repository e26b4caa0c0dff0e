"""A gated composite: two token-mixer branches multiplied, ``a(x) * act(g(x))``.

The gating product that Conv2Former's ConvMod (``proj(dwconv(act(conv(x))) * conv(x))``), gMLP's spatial gating
and the gated-conv mixers of several hybrids are built around, made of any two token mixers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, CompositeDef, Folding, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, OpSpec, make_act, pointwise

if TYPE_CHECKING:  # the union is defined in metaformer_lab.spec, which resolves this forward ref
    from metaformer_lab.spec.arch import TokenMixerSpec


class GatedSpec(OpSpec):
    """Two branches on the same input, multiplied: ``branches[0](x) * act(branches[1](x))``."""

    type: Literal["gated"] = "gated"
    branches: list[TokenMixerSpec] = Field(min_length=2, max_length=2, description="[value, gate]")
    act: Act = Field("identity", description="applied to the gate branch before the product")
    proj: bool = Field(False, description="a Linear (tokens) or 1x1 conv (maps) after the product, at the input width "
                                          "(Conv2Former's ConvMod)")

    key_optional = frozenset({"proj"})


class Gated(nn.Module):
    def __init__(self, branches: list[nn.Module], act: nn.Module, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.act = act
        self.proj = proj if proj is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.branches[0](x) * self.act(self.branches[1](x)))


def gated_proj(spec: GatedSpec, x: TensorType) -> nn.Module:
    """The projection after the product, for output type ``x`` (``nn.Identity`` without ``proj``)."""
    if not spec.proj:
        return nn.Identity()
    return pointwise(x.layout, x.channels, x.channels)


def _build(spec: GatedSpec, r: Resolved, children: list[nn.Module]) -> Gated:
    return Gated(children, make_act(spec.act), gated_proj(spec, r.out_type))


def _join(spec: GatedSpec, x: TensorType, outs: list[TensorType]) -> TensorType:
    value, gate = outs
    if gate != value:
        raise ShapeIssue("branches[1]", f"gives {gate}, but the value branch gives {value}; the product needs both "
                                        "the same")
    return value


def fold_gated(module: nn.Module) -> Folding | None:
    """The projection, where there is one, writes the output (a layer scale after it folds in)."""
    if not isinstance(module, Gated):
        return None
    return Folding(writes=module.proj) if isinstance(module.proj, (nn.Linear, nn.Conv2d)) else Folding()


GATED = CompositeDef(
    GatedSpec,
    branches=lambda spec: spec.branches,
    split=lambda spec, x: [x, x],
    join=_join,
    build=_build,
    fold=fold_gated,
    cases=(Case({"branches": [{"type": "identity"}, {"type": "dwconv", "kernel": 3}]}, TensorType("maps", 16, 4, 4)),
           Case({"branches": [{"type": "dwconv", "kernel": 5}, {"type": "identity"}], "act": "sigmoid"},
                TensorType("tokens", 16, 4, 4), id="sigmoid-gate"),
           Case({"branches": [{"type": "dwconv", "kernel": 1, "groups": 1},
                              {"type": "sepconv", "ratio": 1.0, "kernel": 3, "act": "gelu", "bias": True,
                               "project": False}], "proj": True},
                TensorType("maps", 16, 4, 4), id="conv2former-convmod"),
           Case({"branches": [{"type": "identity"}, {"type": "dwconv", "kernel": 3}], "proj": True},
                TensorType("tokens", 16, 4, 4), id="proj-tokens")),
)
