"""Aggregated attention (TransNeXt, Shi 2024) against its slow reference (``tests/references/aggregated_attention.py``:
query by query, head by head, every key written out), its shape rule's refusals, and ``glu``'s ``kernel`` option
(TransNeXt's ConvGLU) against a written-out ConvGLU."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import build_op, max_diff, perturbed
from references.aggregated_attention import reference
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import CHANNEL_MIXERS, TOKEN_MIXERS
from metaformer_lab.ops.aggregated_attention import AggregatedAttentionSpec, relative_position_cpb
from metaformer_lab.ops.common import LATENCY_KEY
from metaformer_lab.ops.mlp import GluSpec

TOL = 1e-5
TAG = "aggregated_attention"

_OPTIONS = [
    ({"num_heads": 2, "pool_size": 2}, TensorType("tokens", 16, 4, 6)),
    ({"head_dim": 8, "window": 5, "pool_size": 3, "qkv_bias": False, "cpb_hidden": 16}, TensorType("tokens", 16, 3, 5)),
    ({"num_heads": 1, "window": 1, "pool_size": 1, "cpb_hidden": 8}, TensorType("tokens", 8, 2, 3)),
    ({"num_heads": 2, "window": None, "pool_size": 3, "cpb_hidden": 16}, TensorType("tokens", 16, 5, 4)),
    ({"num_heads": 2, "window": None, "pool_size": None, "cpb_hidden": 16}, TensorType("tokens", 16, 3, 3)),
    ({"num_heads": 2, "window": None, "pool_size": None, "cpb_hidden": 16}, TensorType("tokens", 16, 1, 2)),
]
_IDS = ["window-3-pool-2", "window-5-uneven-bins-no-bias", "window-1-pool-1", "pooled-only", "global",
        "global-one-row"]


@pytest.mark.parametrize(("config", "x_type"), _OPTIONS, ids=_IDS)
def test_aggregated_attention_matches_the_slow_reference(config: dict[str, Any], x_type: TensorType) -> None:
    module = perturbed(build_op(TOKEN_MIXERS, TAG, config, x_type))
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        assert max_diff(module(x), reference(module, x)) < TOL


def test_padded_neighbours_are_masked_and_the_length_scale_counts_the_keys_seen() -> None:
    module = build_op(TOKEN_MIXERS, TAG, {"num_heads": 1, "window": 3, "pool_size": 2}, TensorType("tokens", 8, 3, 4))
    # corner: 4 neighbours in the map, edge: 6, inside: 9; plus 4 pooled keys
    seen = module.seq_length_scale.exp().round().view(3, 4)
    assert seen.tolist() == [[8, 10, 10, 8], [10, 13, 13, 10], [8, 10, 10, 8]]
    assert module.padding_mask.shape == (9, 12) and module.padding_mask.sum().item() == 12 * 9 - (4 * 4 + 6 * 6 + 9 * 2)


def test_the_authors_parameter_names_and_shapes() -> None:
    module = build_op(TOKEN_MIXERS, TAG, {"num_heads": 2, "pool_size": 2}, TensorType("tokens", 16, 4, 4))
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "temperature": (2, 1, 1), "query_embedding": (2, 1, 8), "q.weight": (16, 16), "q.bias": (16,),
        "kv.weight": (32, 16), "kv.bias": (32,), "proj.weight": (16, 16), "proj.bias": (16,),
        "sr.weight": (16, 16, 1, 1), "sr.bias": (16,), "norm.weight": (16,), "norm.bias": (16,),
        "cpb_fc1.weight": (512, 2), "cpb_fc1.bias": (512,), "cpb_fc2.weight": (2, 512), "cpb_fc2.bias": (2,),
        "relative_pos_bias_local": (2, 9), "learnable_tokens": (2, 8, 9), "learnable_bias": (2, 1, 9)}
    assert not module.state_dict().keys() - shapes.keys()  # the index, table, scale and mask are not saved
    plain = build_op(TOKEN_MIXERS, TAG, {"num_heads": 2, "window": None, "pool_size": None},
                     TensorType("tokens", 16, 4, 4))
    assert {name for name, _ in plain.named_parameters()} == {
        "temperature", "query_embedding", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "cpb_fc1.weight",
        "cpb_fc1.bias", "cpb_fc2.weight", "cpb_fc2.bias"}


def test_init_follows_the_authors() -> None:
    net = ml.build(_network({"num_heads": 2, "pool_size": 2}))
    mixer = net.stages[0].blocks[0].token_mixer
    assert torch.allclose(F.softplus(mixer.temperature), torch.full((2, 1, 1), 1 / 0.24))
    assert mixer.learnable_bias.abs().max() == 0 and 0 < mixer.relative_pos_bias_local.std() < 1e-3


def test_relative_coordinates_are_the_log_spaced_offsets_to_the_bin_centres() -> None:
    index, table = relative_position_cpb((4, 4), (2, 2))
    coords = table[index].view(16, 4, 2)
    # query (0, 0) and the pooled key of bin (1, 1), centre (2.5, 2.5): offset -2.5 / 3 * 8 on each axis
    r = -2.5 / 3 * 8
    expected = -torch.log2(torch.tensor(abs(r) + 1.0)) / 3
    assert torch.allclose(coords[0, 3], expected.repeat(2))


def test_gradients_reach_every_parameter_in_training() -> None:
    x_type = TensorType("tokens", 16, 4, 4)
    module = build_op(TOKEN_MIXERS, TAG, {"num_heads": 2, "pool_size": 2, "attn_drop": 0.1, "proj_drop": 0.1},
                      x_type).train()
    module(torch.randn(x_type.shape(2))).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


_BAD = [
    ({"num_heads": 2, "pool_size": None}, TensorType("tokens", 16, 4, 4), "window", "pool_size is null"),
    ({"num_heads": 2, "pool_size": 5}, TensorType("tokens", 16, 4, 6), "pool_size",
     "5 is larger than the 4x6 feature map"),
    ({"num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads", "3 does not divide dim 16"),
    ({"num_heads": 2, "pool_size": 2}, TensorType("maps", 16, 4, 4), "type", "needs layout 'tokens'"),
    ({"num_heads": 2, "pool_size": 2}, TensorType("tokens", 16, 4, 4, prefix=1), "type", "prefix field"),
]


@pytest.mark.parametrize(("config", "x_type", "field", "message"), _BAD,
                         ids=["window-without-pool", "pool-too-large", "heads", "maps", "prefix"])
def test_shape_rule_names_the_field(config: dict[str, Any], x_type: TensorType, field: str, message: str) -> None:
    opdef = TOKEN_MIXERS.get(TAG)
    with pytest.raises(ShapeIssue) as err:
        opdef.resolve(AggregatedAttentionSpec.model_validate(config), x_type)
    assert err.value.field == field
    assert message in err.value.message


@pytest.mark.parametrize("config", [{"window": 4}, {"pool_size": 0}, {"cpb_hidden": 0}],
                         ids=["even-window", "empty-pool", "no-hidden"])
def test_field_limits_are_checked_by_the_config(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AggregatedAttentionSpec.model_validate(config)


def test_a_network_reports_the_bad_field_with_its_path() -> None:
    with pytest.raises(ml.SpecError, match=r"stages\[0\]\.block\.token_mixer\.pool_size: 9 is larger"):
        ml.to_graph(_network({"num_heads": 2, "pool_size": 9}))


def _network(mixer: dict[str, Any]) -> dict[str, Any]:
    return {"name": "d", "input": {"channels": 3, "size": 16}, "num_classes": 3,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 16, "layout": "tokens",
                        "block": {"token_mixer": {"type": TAG, **mixer}}}]}


class _ConvGluReference(nn.Module):
    """TransNeXt's ``ConvolutionalGLU`` written out on (B, N, C) tokens: ``fc2(act(dwconv(g)) * a)``, ``[g, a] =
    fc1(x)``, the depthwise conv on the (H, W) grid."""

    def __init__(self, dim: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        g, a = self.fc1(x).chunk(2, dim=-1)
        g = self.dwconv(g.transpose(1, 2).unflatten(2, grid)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(g) * a)


@pytest.mark.parametrize("kernel", [3, 5])
def test_glu_kernel_is_transnext_conv_glu(kernel: int) -> None:
    x_type = TensorType("tokens", 8, 4, 5)
    reference_glu = perturbed(_ConvGluReference(8, 12, kernel))
    ours = build_op(CHANNEL_MIXERS, "glu", {"ratio": 1.5, "act": "gelu", "kernel": kernel}, x_type)
    ours.load_state_dict(reference_glu.state_dict(), strict=True)
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        assert max_diff(ours(x).flatten(1, 2), reference_glu(x.flatten(1, 2), (4, 5))) < TOL
        maps = build_op(CHANNEL_MIXERS, "glu", {"ratio": 1.5, "act": "gelu", "kernel": kernel},
                        TensorType("maps", 8, 4, 5))
        maps.load_state_dict({k: v.view(v.shape[0], -1, 1, 1) if k.startswith("fc") and v.dim() == 2 else v
                              for k, v in reference_glu.state_dict().items()})
        assert max_diff(maps(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), ours(x)) < TOL


def test_glu_kernel_needs_a_grid_and_leaves_the_latency_key_unchanged() -> None:
    opdef = CHANNEL_MIXERS.get("glu")
    with pytest.raises(ShapeIssue, match="glu with a kernel needs layout"):
        opdef.resolve(GluSpec(kernel=3), TensorType("vector", 8))
    assert "kernel" not in json.loads(GluSpec().model_dump_json(context={LATENCY_KEY: True}))


def test_the_position_bias_is_kept_at_inference_until_the_mlp_changes() -> None:
    x_type = TensorType("tokens", 16, 4, 4)
    module = perturbed(build_op(TOKEN_MIXERS, TAG, {"num_heads": 2, "pool_size": 2, "cpb_hidden": 16}, x_type))
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        first = module.position_bias()
        assert module.position_bias() is first  # kept
        before = module(x)
        module.cpb_fc2.bias.add_(1.0)  # in place, as an optimiser or load_state_dict does
        assert not torch.equal(module.position_bias(), first)
        assert max_diff(module(x), reference(module, x)) < TOL
        assert max_diff(before, module(x)) > 0
    assert module.position_bias().requires_grad  # with autograd: computed, never kept
    assert module._bias_cache is None



def test_a_module_made_under_inference_mode_computes_its_bias_on_every_call() -> None:
    """Its parameters are inference tensors, with no version counter to tell when a kept bias is stale."""
    x_type = TensorType("tokens", 16, 4, 4)
    x = torch.randn(x_type.shape(2))
    with torch.inference_mode():
        module = perturbed(build_op(TOKEN_MIXERS, TAG, {"num_heads": 2, "pool_size": 2, "cpb_hidden": 16}, x_type))
        before = module(x)
        module.cpb_fc2.bias.add_(1.0)  # in place, with no version bump
        assert module._bias_cache is None
        assert max_diff(module(x), reference(module, x)) < TOL
        assert max_diff(before, module(x)) > 0

@pytest.mark.parametrize(("config", "x_type"), [_OPTIONS[0], _OPTIONS[3], _OPTIONS[4]],
                         ids=["aggregated", "pooled-only", "global"])
def test_runs_under_autocast_and_in_bfloat16(config: dict[str, Any], x_type: TensorType) -> None:
    module = perturbed(build_op(TOKEN_MIXERS, TAG, config, x_type))
    x = torch.randn(x_type.shape(2))
    with torch.no_grad():
        y = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert max_diff(module(x).float(), y) < 0.05
        assert max_diff(module.to(torch.bfloat16)(x.bfloat16()).float(), y) < 0.05
