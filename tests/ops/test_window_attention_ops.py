"""Window attention's token groupings (MaxViT's grid, Shuffle Transformer's spatial shuffle, CrossFormer's
long-distance groups) and its Swin V2 / CrossFormer options: against timm's MaxViT and Swin V2 modules (same
weights), and against a slow reference that gathers each group's tokens by index and attends in a loop."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, op_spec, perturbed, port
from timm.models.maxxvit import (
    MaxxVitTransformerCfg,
    PartitionAttentionCl,
    grid_partition,
    grid_reverse,
    window_partition,
)
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from torch import Tensor

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.common import LATENCY_KEY
from metaformer_lab.ops.window_attention import WindowAttention, merge, partition

TOL = 1e-5
B = 2

_op = partial(build_op, TOKEN_MIXERS)

Group = list[tuple[int, int]]
"""The (row, column) of a group's tokens, in the order the group lists them."""


def shuffle_groups(H: int, W: int, ws: int) -> list[Group]:
    """Shuffle Transformer: ``'(ws1 hh) (ws2 ww) -> (hh ww) (ws1 ws2)'``, token (ws1 * H/ws + hh, ws2 * W/ws + ww)."""
    hh, ww = H // ws, W // ws
    return [[(i * hh + a, j * ww + b) for i in range(ws) for j in range(ws)] for a in range(hh) for b in range(ww)]


