"""What every op file shares: the config base class, bounded field types, activations, layout helpers.

The op files import timm inside the functions that build modules, never at module level: the first
``from timm.layers import ...`` runs timm's ``__init__``, which imports every timm model (about 2 s), and
checking a spec (``validate``, ``space size``) needs only the config classes and shape rules.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import ChannelAffine, Folding
from metaformer_lab.core.types import Layout, TensorType

# Upper bounds keep a typo from asking for a model that cannot be built (a mutation test relies on it).
MAX_DIM = 16384
MAX_KERNEL = 63
MAX_SIZE = 4096


LATENCY_KEY = "latency_key"
"""Serialisation context flag (``model_dump_json(context={LATENCY_KEY: True})``) for latency keys."""


class OpSpec(BaseModel):
    """Base of every op config: unknown keys are errors, values are not coerced, instances are frozen.

    ``key_optional`` lists options added after the shipped latency profiles were recorded: a latency key
    (serialised with the :data:`LATENCY_KEY` context) leaves them out while they hold their default, so an
    existing config keeps its key and the profiles still match it. A base class's list holds in its subclasses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    key_optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _serialise(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        optional = _key_optional(type(self))
        if isinstance(data, dict) and optional and (info.context or {}).get(LATENCY_KEY):
            fields = type(self).model_fields
            for name in optional:
                if getattr(self, name) == fields[name].get_default(call_default_factory=True):
                    data.pop(name, None)
        return data


@functools.cache
def _key_optional(cls: type[OpSpec]) -> frozenset[str]:
    """``key_optional`` of a config class and of its bases (a base's options stay optional in a subclass that
    lists its own)."""
    return frozenset().union(*(c.__dict__.get("key_optional", ()) for c in cls.__mro__))


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise PydanticCustomError("odd", "{value} must be odd", {"value": value})
    return value


def _pair(value: int | list[int]) -> int | list[int]:
    if isinstance(value, list) and len(value) != 2:
        raise PydanticCustomError("pair", "expected one integer or a list of two, got {n} items", {"n": len(value)})
    return value


PosInt = Annotated[int, Field(ge=1, le=MAX_DIM)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_DIM)]
KernelInt = Annotated[int, Field(ge=1, le=MAX_KERNEL)]
OddKernel = Annotated[int, Field(ge=1, le=MAX_KERNEL), AfterValidator(_odd)]
Kernel2d = Annotated[KernelInt | list[KernelInt], AfterValidator(_pair)]
Ratio = Annotated[float, Field(gt=0.0, le=64.0)]
Prob = Annotated[float, Field(ge=0.0, lt=1.0)]
Eps = Annotated[float, Field(gt=0.0, le=1.0)]


def pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


# ---------------------------------------------------------------------------------------------
# activations

Act = Literal[
    "gelu", "gelu_tanh", "quick_gelu", "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
    "mish", "star_relu", "squared_relu", "identity",
]

