"""Blocks written as residual steps (``steps:``): CMT- and Shuffle-like blocks against hand-written references
of the authors' ``Block.forward``, module names, stochastic depth, deploy form, costs, round trip, bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import max_diff, perturbed
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.graph.render import to_dot
from metaformer_lab.latency.keys import default_out_mem, walk_keys
from metaformer_lab.space import contains, load_space, sample
from metaformer_lab.spec.yaml_io import parse_yaml
from metaformer_lab.zoo.listing import token_mixer_tags

B, DIM = 2, 32

CMT_STEPS: dict[str, Any] = {
    "proj": {"token_mixer": {"type": "dwconv", "kernel": 3}, "norm": None, "drop_path": False},
    "attn": {"token_mixer": {"type": "sr_attention", "num_heads": 2, "sr_ratio": 2}, "layer_scale": 0.5},
    "mlp": {"channel_mixer": {"type": "conv_ffn", "ratio": 2.0, "dw_residual": True}},
}
SHUFFLE_STEPS: dict[str, Any] = {
    "attn": {"token_mixer": {"type": "window_attention", "window": 4, "num_heads": 2, "head_dim": None}},
    "local": {"token_mixer": {"type": "dwconv", "kernel": 3, "bias": False}, "drop_path": False},
    "mlp": {"channel_mixer": {"type": "mlp", "ratio": 2.0, "act": "relu6"}},
}


def _net(block: dict[str, Any], depth: int = 1, rate: float = 0.0) -> dict[str, Any]:
    """One tokens stage of width 32 on an 8x8 grid."""
    return {"name": "steps", "input": {"size": 32}, "num_classes": 5, "defaults": {"drop_path_rate": rate},
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": depth, "dim": DIM, "layout": "tokens", "block": block}]}


def _cmt(**block: Any) -> dict[str, Any]:
    return {"norm": {"type": "layernorm", "eps": 1e-6}, "layout": "tokens", "steps": CMT_STEPS, **block}


def _shuffle(**block: Any) -> dict[str, Any]:
    return {"norm": {"type": "batchnorm"}, "layout": "tokens", "steps": SHUFFLE_STEPS, **block}


class _CmtBlock(nn.Module):
    """CMT's ``Block.forward`` (cmt_pytorch): the LPU ``x = proj(x) + x`` on the feature map, no norm and no drop
    path; then ``x = x + dp(ls * attn(norm1(x)))`` and ``x = x + dp(mlp(norm2(x)))``. The LPU, the norms and the
    layer scale are written out in plain torch; attention and IRFFN are the compiled block's (tested on their own)."""

    def __init__(self, ours: nn.Module, drop_path: nn.Module) -> None:
        super().__init__()
        self.lpu = nn.Conv2d(DIM, DIM, 3, padding=1, groups=DIM)
        self.lpu.load_state_dict(ours.proj.dw.state_dict())
        self.norm1, self.norm2 = nn.LayerNorm(DIM, eps=1e-6), nn.LayerNorm(DIM, eps=1e-6)
        self.norm1.load_state_dict(ours.norm1.state_dict())
        self.norm2.load_state_dict(ours.norm2.state_dict())
        self.gamma = nn.Parameter(ours.layer_scale1.scale.detach().clone())
        self.attn, self.mlp = copy.deepcopy(ours.attn), copy.deepcopy(ours.mlp)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = x + self.lpu(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.gamma * self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _ShuffleBlock(nn.Module):
    """Shuffle Transformer's ``Block.forward``: ``x = x + dp(attn(norm1(x)))``, ``x = x + local(norm2(x))`` (no
    drop path), ``x = x + dp(mlp(norm3(x)))``; the compiled block's modules."""

    def __init__(self, ours: nn.Module, drop_path: nn.Module) -> None:
        super().__init__()
        for name in ("norm1", "attn", "norm2", "local", "norm3", "mlp"):
            self.add_module(name, copy.deepcopy(getattr(ours, name)))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.local(self.norm2(x))
        return x + self.drop_path(self.mlp(self.norm3(x)))


REFERENCES = [(_cmt(), _CmtBlock), (_shuffle(), _ShuffleBlock)]
DROPPED = {_CmtBlock: [False, True, True], _ShuffleBlock: [True, False, True]}  # which steps take drop path


@pytest.mark.parametrize(("block", "reference"), REFERENCES, ids=["cmt", "shuffle"])
def test_steps_block_matches_the_authors_forward(block: dict[str, Any], reference: type[nn.Module]) -> None:
    net = perturbed(ml.build(_net(block)))
    ours = net.stages[0].blocks[0]
    ref = reference(ours, nn.Identity()).eval()
    x = torch.randn(B, 8, 8, DIM)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) < 1e-6


