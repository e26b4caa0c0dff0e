"""Tensor types: what flows along every edge of the typed graph, before any tensor exists."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Layout = Literal["maps", "tokens", "vector"]
"""How an activation is laid out at run time.

- ``maps``: channels first, (B, C, H, W).
- ``tokens``: channels last. Without prefix tokens the grid stays in the tensor, (B, H, W, C), so
  token ops see the grid size at run time (as timm's Swin and MetaFormer stages do); with P prefix
  (class/distillation) tokens the grid is flattened behind them, (B, P + H*W, C).
- ``vector``: (B, C), pooled features and logits.
"""

LAYOUTS: tuple[Layout, ...] = ("maps", "tokens", "vector")


@dataclass(frozen=True, slots=True)
class TensorType:
    """The static type of one activation tensor (batch size excluded).

    Attributes:
        layout: memory layout, see :data:`Layout`.
        channels: C.
        height: H of the spatial grid (1 for ``vector``).
        width: W of the spatial grid (1 for ``vector``).
        prefix: class/distillation tokens in front of the grid tokens (``tokens`` only).
    """

    layout: Layout
    channels: int
    height: int = 1
    width: int = 1
    prefix: int = 0

    @property
    def num_tokens(self) -> int:
        """N = prefix + H*W (meaningful for ``tokens``)."""
        return self.prefix + self.height * self.width

    @property
    def grid(self) -> tuple[int, int]:
        return (self.height, self.width)

    def shape(self, batch: int = 1) -> tuple[int, ...]:
        """The runtime shape of a tensor of this type."""
        if self.layout == "maps":
            return (batch, self.channels, self.height, self.width)
        if self.layout == "tokens":
            if self.prefix:
                return (batch, self.num_tokens, self.channels)
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels)

    def numel(self, batch: int = 1) -> int:
        n = 1
        for d in self.shape(batch):
            n *= d
        return n

    def to(self, layout: Layout) -> TensorType:
        """The same activation in another layout (prefix tokens survive only in ``tokens``)."""
        return replace(self, layout=layout, prefix=self.prefix if layout == "tokens" else 0)

    def with_channels(self, channels: int) -> TensorType:
        return replace(self, channels=channels)

    def with_grid(self, height: int, width: int) -> TensorType:
        return replace(self, height=height, width=width)

    def with_prefix(self, prefix: int) -> TensorType:
        return replace(self, prefix=prefix)

    def __str__(self) -> str:
        if self.layout == "maps":
            return f"maps {self.channels}x{self.height}x{self.width}"
        if self.layout == "tokens":
            if self.height * self.width == 0:
                return f"tokens {self.prefix}x{self.channels} (prefix only)"
            extra = f" (+{self.prefix} prefix)" if self.prefix else ""
            return f"tokens {self.height}x{self.width}x{self.channels}{extra}"
        return f"vector {self.channels}"