@functools.cache
def _acts() -> dict[str, Callable[[], nn.Module]]:
    """Activation name -> layer factory; built on first use, when a module is built (it needs timm)."""
    from timm.layers import QuickGELU
    from timm.models.metaformer import SquaredReLU, StarReLU

    return {
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "quick_gelu": QuickGELU,
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "silu": nn.SiLU,
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6 (MobileNetV3's h_sigmoid)
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "mish": nn.Mish,
        "star_relu": StarReLU,  # s * relu(x)^2 + b with learnable scalars (MetaFormer baselines)
        "squared_relu": SquaredReLU,
        "identity": nn.Identity,
    }


def make_act(name: Act) -> nn.Module:
    return _acts()[name]()


def act_layer(name: Act) -> Any:
    """A zero-argument layer factory, for timm.layers classes that take ``act_layer=`` (typed there as a
    class; a factory works the same)."""
    return _acts()[name]


# ---------------------------------------------------------------------------------------------
# layouts

def require_layout(x: TensorType, *allowed: Layout, op: str) -> None:
    if x.layout not in allowed:
        want = " or ".join(f"'{a}'" for a in allowed)
        raise ShapeIssue("type", f"{op} needs layout {want}, but it gets '{x.layout}'")


def require_no_prefix(x: TensorType, op: str) -> None:
    if x.prefix:
        raise ShapeIssue("type", f"{op} works on the token grid only, but the input has {x.prefix} prefix token(s)")


def require_divides(field: str, value: int, x: TensorType, what: str | None = None) -> None:
    """``value`` (a window, a stride: ``field``'s, or ``what`` names it) must divide both sides of ``x``'s grid."""
    if x.height % value or x.width % value:
        raise ShapeIssue(field, f"{what or value} does not divide the {x.height}x{x.width} feature map")


def require_groups(groups: int, field: str = "groups", **widths: int) -> None:
    """A grouped conv's ``groups`` must divide each of its widths (``input=16, output=32``)."""
    for name, width in widths.items():
        if width % groups:
            raise ShapeIssue(field, f"{groups} does not divide the conv's {width} {name} channels")


Groups = Annotated[int, Field(ge=1, le=MAX_DIM)]
DwGroups = Annotated[int | None, Field(ge=1, le=MAX_DIM)]


def require_grid(x: TensorType, op: str) -> None:
    """Ops that work on the token grid need one (a prefix-only view, as in class attention, has none)."""
    if x.height * x.width == 0:
        raise ShapeIssue("type", f"{op} needs the token grid, but it gets the prefix tokens only")


def split_prefix(x: Tensor, prefix: int, grid: tuple[int, int]) -> tuple[Tensor | None, Tensor]:
    """Tokens -> (prefix tokens (B, P, C) or None, grid tokens (B, H, W, C))."""
    if prefix == 0:
        return None, x
    return x[:, :prefix], x[:, prefix:].unflatten(1, grid)  # (B, P, C), (B, H, W, C)


def join_prefix(prefix: Tensor | None, grid: Tensor) -> Tensor:
    """Inverse of :func:`split_prefix`."""
    if prefix is None:
        return grid
    return torch.cat([prefix, grid.flatten(1, 2)], dim=1)  # (B, P + H*W, C)


class ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H, W, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ToMaps(nn.Module):
    """(B, H, W, C) -> (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def layout_change(src: TensorType, dst: Layout) -> nn.Module:
    """The module converting ``src`` to layout ``dst`` (the caller checked the change is possible)."""
    if (src.layout, dst) == ("maps", "tokens"):
        return ToTokens()
    if (src.layout, dst) == ("tokens", "maps"):
        return ToMaps()
    raise ValueError(f"no layout change from {src.layout} to {dst}")


def layout_change_problem(src: TensorType, dst: Layout) -> str | None:
    """Why ``src`` cannot become layout ``dst``, or None when it can."""
    if src.layout == dst:
        return None
    if src.layout == "vector" or dst == "vector":
        return f"cannot turn {src.layout} into {dst}"
    if src.prefix:
        return f"cannot turn tokens with {src.prefix} prefix token(s) into maps"
    return None


def pointwise(layout: Layout, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    """A per-position channel projection in ``layout``: a 1x1 conv on maps (B, C, H, W), a Linear on tokens."""
    if layout == "maps":
        return nn.Conv2d(in_channels, out_channels, 1, bias=bias)
    return nn.Linear(in_channels, out_channels, bias=bias)


def channel_dim(layout: Layout) -> int:
    return 1 if layout == "maps" else -1


# ---------------------------------------------------------------------------------------------
# small shared modules


class LayerScale(nn.Module):
    """Per-channel learnable scale (layer scale on a branch, res scale on a shortcut).

    The parameter has shape (C,) in every layout, so checkpoints move between layouts unchanged.
    """

    def __init__(self, dim: int, init: float, layout: Layout) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))
        self.maps = layout == "maps"

    def forward(self, x: Tensor) -> Tensor:
        if self.maps:
            return x * self.scale.view(-1, 1, 1)
        return x * self.scale


def fold_layer_scale(module: nn.Module) -> Folding | None:
    """A layer scale ``gamma * f(x)`` folds into f's last linear, a res scale into its shortcut's conv: the
    scale is nothing but a per-channel affine (without a shift). It also takes a scale on its input."""
    if isinstance(module, LayerScale):
        return Folding(reads=(module,), affine=ChannelAffine(module.scale, None, rest=nn.Identity(), source=module))
    return None


def truncated_normal_(tensor: Tensor, std: float, bound: float = 2.0) -> Tensor:
    """timm's ``trunc_normal_(tensor, std=std, a=-bound, b=bound)``, sampled faster where it can be.

    timm truncates at an absolute +-2, which for std .02 is 100 standard deviations: the truncation
    removes no measurable mass, so a clamped normal is the same distribution (and 25 % faster than
    inverse-CDF sampling). Narrower bounds (under 6 std) use timm's exact sampler.
    """
    if bound >= 6 * std:
        with torch.no_grad():
            return tensor.normal_(0.0, std).clamp_(-bound, bound)
    from timm.layers import trunc_normal_

    return trunc_normal_(tensor, std=std, a=-bound, b=bound)


INITIALISED = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""The modules whose weight and bias :func:`init_weights` sets."""


def init_weights(module: nn.Module) -> None:
    """timm's default for MetaFormer-family models: truncated normal (std .02) weights, zero biases.

    Modules with their own scheme define ``init_weights()``; it runs after this one.
    """
    if isinstance(module, INITIALISED):
        truncated_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def conv_on_heads(conv: Callable[[Tensor], Tensor], v: Tensor, grid: tuple[int, int]) -> Tensor:
    """A depthwise conv over the value map (LePE, local context enhancement): (B, heads, h*w, d) values ->
    the conv of their (B, heads*d, h, w) map, back in the values' shape; channels are head-major, as in CSWin's
    and Shunted's ``v.transpose(1, 2).reshape(B, N, C)``."""
    heads, d = v.shape[1], v.shape[3]
    maps = v.transpose(1, 2).flatten(2).transpose(1, 2).unflatten(2, grid)  # (B, heads*d, h, w)
    out = conv(maps).flatten(2).transpose(1, 2)  # (B, h*w, heads*d)
    return out.unflatten(-1, (heads, d)).transpose(1, 2)  # (B, heads, h*w, d)


def traced() -> bool:
    """Whether the call is being traced: by torch.compile, torch.export, torch.fx, torch.jit or the TorchScript
    ONNX exporter (traced tensors have no storage, and a value kept between calls would become a constant of the
    trace)."""
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or is_fx_symbolic_tracing()
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def inference_key(*tensors: Tensor) -> tuple[object, ...] | None:
    """A key under which a value computed from ``tensors`` alone (no input) may be kept between calls, or None
    where it must be computed afresh: with autograd on (the value needs its graph), while :func:`traced`, or for a
    tensor made under ``torch.inference_mode`` (no version counter to tell an in-place change). The key changes
    with any tensor's storage, version or dtype."""
    if torch.is_grad_enabled() or traced():
        return None
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
