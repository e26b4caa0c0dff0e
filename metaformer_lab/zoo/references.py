"""Reference modules for zoo models that timm does not register.

IdentityFormer and RandFormer (Yu et al., "MetaFormer Baselines for Vision", 2022) exist only in
sail-sg/metaformer; their reference is timm's own ``MetaFormer`` class given an identity or a frozen
random-mixing token mixer, with PoolFormerV2-S12's other settings (as the paper defines them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer
from torch import Tensor, nn


class RandomMixingReference(nn.Module):
    """sail-sg's ``RandomMixing`` written for timm's NCHW MetaFormer stages: a frozen, row-softmaxed
    random N x N matrix mixing the N = H*W tokens. timm's stages take a mixer class, so each token
    count is a subclass."""

    num_tokens = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        matrix = torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1)
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(B, C, H * W))  # (B, C, N)
        return x.reshape(B, C, H, W)


class RandomMixing14x14(RandomMixingReference):
    num_tokens = 14 * 14


class RandomMixing7x7(RandomMixingReference):
    num_tokens = 7 * 7


def identityformer_s12(**kwargs: Any) -> nn.Module:
    return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=nn.Identity,
                      norm_layers=GroupNorm1NoBias, use_mlp_head=False, **kwargs)


def randformer_s12(**kwargs: Any) -> nn.Module:
    mixers = [nn.Identity, nn.Identity, RandomMixing14x14, RandomMixing7x7]
    return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=mixers,
                      norm_layers=GroupNorm1NoBias, use_mlp_head=False, **kwargs)


REFERENCES: dict[str, Callable[..., nn.Module]] = {
    "identityformer_s12": identityformer_s12,
    "randformer_s12": randformer_s12,
}
