"""Composite token mixers built from other token mixers, so Inception-, HiLo- or iFormer-style mixers
are YAML: ``parallel`` sums its branches, ``split`` gives each branch a slice of the channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, CompositeDef, Folding
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import OpSpec, channel_dim
from metaformer_lab.ops.conv_mixers import DepthwiseConv

if TYPE_CHECKING:  # the union is defined in metaformer_lab.spec, which resolves these forward refs
    from metaformer_lab.spec.arch import TokenMixerSpec

_MAPS = TensorType("maps", 16, 4, 4)
_TOKENS = TensorType("tokens", 16, 4, 4)


class ParallelSpec(OpSpec):
    """Branches that all see the whole input; their outputs are summed."""

    type: Literal["parallel"] = "parallel"
    branches: list[TokenMixerSpec] = Field(min_length=2, max_length=8)


class Parallel(nn.Module):
    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def _as_kernel(branch: nn.Module, size: tuple[int, int], channels: int) -> tuple[Tensor, Tensor | None]:
    """A depthwise conv or identity branch as a centred ``size`` kernel (C, 1, kh, kw) and its bias."""
    kernel = torch.zeros(channels, 1, *size)
    if isinstance(branch, nn.Identity):
        kernel[:, :, size[0] // 2, size[1] // 2] = 1.0
        return kernel, None
    kh, kw = branch.dw.kernel_size
    top, left = (size[0] - kh) // 2, (size[1] - kw) // 2
    kernel[:, :, top:top + kh, left:left + kw] = branch.dw.weight
    return kernel, branch.dw.bias


def reparameterize(parallel: Parallel) -> nn.Module:
    """Parallel depthwise convs (and identities) on the same input, summed, as one depthwise conv (RepVGG's
    re-parameterisation): each kernel centred in the largest, the identity a 1 at the centre. Exact: every
    branch pads with zeros to keep the size, so the sum pads the same way."""
    convs = [b for b in parallel.branches if isinstance(b, DepthwiseConv)]
    size = (max(c.dw.kernel_size[0] for c in convs), max(c.dw.kernel_size[1] for c in convs))
    channels = convs[0].dw.in_channels
    kernels = [_as_kernel(b, size, channels) for b in parallel.branches]
    biases = [b for _, b in kernels if b is not None]
    merged = DepthwiseConv(channels, size, bias=bool(biases), channels_last=convs[0].channels_last)
    with torch.no_grad():
        merged.dw.weight.copy_(sum(k for k, _ in kernels))
        if biases:
            merged.dw.bias.copy_(sum(biases))
    return merged


def fold_parallel(module: nn.Module) -> Folding | None:
    """Depthwise convs in parallel (identities among them) become one depthwise conv."""
    if not isinstance(module, Parallel):
        return None
    convs = [b for b in module.branches if isinstance(b, DepthwiseConv)]
    others = [b for b in module.branches if not isinstance(b, (DepthwiseConv, nn.Identity))]
    if not convs or others or len({c.channels_last for c in convs}) > 1:
        return Folding()
    return Folding(deploy=lambda: reparameterize(module))


class SplitSpec(OpSpec):
    """Channels split by ``ratios``, one branch per slice, outputs concatenated (InceptionNeXt, HiLo).

    Every branch but the first gets ``int(ratio * channels)`` channels; the first gets the rest, as
    timm's ``InceptionDWConv2d`` gives the identity branch.
    """

    type: Literal["split"] = "split"
    ratios: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(min_length=2, max_length=8)
    branches: list[TokenMixerSpec] = Field(min_length=2, max_length=8)


class Split(nn.Module):
    def __init__(self, sizes: list[int], dim: int, branches: list[nn.Module]) -> None:
        super().__init__()
        self.sizes, self.dim = sizes, dim
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self.sizes, dim=self.dim)
        return torch.cat([branch(p) for branch, p in zip(self.branches, parts, strict=True)], dim=self.dim)


def split_sizes(spec: SplitSpec, channels: int) -> list[int]:
    if len(spec.ratios) != len(spec.branches):
        raise ShapeIssue("ratios", f"{len(spec.ratios)} ratios for {len(spec.branches)} branches")
    if abs(sum(spec.ratios) - 1.0) > 1e-6:
        raise ShapeIssue("ratios", f"must sum to 1, got {sum(spec.ratios):g}")
    rest = [int(r * channels) for r in spec.ratios[1:]]
    sizes = [channels - sum(rest), *rest]
    for i, size in enumerate(sizes):
        if size < 1:
            raise ShapeIssue(f"ratios[{i}]", f"{spec.ratios[i]:g} of {channels} channels leaves branch {i} empty")
    return sizes


def _join(spec: OpSpec, x: TensorType, outs: list[TensorType]) -> TensorType:
    for i, out in enumerate(outs):
        if out.height != x.height or out.width != x.width or out.layout != x.layout or out.prefix != x.prefix:
            raise ShapeIssue(f"branches[{i}]", f"changes the tensor type to {out}; a branch must keep {x}")
    return x.with_channels(sum(o.channels for o in outs)) if isinstance(spec, SplitSpec) else outs[0]


def _parallel_split(spec: ParallelSpec, x: TensorType) -> list[TensorType]:
    return [x] * len(spec.branches)


def _split_split(spec: SplitSpec, x: TensorType) -> list[TensorType]:
    return [x.with_channels(c) for c in split_sizes(spec, x.channels)]


PARALLEL = CompositeDef(
    ParallelSpec,
    branches=lambda spec: spec.branches,
    split=_parallel_split,
    join=_join,
    build=lambda spec, r, children: Parallel(children),
    fold=fold_parallel,
    cases=(Case({"branches": [{"type": "identity"}, {"type": "pooling"}]}, _MAPS),
           Case({"branches": [{"type": "dwconv", "kernel": 3}, {"type": "random_mixing"}]}, _TOKENS, id="tokens")),
)
SPLIT = CompositeDef(
    SplitSpec,
    branches=lambda spec: spec.branches,
    split=_split_split,
    join=_join,
    build=lambda spec, r, children: Split(split_sizes(spec, r.in_type.channels), channel_dim(r.in_type.layout),
                                          children),
    cases=(Case({"ratios": [0.625, 0.125, 0.125, 0.125],
                 "branches": [{"type": "identity"}, {"type": "dwconv", "kernel": 3},
                              {"type": "dwconv", "kernel": [1, 11]}, {"type": "dwconv", "kernel": [11, 1]}]},
                _MAPS, id="inception"),
           Case({"ratios": [0.5, 0.5], "branches": [{"type": "pooling"}, {"type": "identity"}]}, _MAPS, id="halves")),
)
