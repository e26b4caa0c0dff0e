"""Conv projections in attention against a slow reference written here (one channel, head and window at a time,
an explicit softmax, float64): sr_attention's depthwise-conv reductions (CMT, CvT), LITv2's Lo-Fi average pool, the
local conv of the values (LePE, Shunted) in sr_attention, attention and window_attention; shape rules, gradients,
latency keys."""

from __future__ import annotations

import copy
import json
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.common import LATENCY_KEY
from metaformer_lab.ops.sr_attention import SrAttention, SrAttentionSpec

TOL = 1e-5
B = 2

_op = partial(build_op, TOKEN_MIXERS)


def depthwise(maps: Tensor, conv: nn.Conv2d) -> Tensor:
    """A depthwise conv one channel at a time: (B, C, H, W) -> (B, C, h, w)."""
    out = []
    for c in range(maps.shape[1]):
        bias = None if conv.bias is None else conv.bias[c:c + 1]
        out.append(F.conv2d(maps[:, c:c + 1], conv.weight[c:c + 1], bias, stride=conv.stride, padding=conv.padding))
    return torch.cat(out, dim=1)


def head_slice(conv: nn.Conv2d, part: slice) -> nn.Conv2d:
    """The depthwise conv restricted to the channels ``part``."""
    out = copy.deepcopy(conv)
    out.weight, out.bias = nn.Parameter(conv.weight[part]), nn.Parameter(conv.bias[part])
    return out


def naive_heads(q: Tensor, k: Tensor, v: Tensor, heads: int, grid: tuple[int, int], conv: nn.Conv2d | None,
                to_values: bool = False, prefix: int = 0, scale: float | None = None) -> Tensor:
    """(B, N, heads*d) q and (B, M, heads*d) k, v (M = prefix + h*w of ``grid``) -> (B, N, heads*dv), one head at
    a time; ``conv``: the local conv of each head's value map (not of the prefix tokens' values), added to the
    output (or to the values); ``scale``: the softmax scale (default d ** -0.5)."""
    d, dv = q.shape[-1] // heads, v.shape[-1] // heads
    out = []
    for head in range(heads):
        qh, kh = q[..., head * d:(head + 1) * d], k[..., head * d:(head + 1) * d]
        part = slice(head * dv, (head + 1) * dv)
        vh, local = v[..., part], 0
        if conv is not None:
            v_map = vh[:, prefix:].transpose(1, 2).reshape(vh.shape[0], dv, *grid)
            local = depthwise(v_map, head_slice(conv, part)).flatten(2).transpose(1, 2)  # (B, h*w, dv)
            local = torch.cat([torch.zeros_like(vh[:, :prefix]), local], dim=1)  # (B, M, dv)
            if to_values:
                vh, local = vh + local, 0
        logits = (qh @ kh.transpose(1, 2)) * (d ** -0.5 if scale is None else scale)  # (B, N, M)
        attn = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
        out.append(attn @ vh + local)
    return torch.cat(out, dim=-1)


