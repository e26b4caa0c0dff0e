"""RandFormer's token mixer (Yu et al., "MetaFormer Baselines for Vision", 2022, sail-sg ``RandomMixing``)."""

from __future__ import annotations

from typing import Literal

from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


class RandomMixingSpec(GridOpSpec):
    """Mixes the N tokens with a frozen, row-softmaxed random N x N matrix; N is fixed by the input."""

    type: Literal["random_mixing"] = "random_mixing"


class RandomMixing(nn.Module):
    def __init__(self, num_tokens: int, channels_last: bool) -> None:
        super().__init__()
        # A frozen nn.Parameter, as in sail-sg's code, so that its checkpoints load unchanged.
        matrix = torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1)  # (N, N), rows sum to 1
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)
        self.channels_last = channels_last

    def init_weights(self) -> None:
        """Keep the frozen matrix a random softmax (the generic init does not touch it)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # (B, H, W, C)
            B, H, W, C = x.shape
            x = torch.einsum("mn,bnc->bmc", self.random_matrix, x.reshape(B, H * W, C))
            return x.reshape(B, H, W, C)
        B, C, H, W = x.shape  # (B, C, H, W)
        x = torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(B, C, H * W))
        return x.reshape(B, C, H, W)


def random_mixing_shape(spec: RandomMixingSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="random_mixing")
    require_no_prefix(x, op="random_mixing")
    return x


RANDOM_MIXING = around_prefix(OpDef(
    RandomMixingSpec,
    infer=random_mixing_shape,
    build=lambda spec, r: RandomMixing(r.in_type.height * r.in_type.width, r.in_type.layout == "tokens"),
    preserves_type=True,
    cases=(Case({}, TensorType("maps", 8, 4, 5)), Case({}, TensorType("tokens", 8, 4, 5), id="tokens")),
))
