"""T2T-ViT's soft split: overlapping kxk patches unfolded into tokens of width C*k*k (``nn.Unfold``), as a stem
and a downsampler; a Linear follows when the width asked differs (T2T's final ``project``). And T2T-ViT's whole
tokens-to-token module as a stem: soft splits with the width-changing token transformer between them."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, KernelInt, OpSpec, PosInt, Ratio, act_layer, require_layout
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.stems import default_padding, strided_conv_shape

_IMAGE = TensorType("maps", 3, 32, 32)
_MAPS = TensorType("maps", 4, 8, 6)


class SoftSplitStemSpec(OpSpec):
    """T2T's soft split: overlapping kxk patches unfolded into tokens of width C*k*k, then a Linear to the width
    asked when it differs (T2T-ViT's ``soft_split0``)."""

    type: Literal["soft_split"] = "soft_split"
    kernel: KernelInt = 7
    stride: KernelInt = 4
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")
    dim: PosInt | None = Field(None, description="output width; a Linear projects C*k*k to it when they differ; "
                               "default: the first stage's width")


class SoftSplitDownSpec(OpSpec):
    """T2T's soft split: overlapping kxk patches unfolded into tokens of width C*k*k, then a Linear to the width
    asked when it differs (T2T-ViT's ``soft_split1``, ``soft_split2`` + ``project``)."""

    type: Literal["soft_split"] = "soft_split"
    kernel: KernelInt = 3
    stride: KernelInt = 2
    padding: int | None = Field(None, ge=0, le=63, description="default: (kernel - stride + 1) // 2")


SoftSplitSpec = SoftSplitStemSpec | SoftSplitDownSpec


class SoftSplit(nn.Module):
    """``proj(unfold(x))``: each kxk patch of the maps is one token of width C*k*k, ordered (channel, row, col)
    as ``nn.Unfold`` orders it; ``proj`` is a Linear to the width asked, or nothing."""

    def __init__(self, kernel: int, stride: int, padding: int, grid: tuple[int, int], proj: nn.Module) -> None:
        super().__init__()
        self.soft_split = nn.Unfold(kernel, stride=stride, padding=padding)
        self.grid = grid
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H', W', C')
        x = self.soft_split(x).transpose(1, 2)  # (B, H'*W', C*k*k)
        return self.proj(x.unflatten(1, self.grid))  # (B, H', W', C*k*k) -> (B, H', W', C')


def _padding(spec: SoftSplitSpec) -> int:
    return default_padding(spec.kernel, spec.stride) if spec.padding is None else spec.padding


def _soft_split_shape(spec: SoftSplitSpec, x: TensorType, dim: int) -> TensorType:
    require_layout(x, "maps", op="soft_split")
    maps = strided_conv_shape(x, dim, spec.kernel, spec.stride, _padding(spec), {})
    return TensorType("tokens", dim, maps.height, maps.width)


def _build_soft_split(spec: SoftSplitSpec, r: Resolved) -> nn.Module:
    x, out = r.in_type, r.out_type
    width = x.channels * spec.kernel**2
    proj = nn.Identity() if width == out.channels else nn.Linear(width, out.channels)
    return SoftSplit(spec.kernel, spec.stride, _padding(spec), (out.height, out.width), proj)


class T2TSpec(OpSpec):
    """T2T-ViT's tokens-to-token module: soft splits, each but the last followed by a token transformer that
    narrows the tokens to token_dim, the last one projected to the stem's width."""

    type: Literal["t2t"] = "t2t"
    key_optional = frozenset({"attention", "kernel_ratio"})
    kernels: list[KernelInt] = Field(default_factory=lambda: [7, 3, 3], min_length=2, max_length=6,
                                     description="kernel of each soft split")
    strides: list[KernelInt] = Field(default_factory=lambda: [4, 2, 2], min_length=2, max_length=6,
                                     description="stride of each soft split (one entry per kernel); padding: "
                                     "(kernel - stride + 1) // 2")
    token_dim: PosInt = Field(64, description="width of the tokens between the splits (the token transformers' "
                              "output)")
    attention: Literal["transformer", "performer"] = Field(
        "transformer", description="the token transformers' attention: transformer = softmax attention (T2T-ViT-t's "
        "Token_transformer); performer = T2T's random-feature attention (Token_performer: its kqv Linear, in that "
        "order, and a fixed orthogonal feature matrix w, a buffer)")
    kernel_ratio: Ratio = Field(0.5, description="performer only: random features m = int(kernel_ratio * token_dim)")
    mlp_ratio: Ratio = Field(1.0, description="hidden width of the token transformers' MLP = int(ratio * token_dim)")
    act: Act = "gelu"
    qkv_bias: bool = False
    norm: NormSpec = Field(default_factory=lambda: LayerNormSpec(eps=1e-5), description="the token transformers' "
                           "two norms")
    dim: PosInt | None = Field(None, description="output width; default: the first stage's width")


class TokenAttention(nn.Module):
    """T2T's single-head attention whose values are narrower than its input, with the residual around the values:
    ``v + proj(softmax(q kᵀ * scale) v)``; the scale is the input width's ``** -0.5``, as T2T-ViT has it."""

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)
        self.scale = dim**-0.5

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C')
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, 1 head, N, C')
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, 1, N, C')
        return v.squeeze(1) + self.proj(out.squeeze(1))