def naive_sr_attention(m: SrAttention, x: Tensor) -> Tensor:
    """The module's maths written out on a float64 copy: (B, H, W, C) -> (B, H, W, C), or with the module's prefix
    tokens (B, P + H*W, C) -> (B, P + H*W, C), the prefix tokens kept out of every conv and norm (CvT)."""
    m = copy.deepcopy(m).double()
    x, P = x.double(), m.prefix
    if P:
        cls, x = x[:, :P], x[:, P:].unflatten(1, m.grid)  # (B, P, C), (B, H, W, C)
    else:
        cls = x.new_zeros(x.shape[0], 0, x.shape[-1])  # (B, 0, C)
    B_, H, W, C = x.shape
    maps = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    q_in = x if m.q_sr is None else m.q_norm(depthwise(maps, m.q_sr).permute(0, 2, 3, 1))
    if isinstance(m.pool, nn.AvgPool2d):  # LITv2: mean of each s x s patch
        s = m.pool.kernel_size
        small = maps.unflatten(3, (W // s, s)).unflatten(2, (H // s, s)).mean(dim=(3, 5))
    elif m.sr is not None:
        small = depthwise(maps, m.sr) if m.sr.groups == C else m.sr(maps)  # PVT's full conv: tested against timm
    else:
        small = maps
    small = m.norm(small.permute(0, 2, 3, 1))  # (B, h, w, C)
    v_small = small if m.v_sr is None else m.v_norm(depthwise(maps, m.v_sr).permute(0, 2, 3, 1))  # CvT
    h, w = small.shape[1:3]
    q_in, small, v_small = (torch.cat([cls, t.reshape(B_, -1, C)], dim=1) for t in (q_in, small, v_small))
    q = q_in @ m.q.weight.T + (0 if m.q.bias is None else m.q.bias)  # (B, P + H*W, inner)
    inner = m.num_heads * m.head_dim
    kv_bias = torch.zeros(2 * inner, dtype=x.dtype) if m.kv.bias is None else m.kv.bias
    k = small @ m.kv.weight[:inner].T + kv_bias[:inner]  # (B, P + h*w, inner)
    v = v_small @ m.kv.weight[inner:].T + kv_bias[inner:]
    y = naive_heads(q, k, v, m.num_heads, (h, w), m.local_conv, m.local_conv_to_values, prefix=P, scale=m.scale)
    y = y @ m.proj.weight.T + m.proj.bias  # (B, P + H*W, C)
    return (y if P else y.reshape(B_, H, W, C)).float()


_BN = {"type": "batchnorm"}
_REFERENCE = [
    pytest.param({"reduction": "dwconv", "sr_ratio": 2, "num_heads": 2, "norm": _BN}, (4, 6), id="cmt"),
    pytest.param({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True,
                  "sr_bias": False, "qkv_bias": False, "num_heads": 2, "norm": _BN}, (6, 4), id="cvt"),
    pytest.param({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True,
                  "sr_bias": False, "num_heads": 4, "norm": _BN, "scale_width": "inner"}, (4, 4), id="cvt-scale-inner"),
    pytest.param({"sr_ratio": 2, "num_heads": 2, "head_dim": 4, "scale_width": "inner"}, (4, 4),
                 id="pvt-scale-inner"),
    pytest.param({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "split_kv": True, "num_heads": 2}, (4, 4),
                 id="split-kv-qkv-bias"),
    pytest.param({"reduction": "dwconv", "sr_ratio": 1, "kernel": 5, "q_conv": True, "num_heads": 4}, (5, 5),
                 id="conv-projection-layernorm"),
    pytest.param({"reduction": "avgpool", "sr_ratio": 2, "num_heads": 2, "qkv_bias": False}, (4, 6), id="lofi"),
    pytest.param({"reduction": "avgpool", "sr_ratio": 1, "num_heads": 2}, (3, 3), id="lofi-sr1"),
    pytest.param({"num_heads": 2, "local_conv": 3}, (3, 5), id="lepe"),
    pytest.param({"num_heads": 4, "local_conv": 5, "reduction": "dwconv", "kernel": 3}, (4, 4), id="lepe-cvt"),
    pytest.param({"sr_ratio": 2, "num_heads": 2, "local_conv": 3, "local_conv_add": "value"}, (4, 4),
                 id="shunted"),
    pytest.param({"reduction": "avgpool", "sr_ratio": 2, "num_heads": 1, "local_conv": 3, "local_conv_add": "value"},
                 (4, 6), id="lofi-value-conv"),
]


@pytest.mark.parametrize("prefix", [0, 1], ids=["grid", "class-token"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("config", "grid"), _REFERENCE)
def test_sr_attention_options_match_a_slow_reference(config: dict[str, Any], grid: tuple[int, int], fused: bool,
                                                     prefix: int) -> None:
    x_type = TensorType("tokens", 16, *grid, prefix=prefix)
    ours = perturbed(_op("sr_attention", {**config, "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), naive_sr_attention(ours, x)) <= TOL


def naive_window_attention(m: nn.Module, x: Tensor) -> Tensor:
    """Unshifted, unbiased window attention one window at a time, float64: (B, H, W, C) -> (B, H, W, C)."""
    m = copy.deepcopy(m).double()
    x = x.double()
    w = m.window
    y = torch.zeros(*x.shape[:3], m.proj.out_features, dtype=x.dtype)
    for i in range(0, x.shape[1], w):
        for j in range(0, x.shape[2], w):
            tokens = x[:, i:i + w, j:j + w].flatten(1, 2)  # (B, w*w, C)
            q, k, v = (tokens @ m.qkv.weight.T + m.qkv.bias).chunk(3, dim=-1)
            out = naive_heads(q, k, v, m.num_heads, (w, w), m.local_conv)
            y[:, i:i + w, j:j + w] = (out @ m.proj.weight.T + m.proj.bias).unflatten(1, (w, w))
    return y.float()


def naive_attention(m: nn.Module, x: Tensor) -> Tensor:
    """Global attention on a (B, H, W, C) grid, float64, through the module's own q, k, v split."""
    m = copy.deepcopy(m).double()
    tokens = x.double().flatten(1, 2)  # (B, N, C)
    q, k, v = (t.transpose(1, 2).flatten(2) for t in m.split_qkv(m.qkv(tokens)))  # (B, N, heads*d) each
    out = naive_heads(q, k, v, m.num_heads, x.shape[1:3], m.local_conv)
    return (out @ m.proj.weight.T + m.proj.bias).unflatten(1, x.shape[1:3]).float()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("config", "grid"), [({"window": 2, "num_heads": 2, "local_conv": 3}, (4, 6)),
                                              ({"window": 3, "num_heads": 1, "local_conv": 5}, (6, 3))],
                         ids=["w2", "w3"])
def test_window_attention_local_conv_matches_a_slow_reference(config: dict[str, Any], grid: tuple[int, int],
                                                              fused: bool) -> None:
    """CSWin's LePE: each window's values convolved on their own (zeros beyond the window), added to the output."""
    x_type = TensorType("tokens", 16, *grid)
    ours = perturbed(_op("window_attention", {**config, "rel_pos_bias": False, "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), naive_window_attention(ours, x)) <= TOL


def test_shifted_window_attention_with_a_zero_local_conv_is_window_attention() -> None:
    x_type = TensorType("tokens", 16, 6, 6)
    config = {"window": 3, "shift": True, "num_heads": 2}
    ours = perturbed(_op("window_attention", {**config, "local_conv": 3}, x_type))
    plain = _op("window_attention", config, x_type)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("local_conv")})
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        ours.local_conv.weight.zero_(), ours.local_conv.bias.zero_()
        assert max_diff(ours(x), plain.eval()(x)) <= TOL


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("config", "layout"), [
    ({"num_heads": 2, "local_conv": 3}, "tokens"),
    ({"num_heads": 2, "attn_ratio": 2.0, "local_conv": 5}, "maps"),
    ({"head_dim": 4, "qkv_layout": "heads_qkv", "local_conv": 3}, "tokens"),
], ids=["tokens", "maps-wide-values", "heads-qkv"])
def test_attention_local_conv_matches_a_slow_reference(config: dict[str, Any], layout: str, fused: bool) -> None:
    """BiFormer / Agent attention's LePE: the value map's depthwise conv added to the attention output."""
    x_type = TensorType(layout, 16, 3, 4)
    ours = perturbed(_op("attention", {**config, "qkv_bias": True, "fused": fused}, x_type))
    x = torch.randn(B, 3, 4, 16)  # (B, H, W, C)
    with torch.no_grad():
        out = ours(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if layout == "maps" else ours(x)
        assert max_diff(out, naive_attention(ours, x)) <= TOL


def test_cmt_reduction_is_a_depthwise_conv_of_kernel_sr_ratio() -> None:
    """CMT's ``sr``: Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim, bias=True) then BatchNorm2d."""
    m = _op("sr_attention", {"reduction": "dwconv", "sr_ratio": 4, "num_heads": 2, "norm": _BN},
            TensorType("tokens", 16, 8, 8))
    assert (m.sr.kernel_size, m.sr.stride, m.sr.padding, m.sr.groups) == ((4, 4), (4, 4), (0, 0), 16)
    assert m.sr.bias is not None and m.q_sr is None


def test_cvt_projection_has_its_q_k_v_convs_and_no_conv_bias() -> None:
    """CvT's ``dw_bn``: 3x3 depthwise, padding 1, no bias, BatchNorm; stride 1 for q, 2 for k and v, each its own."""
    m = _op("sr_attention", {"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True,
                             "sr_bias": False, "num_heads": 2, "norm": _BN}, TensorType("tokens", 16, 8, 8))
    for conv, stride in ((m.q_sr, 1), (m.sr, 2), (m.v_sr, 2)):
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((3, 3), (stride,) * 2, (1, 1), 16)
        assert conv.bias is None
    assert len({id(m) for m in (m.q_sr, m.sr, m.v_sr, m.q_norm, m.norm, m.v_norm)}) == 6
    assert all(isinstance(norm, nn.BatchNorm2d) or "batch" in type(norm).__name__.lower()
               for norm in (m.q_norm, m.norm, m.v_norm))


def test_lofi_reduction_has_no_conv_norm_or_activation() -> None:
    """LITv2's Lo-Fi: AvgPool2d(sr_ratio, sr_ratio) alone; the parameters are q, kv and proj."""
    m = _op("sr_attention", {"reduction": "avgpool", "sr_ratio": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 4))
    assert {name.split(".")[0] for name, _ in m.named_parameters()} == {"q", "kv", "proj"}


def test_shunted_values_get_the_local_conv_before_attention() -> None:
    """Added to the values, the conv's output goes through the softmax's average: with a uniform attention (q = 0)
    every query sees the mean of v + conv(v)."""
    x_type = TensorType("tokens", 8, 4, 4)
    m = perturbed(_op("sr_attention", {"sr_ratio": 2, "num_heads": 1, "local_conv": 3, "local_conv_add": "value",
                                       "norm": None}, x_type))
    with torch.no_grad():
        m.q.weight.zero_(), m.q.bias.zero_()
        x = torch.randn(x_type.shape(B))
        v = m.kv(m.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))[..., 8:]  # (B, 2, 2, C)
        v = v + m.local_conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = m.proj(v.mean(dim=(1, 2)))[:, None, None].expand(x.shape)
        assert max_diff(m(x), expected) <= TOL


_TOK = TensorType("tokens", 64, 8, 8)
_BAD = [
    ({"reduction": "dwconv", "sr_ratio": 3}, _TOK, "sr_ratio", "3 does not divide the 8x8 feature map"),
    ({"reduction": "avgpool", "sr_ratio": 3}, _TOK, "sr_ratio", "3 does not divide the 8x8 feature map"),
    ({"kernel": 3, "sr_ratio": 2}, _TOK, "kernel", "the reduction is conv"),
    ({"q_conv": True, "sr_ratio": 2}, _TOK, "q_conv", "needs reduction dwconv"),
    ({"split_kv": True, "reduction": "avgpool"}, _TOK, "split_kv", "the reduction is avgpool"),
    ({"q_conv": True, "reduction": "dwconv", "sr_ratio": 2}, _TOK, "kernel", "q_conv needs an odd kernel"),
    ({"reduction": "dwconv", "sr_ratio": 2, "groups": 2}, _TOK, "groups", "dwconv is depthwise"),
    ({"local_conv": 3, "sr_ratio": 2}, _TOK, "local_conv_add", "output needs values on the 8x8 query grid, but the "
                                                              "reduction gives 4x4; use value"),
    ({"local_conv": 3, "reduction": "pool", "pool_size": 2}, _TOK, "local_conv_add", "reduction gives 2x2"),
    ({"reduction": "dwconv", "kernel": 3, "q_conv": True}, TensorType("tokens", 64, 0, 0, prefix=1), "type",
     "needs the token grid, but it gets the prefix tokens only"),
]
_BAD_ELSEWHERE = [
    ("attention", {"local_conv": 3}, TensorType("tokens", 64, 4, 4, prefix=1), "local_conv",
     "needs the token grid only, but the input has 1 prefix token(s)"),
    ("window_attention", {"window": 4, "local_conv": 3}, TensorType("tokens", 64, 4, 4, prefix=1), "type",
     "1 prefix token(s)"),
]


@pytest.mark.parametrize(("tag", "config", "x_type", "field", "message"), _BAD_ELSEWHERE,
                         ids=[b[0] for b in _BAD_ELSEWHERE])
def test_local_conv_elsewhere_refuses_prefix_tokens(tag: str, config: dict[str, Any], x_type: TensorType,
                                                    field: str, message: str) -> None:
    opdef = TOKEN_MIXERS.get(tag)
    with pytest.raises(ShapeIssue) as err:
        opdef.resolve(opdef.spec.model_validate(config), x_type)
    assert (err.value.field, message in err.value.message) == (field, True)


@pytest.mark.parametrize(("config", "x_type", "field", "message"), _BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(_BAD)])
def test_shape_rule_names_the_field(config: dict[str, Any], x_type: TensorType, field: str, message: str) -> None:
    opdef = TOKEN_MIXERS.get("sr_attention")
    with pytest.raises(ShapeIssue) as err:
        opdef.resolve(SrAttentionSpec.model_validate(config), x_type)
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize("config", [{"kernel": 4}, {"local_conv": 2}, {"reduction": "maxpool"}],
                         ids=["even-kernel", "even-local-conv", "unknown-reduction"])
def test_field_limits_are_checked_by_the_config(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SrAttentionSpec.model_validate(config)


def test_new_options_at_their_defaults_leave_the_latency_key_unchanged() -> None:
    key = json.loads(SrAttentionSpec(sr_ratio=2).model_dump_json(context={LATENCY_KEY: True}))
    assert not {"kernel", "sr_bias", "q_conv", "split_kv", "local_conv", "local_conv_add", "scale_width"} & set(key)
    for tag in ("attention", "window_attention"):
        spec = TOKEN_MIXERS.get(tag).spec()
        assert "local_conv" not in json.loads(spec.model_dump_json(context={LATENCY_KEY: True}))
    assert key["reduction"] == "conv"
    cvt = SrAttentionSpec(reduction="dwconv", kernel=3, q_conv=True)
    assert {"kernel", "q_conv"} <= set(json.loads(cvt.model_dump_json(context={LATENCY_KEY: True})))


_TRAIN = [
    ({"reduction": "dwconv", "sr_ratio": 2, "kernel": 3, "q_conv": True, "split_kv": True, "num_heads": 2, "norm": _BN,
      "local_conv": 3, "local_conv_add": "value"}, TensorType("tokens", 16, 4, 4)),
    ({"reduction": "avgpool", "sr_ratio": 2, "num_heads": 2, "attn_drop": 0.1}, TensorType("tokens", 16, 4, 4)),
    ({"num_heads": 2, "local_conv": 3}, TensorType("tokens", 16, 4, 4)),
]
_TRAIN_ELSEWHERE = [
    ("attention", {"num_heads": 2, "local_conv": 3}, TensorType("maps", 16, 4, 4)),
    ("window_attention", {"window": 2, "shift": True, "num_heads": 2, "local_conv": 3}, TensorType("tokens", 16, 4, 4)),
]


@pytest.mark.parametrize(("tag", "config", "x_type"),
                         [("sr_attention", *t) for t in _TRAIN] + _TRAIN_ELSEWHERE,
                         ids=["cvt-shunted", "lofi", "lepe", "attention-lepe", "window-lepe"])
def test_every_parameter_gets_a_gradient(tag: str, config: dict[str, Any], x_type: TensorType) -> None:
    module = _op(tag, config, x_type).train()
    module(torch.randn(x_type.shape(B))).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("config", "x_type"), _TRAIN, ids=["cvt-shunted", "lofi", "lepe"])
def test_builds_and_runs_on_the_meta_device(config: dict[str, Any], x_type: TensorType) -> None:
    with torch.device("meta"):
        module = _op("sr_attention", config, x_type)
    assert module(torch.empty(x_type.shape(B), device="meta")).shape == x_type.shape(B)


def test_the_options_are_choices_in_a_search_space() -> None:
    """Every option is a field: a space chooses among them, and the shape rule rejects a bad combination."""
    from metaformer_lab.space.decode import sample
    from metaformer_lab.space.load import load_space

    mixer = {"type": "sr_attention", "num_heads": 2, "sr_ratio": {"choice": [1, 2]},
             "reduction": {"choice": ["conv", "dwconv", "avgpool"]}, "kernel": {"choice": [None, 3]},
             "local_conv": {"choice": [None, 3]}, "local_conv_add": {"choice": ["output", "value"]}}
    space = load_space({"name": "conv_projections", "input": {"channels": 3, "size": 32}, "num_classes": 10,
                        "stem": {"type": "patchify", "patch": 4}, "head": {"type": "pool_norm_linear"},
                        "stages": [{"depth": 1, "dim": 16, "layout": "tokens", "block": {"token_mixer": mixer}}]})
    drawn = sample(space, 12, seed=0)
    mixers = [p.spec.stages[0].block[0].token_mixer for p in drawn.points]
    assert {m.reduction for m in mixers} == {"conv", "dwconv", "avgpool"}
    assert all(m.kernel is None or m.reduction == "dwconv" for m in mixers)
    assert drawn.invalid > 0 and any("kernel" in reason for reason in drawn.reasons)


@pytest.mark.parametrize("config", [{"sr_ratio": 2}, {"reduction": "pool", "pool_size": 2},
                                    {"reduction": "dwconv", "sr_ratio": 2, "split_kv": True}],
                         ids=["conv", "pool", "dwconv"])
def test_sr_bias_false_drops_every_reduction_conv_bias(config: dict[str, Any]) -> None:
    m = _op("sr_attention", {**config, "num_heads": 2, "sr_bias": False}, TensorType("tokens", 16, 4, 4))
    assert [conv.bias for conv in (m.sr, m.v_sr) if conv is not None] == [None] * (1 + (m.v_sr is not None))


def test_scale_width_inner_scales_by_the_width_of_all_heads() -> None:
    """CvT's ``dim_out ** -0.5``: with heads of width d, the inner scale is the head scale of q times 1/sqrt(heads)."""
    x_type = TensorType("tokens", 16, 4, 4)
    cvt = perturbed(_op("sr_attention", {"num_heads": 4, "sr_ratio": 2, "scale_width": "inner"}, x_type))
    assert cvt.scale == 16 ** -0.5
    plain = _op("sr_attention", {"num_heads": 4, "sr_ratio": 2}, x_type)
    plain.load_state_dict(cvt.state_dict())
    assert plain.scale is None
    with torch.no_grad():
        plain.q.weight.mul_(0.5)
        plain.q.bias.mul_(0.5)  # sqrt(4 / 16): the head scale 4 ** -0.5 becomes 16 ** -0.5
        x = torch.randn(x_type.shape(B))
        assert max_diff(cvt(x), plain(x)) <= TOL