def dilated_groups(H: int, W: int, G: int, interval: int) -> list[Group]:
    """CrossFormer's LDA: regions of G * I tokens, each split into I x I groups of G x G tokens I apart."""
    span = G * interval
    return [[(r * span + g * interval + i, s * span + h * interval + j) for g in range(G) for h in range(G)]
            for r in range(H // span) for s in range(W // span) for i in range(interval) for j in range(interval)]


def reference_group_attention(module: WindowAttention, x: Tensor, groups: list[Group],
                              bias: Callable[[int, int], Tensor] | None) -> Tensor:
    """Each group's tokens gathered by index, ``softmax(q kᵀ / sqrt(d) + bias(dy, dx)) v`` per head, written back;
    ``bias(dy, dx)`` gives the (heads,) bias between tokens (dy, dx) apart in group coordinates."""
    heads, d = module.num_heads, module.head_dim
    out = torch.zeros_like(x)
    for group in groups:
        rows, cols = zip(*group, strict=True)
        tokens = x[:, list(rows), list(cols)]  # (B, n, C)
        q, k, v = module.qkv(tokens).unflatten(-1, (3, heads, d)).unbind(2)  # 3 x (B, n, heads, d)
        logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * d**-0.5
        if bias is not None:
            side = int(len(group) ** 0.5)
            for n in range(len(group)):
                for m in range(len(group)):
                    dy, dx = n // side - m // side, n % side - m % side
                    logits[:, :, n, m] += bias(dy, dx)
        y = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).flatten(2)  # (B, n, heads * d)
        out[:, list(rows), list(cols)] = module.proj(y)
    return out


# --- groupings ----------------------------------------------------------------------------------

def test_partition_matches_timm_window_and_grid_partition() -> None:
    x = torch.randn(B, 8, 12, 5)
    windows, grid = window_partition(x, (4, 4)), grid_partition(x, (4, 4))  # (B*nW, 4, 4, C)
    assert torch.equal(partition(x, 4), windows.flatten(1, 2))
    assert torch.equal(partition(x, 4, (2, 3)), grid.flatten(1, 2))
    assert torch.equal(merge(grid.flatten(1, 2), (8, 12), 4, (2, 3)), grid_reverse(grid, (4, 4), (8, 12)))
    for dilation in [(1, 1), (2, 3), (2, 1), (1, 3)]:
        assert torch.equal(merge(partition(x, 4, dilation), (8, 12), 4, dilation), x)
    assert torch.equal(merge(partition(x, 2, (2, 3)), (8, 12), 2, (2, 3)), x)  # two regions down, two across


@pytest.mark.parametrize("partition_type", ["grid", "shuffle", "dilated"])
def test_grid_shuffle_and_dilated_without_interval_group_alike(partition_type: str) -> None:
    """Shuffle Transformer's spatial shuffle and CrossFormer's LDA with interval H / w are MaxViT's grid."""
    x_type = TensorType("tokens", 16, 8, 12)
    grid = perturbed(_op("window_attention", {"window": 4, "partition": "grid", "num_heads": 2}, x_type))
    other = _op("window_attention", {"window": 4, "partition": partition_type, "num_heads": 2}, x_type)
    other.load_state_dict(grid.state_dict())
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.equal(other(x), grid(x))


@pytest.mark.parametrize("fused", [True, False])
def test_grid_attention_matches_timm_maxvit(fused: bool) -> None:
    """Against ``maxxvit.PartitionAttentionCl._partition_attn`` with ``partition_type='grid'``: grid_partition,
    AttentionCl with its relative position bias, grid_reverse."""
    x_type = TensorType("tokens", 32, 8, 12)
    cfg = MaxxVitTransformerCfg(dim_head=16, head_first=False, window_size=(4, 4), grid_size=(4, 4))
    block = PartitionAttentionCl(32, partition_type="grid", cfg=cfg)
    block.attn.fused_attn = fused
    ours = port(block.attn, _op("window_attention", {"window": 4, "partition": "grid", "head_dim": 16,
                                                     "fused": fused}, x_type),
                renames=[(r"^rel_pos\.", "")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), block._partition_attn(x)) <= TOL


@pytest.mark.parametrize("partition_type", ["block", "grid"])
@pytest.mark.parametrize("fused", [True, False])
def test_tf_table_matches_timm_maxvit_rel_pos_bias_tf_exactly(partition_type: str, fused: bool) -> None:
    """``table_layout: tf``: timm's ``RelPosBiasTf`` table (heads, 2w-1, 2w-1), read at the key - query offset,
    loads as it is; window and grid attention then match MaxViT's tf blocks bit for bit."""
    x_type = TensorType("tokens", 32, 8, 12)
    cfg = MaxxVitTransformerCfg(dim_head=16, head_first=False, window_size=(4, 4), grid_size=(4, 4),
                                rel_pos_type="bias_tf")
    block = PartitionAttentionCl(32, partition_type=partition_type, cfg=cfg)
    block.attn.fused_attn = fused
    partition_ = "window" if partition_type == "block" else "grid"
    ours = port(block.attn, _op("window_attention", {"window": 4, "partition": partition_, "head_dim": 16,
                                                     "table_layout": "tf", "fused": fused}, x_type),
                renames=[(r"^rel_pos\.", "")])
    assert ours.relative_position_bias_table.shape == (2, 7, 7)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.equal(ours._bias(1), block.attn.rel_pos.get_bias())
        assert torch.equal(ours(x), block._partition_attn(x))


def test_tf_table_needs_the_learned_table() -> None:
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("window_attention").infer(
            op_spec(TOKEN_MIXERS, "window_attention", {"window": 2, "num_heads": 2, "rel_pos_bias": "mlp",
                                                         "table_layout": "tf"}),
            TensorType("tokens", 16, 4, 4), None)
    assert err.value.field == "table_layout"


@pytest.mark.parametrize("fused", [True, False])
def test_shuffle_matches_a_reference_gathering_shuffle_transformer_groups(fused: bool) -> None:
    x_type = TensorType("tokens", 16, 8, 12)
    ours = perturbed(_op("window_attention", {"window": 4, "partition": "shuffle", "num_heads": 2, "fused": fused},
                         x_type))
    table, index = ours.relative_position_bias_table, ours.relative_position_index
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = reference_group_attention(ours, x, shuffle_groups(8, 12, 4),
                                             lambda dy, dx: table[(dy + 3) * 7 + dx + 3])
        assert max_diff(ours(x), expected) <= TOL
    assert int(index[0, 5]) == (0 - 1 + 3) * 7 + (0 - 1 + 3)  # token (0, 0) to (1, 1): table row of (-1, -1)


@pytest.mark.parametrize(("grid", "window", "interval"), [((8, 8), 2, 2), ((12, 8), 2, 2), ((12, 12), 3, 2)],
                         ids=["two-regions", "non-square", "window-3"])
def test_dilated_matches_a_reference_gathering_crossformer_groups(grid: tuple[int, int], window: int,
                                                                  interval: int) -> None:
    """CrossFormer's LDA with the dynamic position bias: an MLP (their DynamicPosBias, residual=False) on the
    integer offset between two tokens of a group, written out with the functional ops and their parameter names."""
    x_type = TensorType("tokens", 32, *grid)
    ours = perturbed(_op("window_attention", {"window": window, "partition": "dilated", "interval": interval,
                                              "rel_pos_bias": "dpb", "num_heads": 2}, x_type))
    p = dict(ours.named_parameters())
    assert p["pos.pos_proj.weight"].shape == (2, 2)  # CrossFormer: dim // 4 // 4 hidden

    def dpb(dy: int, dx: int) -> Tensor:
        h = F.linear(torch.tensor([float(dy), float(dx)]), p["pos.pos_proj.weight"], p["pos.pos_proj.bias"])
        for layer in ("pos1", "pos2", "pos3"):
            h = F.layer_norm(h, h.shape, p[f"pos.{layer}.0.weight"], p[f"pos.{layer}.0.bias"])
            h = F.linear(h.relu(), p[f"pos.{layer}.2.weight"], p[f"pos.{layer}.2.bias"])
        return h

    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = reference_group_attention(ours, x, dilated_groups(*grid, window, interval), dpb)
        assert max_diff(ours(x), expected) <= TOL


def stripe_groups(H: int, W: int, stripe: tuple[int, int]) -> list[Group]:
    """CSWin's stripes: the map cut into h x w rectangles (H x w: vertical stripes, w x W: horizontal ones)."""
    h, w = stripe
    return [[(r * h + i, s * w + j) for i in range(h) for j in range(w)] for r in range(H // h) for s in range(W // w)]


def reference_cross_attention(module: WindowAttention, x: Tensor, window: int) -> Tensor:
    """CSWin's ``CSWinBlock`` attention, gathering each stripe's tokens by index: the first half of the heads over
    H x w stripes, the second over w x W ones, each adding LePE (its half of the depthwise conv on the stripe's
    value map, zero-padded at the stripe's border); both halves' outputs, concatenated, go through one proj."""
    heads, d = module.num_heads, module.head_dim
    half, H, W = heads // 2, x.shape[1], x.shape[2]
    conv = module.local_conv
    out = torch.zeros(*x.shape[:3], heads * d)
    for branch, stripe in enumerate(((H, window), (window, W))):
        channels = slice(branch * half * d, (branch + 1) * half * d)
        for group in stripe_groups(H, W, stripe):
            rows, cols = zip(*group, strict=True)
            tokens = x[:, list(rows), list(cols)]  # (B, n, C)
            qkv = module.qkv(tokens).unflatten(-1, (3, heads, d))  # (B, n, 3, heads, d)
            q, k, v = qkv[..., branch * half:(branch + 1) * half, :].unbind(2)  # 3 x (B, n, half, d)
            logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * d**-0.5
            y = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).flatten(2)  # (B, n, half * d)
            vmap = v.flatten(2).transpose(1, 2).unflatten(2, stripe)  # (B, half * d, h, w)
            lepe = F.conv2d(vmap, conv.weight[channels], conv.bias[channels], padding=1, groups=half * d)
            out[:, list(rows), list(cols), channels] = y + lepe.flatten(2).transpose(1, 2)
    return module.proj(out)


def test_partition_takes_rectangular_windows() -> None:
    x = torch.randn(B, 8, 12, 5)
    stripes = partition(x, (8, 3))  # (B * 4, 24, C): vertical stripes, 3 tokens wide
    assert torch.equal(stripes[1], x[0, :, 3:6].flatten(0, 1))
    for window in [(8, 3), (2, 12), (4, 6)]:
        assert torch.equal(merge(partition(x, window), (8, 12), window), x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("grid", "window"), [((8, 12), 2), ((6, 6), 3), ((4, 4), 1)],
                         ids=["non-square", "window-3", "window-1"])
def test_cross_matches_a_reference_gathering_cswin_stripes(fused: bool, grid: tuple[int, int], window: int) -> None:
    x_type = TensorType("tokens", 32, *grid)
    ours = perturbed(_op("window_attention", {"window": window, "partition": "cross", "rel_pos_bias": False,
                                              "num_heads": 4, "local_conv": 3, "fused": fused}, x_type))
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "local_conv.weight",
                                      "local_conv.bias"}
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), reference_cross_attention(ours, x, window)) <= TOL


