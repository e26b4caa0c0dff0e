"""A gated composite: two token-mixer branches multiplied, ``a(x) * act(g(x))``.

The gating product that Conv2Former's ConvMod (``dwconv(conv(x)) * conv(x)``), gMLP's spatial gating
and the gated-conv mixers of several hybrids are built around, made of any two token mixers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.registry import Case, CompositeDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, OpSpec, make_act

if TYPE_CHECKING:  # the union is defined in metaformer_lab.spec, which resolves this forward ref
    from metaformer_lab.spec.arch import TokenMixerSpec


class GatedSpec(OpSpec):
    """Two branches on the same input, multiplied: ``branches[0](x) * act(branches[1](x))``."""

    type: Literal["gated"] = "gated"
    branches: list[TokenMixerSpec] = Field(min_length=2, max_length=2, description="[value, gate]")
    act: Act = Field("identity", description="applied to the gate branch before the product")


class Gated(nn.Module):
    def __init__(self, branches: list[nn.Module], act: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.branches[0](x) * self.act(self.branches[1](x))


def _join(spec: GatedSpec, x: TensorType, outs: list[TensorType]) -> TensorType:
    value, gate = outs
    if gate != value:
        raise ShapeIssue("branches[1]", f"gives {gate}, but the value branch gives {value}; the product needs both "
                                        "the same")
    return value


GATED = CompositeDef(
    GatedSpec,
    branches=lambda spec: spec.branches,
    split=lambda spec, x: [x, x],
    join=_join,
    build=lambda spec, r, children: Gated(children, make_act(spec.act)),
    cases=(Case({"branches": [{"type": "identity"}, {"type": "dwconv", "kernel": 3}]}, TensorType("maps", 16, 4, 4)),
           Case({"branches": [{"type": "dwconv", "kernel": 5}, {"type": "identity"}], "act": "sigmoid"},
                TensorType("tokens", 16, 4, 4), id="sigmoid-gate")),
)
