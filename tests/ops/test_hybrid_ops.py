"""The conv-attention hybrids' ops against the timm modules they reproduce (same weights, perturbed first,
BatchNorm statistics included): MBConv (timm ``maxxvit.MbConvBlock``, ``efficientvit_mit.MBConv`` and
``DSConv``), the pool shortcut (``maxxvit.Downsample2d``), relative-position-bias attention on maps
(``maxxvit.Attention2d`` + ``RelPosBias``), multi-scale linear attention (``efficientvit_mit.LiteMLA``), the
conv + MLP head (``efficientvit_mit.ClassifierHead``), and the ``plain`` (no residual) block template."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, port
from timm.layers import RelPosBias
from timm.models import efficientvit_mit as evit
from timm.models.maxxvit import Attention2d, Downsample2d, MaxxVitConvCfg, MbConvBlock, _rw_coat_cfg
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue, SpecError
from metaformer_lab.core.registry import Registry
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import CHANNEL_MIXERS, DOWNSAMPLERS, HEADS, TOKEN_MIXERS

TOL = 1e-5
B = 2


def _op(registry: Registry, tag: str, config: dict[str, Any], x: TensorType,
        *extra: int) -> tuple[nn.Module, TensorType]:
    """The op (shared ``build_op``) and the type its shape rule gives, which these tests check the output against."""
    out_type = registry.get(tag).resolve(op_spec(registry, tag, config), x, *extra).out_type
    return build_op(registry, tag, config, x, *extra), out_type


# --- MBConv -------------------------------------------------------------------------------------

_MAXXVIT_MBCONV = [
    (r"^pre_norm\.", "pre_norm."), (r"^conv1_1x1\.", "expand_conv."), (r"^norm1\.", "expand_norm."),
    (r"^conv2_kxk\.", "dw_conv."), (r"^se_early\.", "se."), (r"^se\.", "se."), (r"^norm2\.", "dw_norm."),
    (r"^conv3_1x1\.", "project_conv."),
]
_WITH_SHORTCUT = [(r"^shortcut\.expand\.", "shortcut.proj."), *[(p, "mixer." + r) for p, r in _MAXXVIT_MBCONV]]
_COATNET_RW = {"stride_mode": "pool", "divisor": 8, "pre_norm": {"type": "batchnorm"}, "pre_act": "silu",
               "se_ratio": 0.25, "se_early": True}


class _WithShortcut(nn.Module):
    """``shortcut(x) + mixer(x)``: the residual a metaformer block with a ``shortcut`` computes."""

    def __init__(self, mixer: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.mixer, self.shortcut = mixer, shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.mixer(x)


@pytest.mark.parametrize(("dim", "out_dim", "stride"), [(16, 16, 1), (16, 24, 2)], ids=["s1", "down"])
@pytest.mark.parametrize("early", [True, False], ids=["se-early", "se-late"])
def test_mbconv_matches_timm_coatnet_rw_mbconv_block(dim: int, out_dim: int, stride: int, early: bool) -> None:
    cfg = _rw_coat_cfg(conv_attn_early=early)["conv_cfg"]
    ref = MbConvBlock(dim, out_dim, stride=stride, cfg=cfg)
    x_type = TensorType("maps", dim, 8, 6)
    config = {**_COATNET_RW, "se_early": early, "stride": stride, "out_dim": out_dim}
    mixer, out_type = _op(TOKEN_MIXERS, "mbconv", config, x_type)
    shortcut: nn.Module = nn.Identity()
    if stride > 1:
        shortcut, short_type = _op(DOWNSAMPLERS, "pool", {"bias": False}, x_type, out_dim)
        assert short_type == out_type
    ours = port(ref, _WithShortcut(mixer, shortcut), _WITH_SHORTCUT)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert tuple(y.shape) == out_type.shape(B)
        assert max_diff(y, ref(x)) <= TOL


def test_mbconv_expand_from_out_matches_timm_maxxvit_defaults() -> None:
    cfg = MaxxVitConvCfg()  # expansion from the output width, SE after norm2, GELU, dw stride
    ref = MbConvBlock(16, 24, stride=2, cfg=cfg)
    x_type = TensorType("maps", 16, 8, 8)
    config = {"expand_from": "out", "divisor": 8, "stride": 2, "out_dim": 24, "pre_norm": {"type": "batchnorm"},
              "act": "gelu", "se_ratio": 0.25, "se_from": "out", "se_act": "silu", "out_bias": True}
    mixer, _ = _op(TOKEN_MIXERS, "mbconv", config, x_type)
    shortcut, _ = _op(DOWNSAMPLERS, "pool", {}, x_type, 24)
    ours = port(ref, _WithShortcut(mixer, shortcut), _WITH_SHORTCUT)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


_EFFICIENTVIT_MBCONV = [
    (r"^inverted_conv\.conv\.", "expand_conv."), (r"^inverted_conv\.norm\.", "expand_norm."),
    (r"^depth_conv\.conv\.", "dw_conv."), (r"^depth_conv\.norm\.", "dw_norm."),
    (r"^point_conv\.conv\.", "project_conv."), (r"^point_conv\.norm\.", "project_norm."),
]


@pytest.mark.parametrize("fewer_norm", [False, True], ids=["bn", "fewer-norm"])
@pytest.mark.parametrize(("out_dim", "stride"), [(16, 1), (24, 2)], ids=["s1", "down"])
def test_mbconv_matches_timm_efficientvit_mbconv(fewer_norm: bool, out_dim: int, stride: int) -> None:
    ref = evit.build_local_block(16, out_dim, stride=stride, expand_ratio=4, norm_layer=nn.BatchNorm2d,
                                 act_layer=nn.Hardswish, fewer_norm=fewer_norm)
    x_type = TensorType("maps", 16, 7, 6)
    config = {"stride": stride, "out_dim": out_dim, "act": "hardswish", "out_norm": {"type": "batchnorm"}}
    if fewer_norm:
        config |= {"norm": None, "hidden_bias": True}
    ours, out_type = _op(TOKEN_MIXERS, "mbconv", config, x_type)
    ours = port(ref, ours, _EFFICIENTVIT_MBCONV)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert tuple(y.shape) == out_type.shape(B)
        assert max_diff(y, ref(x)) <= TOL


def test_mbconv_without_expansion_matches_timm_dsconv() -> None:
    ref = evit.build_local_block(8, 8, stride=1, expand_ratio=1, norm_layer=nn.BatchNorm2d, act_layer=nn.Hardswish)
    assert isinstance(ref, evit.DSConv)
    x_type = TensorType("maps", 8, 6, 6)
    config = {"expand": False, "ratio": 1.0, "act": "hardswish", "out_norm": {"type": "batchnorm"}}
    ours, _ = _op(TOKEN_MIXERS, "mbconv", config, x_type)
    ours = port(ref, ours, _EFFICIENTVIT_MBCONV)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


def test_mbconv_is_also_a_channel_mixer() -> None:
    x_type = TensorType("maps", 8, 4, 4)
    ours, out = _op(CHANNEL_MIXERS, "mbconv", {"act": "hardswish"}, x_type)
    assert out == x_type
    assert tuple(ours(torch.randn(x_type.shape(B))).shape) == x_type.shape(B)


class _LocalityFfn(nn.Module):
    """LocalViT's ``LocalityFeedForward`` branch (ofsoundof/LocalViT models/localvit.py, act 'hs+se'), on the
    token grid of a sequence whose class token it leaves out (the authors' Block adds it back unchanged)."""

    def __init__(self, dim: int, hidden: int, reduction: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.Hardswish())
        self.se = nn.Sequential(nn.Linear(hidden, hidden // reduction), nn.ReLU(), nn.Linear(hidden // reduction,
                                                                                            hidden), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: Tensor, side: int) -> Tensor:  # (B, 1 + side*side, C) -> same, class token zero
        grid = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        y = self.conv(grid)
        y = y * self.se(y.mean((2, 3)))[:, :, None, None]
        y = self.project(y).flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(x[:, :1]), y], dim=1)