@pytest.mark.parametrize(("block", "reference"), REFERENCES, ids=["cmt", "shuffle"])
def test_steps_take_the_blocks_drop_path_where_the_authors_do(block: dict[str, Any],
                                                               reference: type[nn.Module]) -> None:
    net = ml.build(_net(block, depth=3, rate=0.4))
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in net.stages[0].blocks]
    assert rates == pytest.approx([0.0, 0.2, 0.4])  # timm's schedule by block index
    ours = perturbed(net).stages[0].blocks[2].train()
    assert [b.drop_path for b in ours.branches] == DROPPED[reference]
    ref = reference(ours, ours.drop_path).train()
    x = torch.randn(16, 8, 8, DIM)
    torch.manual_seed(3)
    y = ours(x)
    torch.manual_seed(3)
    assert max_diff(y, ref(x)) < 1e-6  # the same masks: the steps without drop path draw none


def test_steps_modules_are_named_as_declared() -> None:
    cmt, shuffle = (ml.build(_net(b)).stages[0].blocks[0] for b in (_cmt(), _shuffle()))
    assert [n for n, _ in cmt.named_children()] == ["layout_in", "proj", "norm1", "attn", "layer_scale1", "norm2",
                                                    "mlp", "drop_path"]
    assert [n for n, _ in shuffle.named_children()] == ["layout_in", "norm1", "attn", "norm2", "local", "norm3",
                                                        "mlp", "drop_path"]
    graph = ml.to_graph(_net(_shuffle()))
    branches = graph.plan.stages[0].blocks[0].branches
    assert [[graph.nodes[n]["part"] for n in b.parts] for b in branches] == [["norm1", "attn"], ["norm2", "local"],
                                                                              ["norm3", "mlp"]]
    assert graph.nodes["stages.0.blocks.0.local"]["path"] == "stages[0].block.steps.local.token_mixer"
    assert graph.nodes["stages.0.blocks.0.norm3"]["path"] == "stages[0].block.steps.mlp.norm"


@pytest.mark.parametrize("block", [_cmt(), _shuffle()], ids=["cmt", "shuffle"])
def test_steps_block_deploys_to_the_same_outputs(block: dict[str, Any]) -> None:
    net = perturbed(ml.build(_net(block, depth=2)))
    folded = ml.deploy(net)
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(folded(x), net(x)) < 1e-4
    if block["norm"]["type"] == "batchnorm":  # Shuffle's BatchNorms go into the qkv and fc1 they feed
        assert not hasattr(folded.stages[0].blocks[0], "norm1")


def test_steps_costs_keys_and_rendering_cover_every_step() -> None:
    assert token_mixer_tags(ml.load_spec(_net(_cmt()))) == ["dwconv", "sr_attention"]
    graph = ml.to_graph(_net(_cmt(), depth=2))
    net = ml.build(graph)
    assert graph_cost(graph).params == sum(p.numel() for p in net.parameters())
    keyed = {name for name, _ in walk_keys(graph, 1, default_out_mem)}
    assert {f"stages.0.blocks.1.{p}" for p in ("proj", "norm1", "attn", "layer_scale1", "norm2", "mlp")} <= keyed
    assert '"stages.0.blocks.1.proj"' in to_dot(graph)


def test_steps_round_trip_and_inherit_the_blocks_fields() -> None:
    spec = ml.load_spec({**_net({"base": "shuffle", "steps": {"attn": {"token_mixer": {"window": 4, "num_heads": 2}},
                                                             "local": {"norm": None}}}),
                         "defaults": {"layer_scale": 0.1}})
    steps = spec.stages[0].block[0].steps
    assert list(steps) == ["attn", "local", "mlp"]  # the named block's order; overrides merged into its steps
    assert steps["attn"].token_mixer.window == 4 and not steps["attn"].token_mixer.qkv_bias
    assert steps["attn"].norm.type == "batchnorm" and steps["local"].norm is None  # the block's norm, or null
    assert {s.layer_scale for s in steps.values()} == {0.1}  # from defaults, through the block
    text = ml.dump_spec(spec)
    assert "token_mixer: null" not in text
    assert text.count("layer_scale: 0.1") == 2  # in defaults and on the block; its steps inherit it again
    again = ml.load_spec(parse_yaml(text))
    assert again == spec and ml.dump_spec(again) == text