# --- Swin V2 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("grid", "window", "shift"), [((8, 12), 4, False), ((8, 12), 4, True), ((4, 4), 4, True)],
                         ids=["w-msa", "sw-msa", "window-covers-map"])
def test_cosine_attention_with_mlp_bias_matches_timm_swin_v2(fused: bool, grid: tuple[int, int], window: int,
                                                            shift: bool) -> None:
    """Against ``SwinTransformerV2Block._attn``: scaled cosine attention, continuous position bias, q and v
    biases without a k bias, the shifted-window mask."""
    x_type = TensorType("tokens", 32, *grid)
    block = SwinTransformerV2Block(32, input_resolution=grid, num_heads=2, window_size=window,
                                   shift_size=window // 2 if shift else 0)
    ours = port(block.attn, _op("window_attention", {"window": window, "shift": shift, "num_heads": 2,
                                                     "cosine": True, "rel_pos_bias": "mlp", "k_bias": False,
                                                     "fused": fused}, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.allclose(ours.relative_coords_table, block.attn.relative_coords_table.flatten(0, 2))
        assert max_diff(ours(x), block._attn(x)) <= TOL
    assert set(ours.state_dict()) == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias", "logit_scale",
                                      "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"}
    assert ours.no_weight_decay() == {"logit_scale", "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"}



@pytest.mark.parametrize("rel_pos_bias", [True, "mlp"], ids=["table", "mlp"])
def test_the_window_bias_is_kept_at_inference_until_its_table_changes(rel_pos_bias: Any) -> None:
    """The position bias plus the shifted-window mask depends on no input: kept without autograd, computed afresh
    after an in-place change to the table or its MLP, never kept with autograd; the batch still expands it."""
    x_type = TensorType("tokens", 32, 8, 8)
    fresh = perturbed(_op("window_attention", {"window": 4, "shift": True, "num_heads": 2,
                                               "rel_pos_bias": rel_pos_bias}, x_type))
    ours = _op("window_attention", {"window": 4, "shift": True, "num_heads": 2, "rel_pos_bias": rel_pos_bias},
               x_type)
    ours.load_state_dict(fresh.state_dict())
    table = ours.relative_position_bias_table if rel_pos_bias is True else ours.cpb_mlp[2].weight
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert ours._bias(B).shape[0] == B * 4 and ours._bias(1).shape[0] == 4  # (B*nW, ...)
        kept = ours._bias_cache[1]
        ours(x)
        assert ours._bias_cache[1] is kept
        table.mul_(3.0)  # in place, as an optimiser or load_state_dict does
        fresh_table = fresh.relative_position_bias_table if rel_pos_bias is True else fresh.cpb_mlp[2].weight
        fresh_table.mul_(3.0)
        fresh._bias_cache = None
        assert ours._bias_cache[1] is kept and ours._bias(B) is not None and ours._bias_cache[1] is not kept
        assert torch.equal(ours(x), fresh(x))
    assert ours._bias(B).requires_grad and ours._bias_cache is None

def test_cosine_logit_scale_starts_at_log_10_and_is_clamped_at_100() -> None:
    x_type = TensorType("tokens", 16, 4, 4)
    ours = _op("window_attention", {"window": 4, "num_heads": 2, "cosine": True, "rel_pos_bias": False,
                                    "fused": False}, x_type)
    assert torch.equal(ours.logit_scale, torch.full((2, 1, 1), torch.tensor(10.0).log().item()))
    with torch.no_grad():
        ours.logit_scale.fill_(10.0)  # exp(10) > 100: clamped
    q = torch.randn(1, 2, 16, 8)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    with torch.no_grad():
        assert max_diff(ours._attend_cosine(q, k, v, None, ours.logit_scale), (cos * 100).softmax(-1) @ v) <= TOL


@pytest.mark.parametrize("config", [
    {"window": 4, "shift": True, "cosine": True, "rel_pos_bias": "mlp", "k_bias": False},
    {"window": 4, "partition": "dilated", "interval": 2, "rel_pos_bias": "dpb"},
    {"window": 2, "partition": "grid", "cosine": True, "rel_pos_bias": False}], ids=["swin-v2", "lda-dpb", "grid-cos"])
def test_fused_and_explicit_paths_agree(config: dict[str, Any]) -> None:
    x_type = TensorType("tokens", 32, 8, 8)
    fused = perturbed(_op("window_attention", {**config, "num_heads": 2, "fused": True}, x_type))
    explicit = _op("window_attention", {**config, "num_heads": 2, "fused": False}, x_type)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(fused(x), explicit.eval()(x)) <= TOL


# --- config and shape rules ---------------------------------------------------------------------

def test_new_options_at_their_defaults_keep_the_latency_key() -> None:
    spec = op_spec(TOKEN_MIXERS, "window_attention", {"window": 7, "num_heads": 3})
    key = spec.model_dump(mode="json", context={LATENCY_KEY: True})
    assert not {"partition", "interval", "cosine", "k_bias"} & set(key)
    assert key["rel_pos_bias"] is True
    v2 = op_spec(TOKEN_MIXERS, "window_attention", {"partition": "grid", "cosine": True, "rel_pos_bias": "mlp"})
    assert {"partition", "cosine", "rel_pos_bias"} <= set(v2.model_dump(mode="json", context={LATENCY_KEY: True}))


_TOK = TensorType("tokens", 32, 12, 8)
_BAD = [
    ({"window": 5, "partition": "grid"}, _TOK, "window", "5 does not divide the 12x8 feature map"),
    ({"window": 2, "partition": "dilated", "interval": 3}, _TOK, "interval",
     "window * interval = 6 does not divide the 12x8 feature map"),
    ({"window": 2, "partition": "grid", "shift": True}, _TOK, "shift", "only with partition: window"),
    ({"window": 2, "interval": 2}, _TOK, "interval", "only with partition: dilated"),
    ({"window": 2, "partition": "cross", "num_heads": 3, "rel_pos_bias": False}, TensorType("tokens", 48, 12, 8),
     "num_heads", "3 is odd"),
    ({"window": 2, "partition": "cross", "num_heads": 2}, _TOK, "partition", "no relative position bias"),
]


@pytest.mark.parametrize(("config", "x_type", "field", "message"), _BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(_BAD)])
def test_shape_rules_name_the_field(config: dict[str, Any], x_type: TensorType, field: str, message: str) -> None:
    opdef = TOKEN_MIXERS.get("window_attention")
    with pytest.raises(ShapeIssue) as err:
        opdef.resolve(opdef.spec.model_validate({"type": "window_attention", **config}), x_type)
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize("value", ["table", "cpb", 1])
def test_rel_pos_bias_takes_a_bool_mlp_or_dpb(value: Any) -> None:
    with pytest.raises(ValueError, match="rel_pos_bias"):
        op_spec(TOKEN_MIXERS, "window_attention", {"rel_pos_bias": value})
