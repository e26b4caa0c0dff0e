"""IdentityFormer's token mixer: no token mixing at all (Yu et al., "MetaFormer Baselines", 2022)."""

from __future__ import annotations

from typing import Literal

from metaformer_lab.core.lazy_torch import nn
from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import OpSpec


class IdentitySpec(OpSpec):
    """``x -> x``; the block reduces to ``x + norm(x)`` plus its channel mixer (``token_mixer: null`` drops that
    branch instead)."""

    type: Literal["identity"] = "identity"


IDENTITY = OpDef(
    IdentitySpec,
    infer=lambda spec, x, out_dim: x,
    build=lambda spec, r: nn.Identity(),
    preserves_type=True,
    cases=(Case({}, TensorType("maps", 8, 4, 4), id="maps"), Case({}, TensorType("tokens", 8, 4, 4, 1), id="tokens")),
)