def test_a_step_without_a_residual_may_change_the_type() -> None:
    down = {"token_mixer": {"type": "mbconv", "stride": 2, "out_dim": 64}, "norm": None, "residual": False}
    block = {"layout": "maps", "res_scale": 1.0, "steps": {"down": down, "mlp": {"channel_mixer": {"type": "mlp"}}}}
    spec = _net(block)  # the block's res scale reaches the steps with a residual to scale
    spec["stages"][0].update(dim=64, layout="maps")
    graph = ml.to_graph(spec)
    assert graph.stage_types[0].shape(1) == (1, 64, 4, 4)
    net = ml.build(graph).eval()
    assert [n for n, _ in net.stages[0].blocks[0].named_children()] == ["layout_in", "down", "norm1", "mlp",
                                                                        "res_scale1", "drop_path"]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize(("block", "path", "message"), [
    ({"steps": {"lpu": {"norm": None}}}, "steps.lpu", "has no mixer; give it a token_mixer or a channel_mixer"),
    ({"steps": {"x": {"token_mixer": {"type": "identity"}, "channel_mixer": {"type": "mlp"}}}}, "steps.x.channel_mixer",
     "a step runs one mixer"),
    ({"steps": {"norm1": {"token_mixer": {"type": "identity"}}}}, "steps.norm1", "'norm1' is taken"),
    ({"steps": {"layout": {"token_mixer": {"type": "identity"}}}}, "steps.layout", "'layout' is taken"),
    ({"steps": {"a": {"token_mixer": {"type": "identity"}}}, "token_mixer": {"type": "pooling"}}, "token_mixer",
     "is unused: the block is wired by its steps"),
    ({"steps": {"a": {"token_mixer": {"type": "identity"}}}, "template": "convnext"}, "template", "is unused"),
    ({"steps": {"a": {"token_mixer": {"type": "identity"}}}, "shortcut": {"type": "conv"}}, "shortcut", "is unused"),
    ({"steps": {"down": {"token_mixer": {"type": "mbconv", "stride": 2}}}}, "steps.down.token_mixer",
     "a residual branch must keep it"),
    ({"steps": {"attn": {"token_mixer": {"type": "attention", "num_heads": 5}}}}, "steps.attn.token_mixer.num_heads",
     ""),
], ids=["no-mixer", "two-mixers", "name-taken", "reserved-name", "token-mixer-too", "template-too", "shortcut-too",
        "residual-changes-type", "mixer-shape-rule"])
def test_bad_steps_are_spec_errors(block: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        ml.to_graph(_net({"layout": "maps", **block}))
    where = f"stages[0].block.{path}"
    assert any(i.path == where and message in i.message for i in err.value.issues), err.value.issues


@pytest.mark.parametrize(("steps", "path"), [({}, "stages[0].block.steps"),
                                              ({"Attn": {"token_mixer": {"type": "identity"}}},
                                               "stages[0].block.steps.Attn")], ids=["empty", "bad-name"])
def test_bad_step_names_are_schema_errors(steps: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as err:
        ml.load_spec(_net({"steps": steps}))
    assert any(i.path.startswith(path) for i in err.value.issues), err.value.issues


def test_a_space_chooses_inside_steps(tmp_path: Path) -> None:
    text = """
name: steps_space
input: {size: 32}
num_classes: 5
stem: {type: patchify, patch: 4}
stages:
  - depth: 1
    dim: 32
    layout: tokens
    block:
      base: shuffle
      steps:
        attn: {token_mixer: {window: {choice: [2, 4]}, num_heads: 2}}
        local: {token_mixer: {kernel: {choice: [3, 5]}}}
"""
    (tmp_path / "space.yaml").write_text(text)
    space = load_space(tmp_path / "space.yaml")
    points = sample(space, 4, seed=0).points
    chosen = {(p.spec.stages[0].block[0].steps["attn"].token_mixer.window,
               p.spec.stages[0].block[0].steps["local"].token_mixer.kernel) for p in points}
    assert chosen == {(2, 3), (2, 5), (4, 3), (4, 5)}
    assert all(contains(space, p.spec).found for p in points)