def test_mbconv_with_a_hardsigmoid_se_matches_localvits_ffn_around_the_class_token() -> None:
    ref = _LocalityFfn(8, 32, reduction=8)
    for bn in (m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    ref.eval()
    x_type = TensorType("tokens", 8, 5, 5, prefix=1)
    config = {"prefix": "zero", "act": "hardswish", "out_norm": {"type": "batchnorm"}, "se_ratio": 0.125,
              "se_gate": "hardsigmoid"}
    ours, out = _op(CHANNEL_MIXERS, "mbconv", config, x_type)
    assert out == x_type
    keys = ("expand_conv", "expand_norm", "dw_conv", "dw_norm", "se.fc1", "se.fc2", "project_conv",
            "project_norm")
    refs = (ref.conv[0], ref.conv[1], ref.conv[3], ref.conv[4], ref.se[0], ref.se[2], ref.project[0],
            ref.project[1])
    mine = ours.state_dict()
    with torch.no_grad():
        for key, module in zip(keys, refs, strict=True):
            for name, value in module.state_dict().items():
                mine[f"op.{key}.{name}"].copy_(value.reshape(mine[f"op.{key}.{name}"].shape))
        ours.eval()
        x = torch.randn(x_type.shape(B))
        assert max_diff(ours(x), ref(x, 5)) <= TOL


@pytest.mark.parametrize(("config", "field"), [
    ({"expand": False, "ratio": 4.0}, "ratio"),
    ({"stride": 16, "stride_mode": "pool"}, "stride"),
])
def test_mbconv_shape_rule_rejects(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("mbconv").resolve(op_spec(TOKEN_MIXERS, "mbconv", config), TensorType("maps", 8, 6, 6))
    assert err.value.field == field


# --- pool shortcut --------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_pool_downsampler_matches_timm_downsample2d(bias: bool) -> None:
    ref = Downsample2d(16, 32, pool_type="avg2", bias=bias)
    x_type = TensorType("maps", 16, 8, 6)
    ours, out = _op(DOWNSAMPLERS, "pool", {"bias": bias}, x_type, 32)
    ours = port(ref, ours, [(r"^expand\.", "proj.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert tuple(y.shape) == out.shape(B)
        assert torch.equal(y, ref(x))


# --- relative-position-bias attention -------------------------------------------------------------

class _Pooled(nn.Module):
    """timm's TransformerBlock2d attention branch after its norm: Downsample2d, then Attention2d."""

    def __init__(self, down: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.down, self.attn = down, attn

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.down(x))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize(("out_dim", "stride", "expand_first"), [(32, 1, False), (48, 2, False), (48, 2, True)],
                         ids=["s1", "down", "down-expand-first"])
def test_rel_pos_attention_matches_timm_attention2d(fused: bool, out_dim: int, stride: int,
                                                    expand_first: bool) -> None:
    x_type = TensorType("maps", 32, 8, 6)
    grid = (x_type.height // stride, x_type.width // stride)
    attn = Attention2d(32, out_dim, dim_head=8, expand_first=expand_first,
                       rel_pos_cls=partial(RelPosBias, window_size=grid))
    attn.fused_attn = fused
    ref = _Pooled(Downsample2d(32, 32, pool_type="avg2") if stride > 1 else nn.Identity(), attn)
    config = {"head_dim": 8, "stride": stride, "out_dim": out_dim, "expand_first": expand_first, "fused": fused}
    ours, out_type = _op(TOKEN_MIXERS, "rel_pos_attention", config, x_type)
    assert ours.relative_position_bias_table.shape == ((2 * grid[0] - 1) * (2 * grid[1] - 1), attn.num_heads)
    ours = port(ref, ours, [(r"^attn\.rel_pos\.", ""), (r"^attn\.", "")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert tuple(y.shape) == out_type.shape(B)
        assert max_diff(y, ref(x)) <= TOL


def test_rel_pos_attention_channel_orders_agree() -> None:
    """head_first: false reads the same qkv output in the (q/k/v, heads, d) order (timm's head_first=False)."""
    x_type = TensorType("maps", 32, 4, 4)
    ref = Attention2d(32, 32, dim_head=8, head_first=False, rel_pos_cls=partial(RelPosBias, window_size=(4, 4)))
    ours, _ = _op(TOKEN_MIXERS, "rel_pos_attention", {"head_dim": 8, "head_first": False}, x_type)
    ours = port(ref, ours, [(r"^rel_pos\.", "")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


# --- multi-scale linear attention ---------------------------------------------------------------

_LITE_MLA = [(r"^qkv\.conv\.", "qkv."), (r"^aggreg\.(\d+)\.0\.", r"aggregate.\1.dw."),
             (r"^aggreg\.(\d+)\.1\.", r"aggregate.\1.pw."), (r"^proj\.conv\.", "proj."), (r"^proj\.norm\.", "norm.")]


@pytest.mark.parametrize(("head_dim", "scales"), [(16, (5,)), (8, (3, 5)), (8, ())], ids=["b0", "two", "none"])
def test_multiscale_linear_attention_matches_timm_lite_mla(head_dim: int, scales: tuple[int, ...]) -> None:
    x_type = TensorType("maps", 32, 7, 6)
    ref = evit.LiteMLA(32, 32, dim=head_dim, norm_layer=(None, nn.BatchNorm2d), scales=scales)
    config = {"head_dim": head_dim, "scales": list(scales)}
    ours, out = _op(TOKEN_MIXERS, "multiscale_linear_attention", config, x_type)
    assert out == x_type
    ours = port(ref, ours, _LITE_MLA)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


# --- conv + MLP head ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [10, 0])
def test_conv_mlp_head_matches_timm_efficientvit_classifier_head(num_classes: int) -> None:
    x_type = TensorType("maps", 16, 5, 4)
    ref = evit.ClassifierHead(16, widths=[32, 24], num_classes=num_classes)
    config = {"conv_dim": 32, "hidden": [24]}
    ours, out = _op(HEADS, "conv_mlp_head", config, x_type, num_classes)
    ours = port(ref, ours, [(r"^in_conv\.", "conv."), (r"^classifier\.0\.", "hidden.0.fc."),
                            (r"^classifier\.1\.", "hidden.0.norm."), (r"^classifier\.4\.", "fc.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert tuple(y.shape) == out.shape(B) == (B, num_classes or 24)
        assert max_diff(y, ref(x)) <= TOL


# --- the plain template and blocks that change the width ------------------------------------------

def _spec_with(first_block: dict[str, Any], dim: int = 16) -> dict[str, Any]:
    return {
        "name": "hybrid", "input": {"channels": 3, "size": 16}, "num_classes": 4, "defaults": {"norm": None},
        "stem": {"type": "conv", "kernel": 3, "stride": 2, "dim": 8},
        "stages": [{"depth": 2, "dim": dim, "block": [first_block, {"token_mixer": {"type": "mbconv"},
                                                                   "channel_mixer": None}]}],
        "head": {"type": "pool_norm_linear", "norm": None},
    }


def test_plain_block_has_no_residual() -> None:
    block = {"template": "plain", "token_mixer": {"type": "mbconv", "stride": 2, "out_dim": 16}}
    net = ml.build(_spec_with(block)).eval()
    first = net.stages[0].blocks[0]
    x = torch.randn(B, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(first(x), first.token_mixer(x))
    assert net.feature_types[0] == TensorType("maps", 16, 4, 4)


def test_downsampling_block_with_pool_shortcut() -> None:
    block = {"token_mixer": {"type": "mbconv", "stride": 2, "out_dim": 16}, "channel_mixer": None,
             "shortcut": {"type": "pool", "bias": False}}
    net = ml.build(_spec_with(block)).eval()
    first = net.stages[0].blocks[0]
    x = torch.randn(B, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(first(x), first.shortcut(x) + first.token_mixer(x))


@pytest.mark.parametrize("template", ["plain", "metaformer"])
def test_stage_dim_must_match_what_its_blocks_give(template: str) -> None:
    block: dict[str, Any] = {"template": template, "token_mixer": {"type": "mbconv", "stride": 2, "out_dim": 12},
                             "channel_mixer": None}
    if template == "metaformer":
        block["shortcut"] = {"type": "pool"}
    with pytest.raises(SpecError) as err:
        ml.to_graph(_spec_with(block))
    assert [(i.path, i.message) for i in err.value.issues] == [
        ("stages[0].dim", "16 differs from the 12 channels its blocks give")]


def test_rel_pos_attention_scale_after_matches_timm_visformer_attention_exactly() -> None:
    """Visformer's attention on maps: 1x1-conv qkv ordered (q/k/v, heads, head_dim), no biases, no position
    bias, and the scale applied to q kᵀ (``scale_order: after`` on the explicit path), bit for bit."""
    from timm.models.visformer import Attention

    ref = Attention(24, num_heads=2, head_dim_ratio=1.0)
    ref.fused_attn = False
    x_type = TensorType("maps", 24, 5, 4)
    config = {"num_heads": 2, "rel_pos_bias": False, "head_first": False, "qkv_bias": False, "proj_bias": False,
              "fused": False, "scale_order": "after"}
    ours = port(ref, build_op("token_mixer", "rel_pos_attention", config, x_type))
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
