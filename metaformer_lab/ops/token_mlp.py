"""MLP token mixing over a fixed token count: MLP-Mixer's token MLP and ResMLP's token Linear."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaformer_lab.core.lazy_torch import Tensor, nn
from metaformer_lab.core.registry import Case, OpDef
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import Act, OpSpec, Ratio, act_layer, require_layout, require_no_prefix
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix

_TOKENS = TensorType("tokens", 8, 4, 5)
_MAPS = TensorType("maps", 8, 4, 5)


def _fixed_tokens_shape(op: str):
    def shape(spec: OpSpec, x: TensorType, out_dim: int | None) -> TensorType:
        require_layout(x, "maps", "tokens", op=op)
        require_no_prefix(x, op=op)
        return x

    return shape


class TokenMixing(nn.Module):
    """Applies ``fn`` along the token axis: (B, H, W, C) or (B, C, H, W) -> (B, C, N) -> fn -> back."""

    def _mix(self, x: Tensor, channels_last: bool) -> Tensor:
        if channels_last:
            B, H, W, C = x.shape
            y = self.mix(x.reshape(B, H * W, C).transpose(1, 2))  # (B, C, N) -> (B, C, N)
            return y.transpose(1, 2).reshape(B, H, W, C)
        B, C, H, W = x.shape
        return self.mix(x.reshape(B, C, H * W)).reshape(B, C, H, W)  # (B, C, N) -> same

    def mix(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class TokenMlpSpec(GridOpSpec):
    """MLP-Mixer's token-mixing MLP (timm ``MixerBlock.mlp_tokens``), applied across the N tokens."""

    type: Literal["token_mlp"] = "token_mlp"
    ratio: Ratio = Field(0.5, description="hidden width as a multiple of the channel count, as in MLP-Mixer")
    act: Act = "gelu"
    bias: bool = True


class TokenMlp(TokenMixing):
    def __init__(self, num_tokens: int, hidden: int, act: Act, bias: bool, channels_last: bool) -> None:
        super().__init__()
        from timm.layers import Mlp
        self.mlp = Mlp(num_tokens, hidden, act_layer=act_layer(act), bias=bias)
        self.channels_last = channels_last

    def mix(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._mix(x, self.channels_last)


class TokenLinearSpec(GridOpSpec):
    """ResMLP's token mixer: one Linear layer across the N tokens (timm ``ResBlock.linear_tokens``)."""

    type: Literal["token_linear"] = "token_linear"
    bias: bool = True


class TokenLinear(TokenMixing):
    def __init__(self, num_tokens: int, bias: bool, channels_last: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(num_tokens, num_tokens, bias=bias)
        self.channels_last = channels_last

    def mix(self, x: Tensor) -> Tensor:
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._mix(x, self.channels_last)


TOKEN_MLP = around_prefix(OpDef(
    TokenMlpSpec,
    infer=_fixed_tokens_shape("token_mlp"),
    build=lambda spec, r: TokenMlp(r.in_type.height * r.in_type.width, int(spec.ratio * r.in_type.channels),
                                   spec.act, spec.bias, r.in_type.layout == "tokens"),
    preserves_type=True,
    cases=(Case({}, _TOKENS), Case({"ratio": 2.0, "act": "silu"}, _MAPS, id="maps")),
))
TOKEN_LINEAR = around_prefix(OpDef(
    TokenLinearSpec,
    infer=_fixed_tokens_shape("token_linear"),
    build=lambda spec, r: TokenLinear(r.in_type.height * r.in_type.width, spec.bias, r.in_type.layout == "tokens"),
    preserves_type=True,
    cases=(Case({}, _TOKENS), Case({"bias": False}, _MAPS, id="maps")),
))
