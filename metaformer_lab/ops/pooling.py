"""PoolFormer's token mixer (Yu et al., "MetaFormer Is Actually What You Need for Vision", 2022)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, Folding, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import OddKernel, require_layout
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class PoolingSpec(GridOpSpec):
    """Average pooling minus the input (timm ``metaformer.Pooling``)."""

    type: Literal["pooling"] = "pooling"
    pool_size: OddKernel = Field(3, description="window; stride 1, same padding keeps H and W")


def pooling_shape(spec: PoolingSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", op="pooling")
    return x


class PoolMinusInput(nn.Module):
    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.pool(x) - x


def fold_pooling(module: nn.Module) -> Folding | None:
    """``pool(w * x + b) - (w * x + b) = w * (pool(x) - x)``: the average of a constant is that constant (also
    where a border window averages fewer values), so a norm's weight before the op passes through to the layer
    scale after it and its bias drops out.

    The op itself stays: ``pool(x) - x`` is one depthwise conv (1/k² everywhere, 1/k² - 1 at the centre) only
    away from the borders. With count_include_pad=False (timm's, for exact parity) a border window averages
    fewer values, so no fixed kernel gives the same outputs there.
    """
    return Folding(commutes=True) if isinstance(module, PoolMinusInput) else None


POOLING = around_prefix(OpDef(
    PoolingSpec,
    infer=pooling_shape,
    build=lambda spec, r: PoolMinusInput(spec.pool_size),
    preserves_type=True,
    fold=fold_pooling,
    cases=(Case({}, TensorType("maps", 8, 5, 6)), Case({"pool_size": 5}, TensorType("maps", 8, 7, 7), id="k5"),
           Case({"prefix": "pass"}, TensorType("tokens", 8, 5, 6, prefix=2), id="prefix-pass")),
), layout="maps")