class TokenPerformer(nn.Module):
    """T2T's single-head Performer attention (``Token_performer.single_attn``) whose values are narrower than its
    input, with the residual around the values: ``v + proj(phi(q) (phi(k)ᵀ v) / (phi(q) sum_t phi(k) + 1e-8))``, with
    the positive random features ``phi(x) = exp(x wᵀ - |x|² / 2) / sqrt(m)`` of a fixed (m, C') matrix ``w``
    (orthogonal rows times sqrt(m), drawn at build, kept as a buffer: it is the model's, but no parameter)."""

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool, kernel_ratio: float) -> None:
        super().__init__()
        self.kqv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)
        self.m = max(1, int(out_dim * kernel_ratio))
        w = torch.empty(self.m, out_dim)
        if w.device.type != "meta":
            w = nn.init.orthogonal_(w) * math.sqrt(self.m)
        self.register_buffer("w", w)

    def features(self, x: Tensor) -> Tensor:  # (B, N, C') -> (B, N, m)
        return torch.exp(x @ self.w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C')
        k, q, v = self.kqv(x).chunk(3, dim=-1)
        kp, qp = self.features(k), self.features(q)  # (B, N, m)
        norm = qp @ kp.sum(1).unsqueeze(-1)  # (B, N, 1)
        y = qp @ (kp.transpose(1, 2) @ v) / (norm + 1e-8)  # (B, N, m) @ (B, m, C') -> (B, N, C')
        return v + self.proj(y)


class TokenTransformer(nn.Module):
    """T2T's ``Token_transformer`` (or ``Token_performer``) on tokens (B, H, W, C): ``y = attn(norm1(x))`` (width
    C -> C', see :class:`TokenAttention`, :class:`TokenPerformer`), then ``y + mlp(norm2(y))``."""

    def __init__(self, norm1: nn.Module, attn: TokenAttention | TokenPerformer, norm2: nn.Module,
                 mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        x = self.attn(self.norm1(x).flatten(1, 2)).unflatten(1, x.shape[1:3])  # (B, H*W, C') -> (B, H, W, C')
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft splits with a token transformer after each but the last, whose tokens go back to maps for the next
    split; the last split's tokens are projected by a Linear."""

    def __init__(self, splits: list[nn.Unfold], attentions: list[TokenTransformer], project: nn.Linear,
                 grids: list[tuple[int, int]]) -> None:
        super().__init__()
        self.soft_splits = nn.ModuleList(splits)
        self.attentions = nn.ModuleList(attentions)
        self.project = project
        self.grids = grids

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H', W', C')
        for split, attention, grid in zip(self.soft_splits[:-1], self.attentions, self.grids[:-1], strict=True):
            x = split(x).transpose(1, 2).unflatten(1, grid)  # (B, C*k*k, h*w) -> (B, h, w, C*k*k)
            x = attention(x).permute(0, 3, 1, 2)  # (B, h, w, token_dim) -> (B, token_dim, h, w)
        x = self.soft_splits[-1](x).transpose(1, 2)  # (B, H'*W', token_dim*k*k)
        return self.project(x).unflatten(1, self.grids[-1])  # (B, H', W', C')


def _t2t_types(spec: T2TSpec, x: TensorType) -> list[TensorType]:
    """The tokens each soft split gives, at their full width C*k*k."""
    if len(spec.strides) != len(spec.kernels):
        raise ShapeIssue("strides", f"needs {len(spec.kernels)} entries (one per kernel), got {len(spec.strides)}")
    require_layout(x, "maps", op="t2t")
    types = []
    for i, (kernel, stride) in enumerate(zip(spec.kernels, spec.strides, strict=True)):
        channels = x.channels * kernel**2
        try:
            x = strided_conv_shape(x, channels, kernel, stride, default_padding(kernel, stride), {})
        except ShapeIssue as issue:
            raise ShapeIssue(f"kernels[{i}]", issue.message) from None
        types.append(TensorType("tokens", channels, x.height, x.width))
        x = x.with_channels(spec.token_dim)
    for t in types[:-1]:  # the token transformers' norms, before and after the attention
        check_norm(spec.norm, t, "norm")
        check_norm(spec.norm, t.with_channels(spec.token_dim), "norm")
    return types


def _t2t_shape(spec: T2TSpec, x: TensorType, dim: int) -> TensorType:
    return _t2t_types(spec, x)[-1].with_channels(dim)


def _build_t2t(spec: T2TSpec, r: Resolved) -> nn.Module:
    from timm.layers import Mlp

    types = _t2t_types(spec, r.in_type)
    pairs = zip(spec.kernels, spec.strides, strict=True)
    splits = [nn.Unfold(kernel, stride=stride, padding=default_padding(kernel, stride)) for kernel, stride in pairs]
    attentions = []
    for t in types[:-1]:
        if spec.attention == "performer":
            attn: TokenAttention | TokenPerformer = TokenPerformer(t.channels, spec.token_dim, spec.qkv_bias,
                                                                   spec.kernel_ratio)
        else:
            attn = TokenAttention(t.channels, spec.token_dim, spec.qkv_bias)
        mlp = Mlp(spec.token_dim, int(spec.mlp_ratio * spec.token_dim), act_layer=act_layer(spec.act))
        norm2 = build_norm(spec.norm, t.with_channels(spec.token_dim))
        attentions.append(TokenTransformer(build_norm(spec.norm, t), attn, norm2, mlp))
    project = nn.Linear(types[-1].channels, r.out_dim)
    return T2TModule(splits, attentions, project, [(t.height, t.width) for t in types])


SOFT_SPLIT_STEM = OpDef(SoftSplitStemSpec, _soft_split_shape, _build_soft_split,
                        cases=(Case({}, _IMAGE, 3 * 49), Case({"kernel": 4, "stride": 4}, _IMAGE, 16, id="proj")))
SOFT_SPLIT_DOWN = OpDef(SoftSplitDownSpec, _soft_split_shape, _build_soft_split, accepts=("maps",),
                        cases=(Case({}, _MAPS, 4 * 9), Case({"kernel": 2, "padding": 0}, _MAPS, 12, id="proj")))
T2T = OpDef(T2TSpec, _t2t_shape, _build_t2t,
             cases=(Case({"token_dim": 8}, TensorType("maps", 3, 64, 64), 16),
                    Case({"kernels": [3, 3], "strides": [2, 2], "token_dim": 4, "mlp_ratio": 2.0, "qkv_bias": True},
                         _IMAGE, 12, id="two"),
                    Case({"kernels": [3, 3], "strides": [2, 2], "token_dim": 8, "attention": "performer",
                          "qkv_bias": True}, _IMAGE, 12, id="performer")))
