"""Focal modulation (Yang et al., "Focal Modulation Networks", NeurIPS 2022): a token mixer that
gathers context with a stack of growing depthwise convs plus a global average, gates each level per
position, and modulates a query projection with the aggregate (``y = q(x) * h(sum_l g_l * z_l)``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import (
    MAX_KERNEL,
    Act,
    OddKernel,
    Prob,
    make_act,
    require_layout,
    require_no_prefix,
)
from metaformer_lab.ops.norms import NormSpec, build_norm, check_norm
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix


def _even(value: int) -> int:
    if value % 2:
        raise PydanticCustomError("even", "{value} must be even (every level's kernel stays odd)", {"value": value})
    return value


EvenInt = Annotated[int, Field(ge=0, le=MAX_KERNEL), AfterValidator(_even)]


class FocalModulationSpec(GridOpSpec):
    """Focal modulation (timm ``focalnet.FocalModulation``).

    A 1x1 projection gives the query q, the context z_0 and L + 1 gates. Level l (0-based) applies a
    depthwise conv of kernel ``focal_window + focal_factor * l`` and the activation to the previous
    level's context; a global average of the last level is level L. The gated sum of the levels goes
    through a 1x1 "modulator" h, multiplies q, and a 1x1 projection gives the output.
    """

    type: Literal["focal_modulation"] = "focal_modulation"
    focal_level: int = Field(2, ge=1, le=8, description="number of depthwise-conv context levels L "
                                                         "(the global level comes on top)")
    focal_window: OddKernel = Field(3, description="kernel of the first level")
    focal_factor: EvenInt = Field(2, description="kernel growth per level")
    bias: bool = Field(True, description="bias of the input projection and the modulator h")
    act: Act = Field("gelu", description="after each level's conv and on the global context")
    normalize_modulator: bool = Field(False, description="divide the gated context sum by L + 1")
    post_norm: NormSpec | None = Field(None, description="norm on q * h(context), before the output projection "
                                                         "(timm's use_post_norm_in_modulation)")
    proj_drop: Prob = 0.0


def _kernels(spec: FocalModulationSpec) -> list[int]:
    return [spec.focal_window + spec.focal_factor * level for level in range(spec.focal_level)]


class FocalLevel(nn.Module):
    """One context level: depthwise conv (no bias), then the activation."""

    def __init__(self, dim: int, kernel: int, act: Act) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.act = make_act(act)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.act(self.dw(x))


class FocalModulation(nn.Module):
    """Focal modulation on maps (1x1 convs) or on channels-last tokens (Linear layers).

    Module names: ``proj_in`` (timm ``f``), ``levels.l.dw`` (``focal_layers.l.0``), ``modulator``
    (``h``), ``post_norm`` (``norm``), ``proj``.
    """

    def __init__(self, dim: int, kernels: list[int], bias: bool, act: Act, normalize_modulator: bool,
                 post_norm: nn.Module, proj_drop: float, channels_last: bool) -> None:
        super().__init__()
        self.dim, self.focal_level = dim, len(kernels)
        self.normalize_modulator, self.channels_last = normalize_modulator, channels_last
        out = 2 * dim + self.focal_level + 1
        self.proj_in = nn.Linear(dim, out, bias=bias) if channels_last else nn.Conv2d(dim, out, 1, bias=bias)
        self.levels = nn.ModuleList([FocalLevel(dim, k, act) for k in kernels])
        self.act = make_act(act)
        self.modulator = nn.Linear(dim, dim, bias=bias) if channels_last else nn.Conv2d(dim, dim, 1, bias=bias)
        self.post_norm = post_norm
        self.proj = nn.Linear(dim, dim) if channels_last else nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def context(self, ctx: Tensor, gates: Tensor) -> Tensor:
        """Gated sum of the levels, on maps: ctx (B, C, H, W), gates (B, L + 1, H, W) -> (B, C, H, W).

        timm's order of operations (a running sum from 0, levels first, global last) for exact parity.
        """
        ctx_all: Tensor | float = 0.0
        for level, focal in enumerate(self.levels):
            ctx = focal(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))  # (B, C, 1, 1)
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        return ctx_all  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # (B, H, W, 2C + L + 1) -> (B, 2C + L + 1, H, W)
        q, ctx, gates = torch.split(x, [self.dim, self.dim, self.focal_level + 1], dim=1)
        ctx_all = self.context(ctx, gates)  # (B, C, H, W)
        if self.channels_last:
            q, ctx_all = q.permute(0, 2, 3, 1), ctx_all.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = self.post_norm(q * self.modulator(ctx_all))
        return self.proj_drop(self.proj(x))


def focal_modulation_shape(spec: FocalModulationSpec, x: TensorType, out_dim: int | None) -> TensorType:
    require_layout(x, "maps", "tokens", op="focal_modulation")
    require_no_prefix(x, op="focal_modulation")
    if _kernels(spec)[-1] > MAX_KERNEL:
        raise ShapeIssue("focal_level", f"the last level's kernel {_kernels(spec)[-1]} exceeds {MAX_KERNEL}")
    check_norm(spec.post_norm, x, "post_norm")
    return x


def _build_focal_modulation(spec: FocalModulationSpec, r: Resolved) -> nn.Module:
    x = r.in_type
    return FocalModulation(x.channels, kernels=_kernels(spec), bias=spec.bias, act=spec.act,
                           normalize_modulator=spec.normalize_modulator, post_norm=build_norm(spec.post_norm, x),
                           proj_drop=spec.proj_drop, channels_last=x.layout == "tokens")


def fold_focal_modulation(module: nn.Module) -> Folding | None:
    """proj_in reads the input, proj writes the output."""
    if isinstance(module, FocalModulation):
        return Folding(reads=(module.proj_in,), writes=module.proj)
    return None


FOCAL_MODULATION = around_prefix(OpDef(
    FocalModulationSpec,
    infer=focal_modulation_shape,
    build=_build_focal_modulation,
    preserves_type=True,
    fold=fold_focal_modulation,
    cases=(
        Case({}, TensorType("maps", 8, 6, 5)),
        Case({"focal_level": 3, "focal_window": 5, "normalize_modulator": True,
              "post_norm": {"type": "layernorm", "eps": 1e-5}}, TensorType("maps", 8, 6, 5), id="lrf-post-norm"),
        Case({"focal_level": 1, "bias": False, "act": "relu"}, TensorType("tokens", 8, 4, 5), id="tokens"),
    ),
))
