"""Global query attention (GC-ViT): against the slow reference (``tests/references/global_query_attention.py``) for
every option, against timm's ``gcvit.WindowAttentionGlobal`` fed by its ``FeatureBlock`` (the same parameter
names, so its state_dict loads by moving the generator and the table), and the shape rule's refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import EXAMPLES, build_op, max_diff, op_spec, perturbed
from references.global_query_attention import reference
from timm.models.gcvit import FeatureBlock, WindowAttentionGlobal, window_partition, window_reverse

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.cost import count_flops, graph_cost
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.ops.global_query_attention import QueryGenerator, generator_flops, generator_params

TOL = 1e-5


@pytest.mark.parametrize(("config", "grid"), [
    ({"window": 2, "num_heads": 2}, 4),
    ({"window": 2, "head_dim": 4, "fused": False}, 8),
    ({"window": 4, "num_heads": 4, "levels": 0}, 4),
    ({"window": 2, "num_heads": 2, "rel_pos_bias": False, "qkv_bias": False}, 4),
    ({"window": 3, "num_heads": 2, "levels": 1}, 6),
], ids=["one-level", "two-levels-explicit", "no-pool", "no-bias", "odd-window"])
@pytest.mark.parametrize("with_context", [False, True], ids=["own-input", "context"])
def test_matches_the_written_out_reference(config: dict, grid: int, with_context: bool) -> None:
    x_type = TensorType("tokens", 16, grid, grid)
    op = perturbed(build_op(TOKEN_MIXERS, "global_query_attention", config, x_type))
    x = torch.randn(x_type.shape(2))
    context = torch.randn(x_type.shape(2)) if with_context else None  # a stage's input
    with torch.no_grad():
        queries = None if context is None else op.global_block(context)  # what the stage's generator hands the op
        assert max_diff(op(x, queries), reference(op, x, context)) < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize(("grid", "window", "levels"), [(8, 2, 2), (4, 4, 0)], ids=["pooled", "window-sized"])
def test_matches_timm_gcvit_global_attention(fused: bool, grid: int, window: int, levels: int) -> None:
    dim, heads = 16, 4
    attn = perturbed(WindowAttentionGlobal(dim, heads, (window, window), use_global=True))
    generator = perturbed(FeatureBlock(dim, levels), seed=1)
    x_type = TensorType("tokens", dim, grid, grid)
    op = build_op(TOKEN_MIXERS, "global_query_attention", {"window": window, "num_heads": heads, "fused": fused},
                  x_type)
    state = {k.replace("rel_pos.", ""): v for k, v in attn.state_dict().items()}
    state |= {f"global_block.{k}": v for k, v in generator.state_dict().items()}
    op.load_state_dict(state, strict=True)
    x, stage_input = torch.randn(x_type.shape(2)), torch.randn(x_type.shape(2))  # (B, H, W, C)
    with torch.no_grad():
        q_global = generator(stage_input.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # timm's stage: (B, w, w, C)
        windows = window_partition(x, (window, window)).view(-1, window * window, dim)
        expected = window_reverse(attn(windows, q_global), (window, window), (grid, grid))
        assert max_diff(op(x, op.global_block(stage_input)), expected) < TOL


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"window": 3, "num_heads": 2}, TensorType("tokens", 16, 4, 4), "window", "3 does not divide the 4x4"),
    ({"window": 2, "levels": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 4), "levels",
     "2 max pools take the 4x4 map to 1x1"),
    ({"window": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 8), "levels",
     "null: 1 max pools take the 4x8 map to 2x4"),
    ({"window": 2, "num_heads": 2, "head_dim": 4}, TensorType("tokens", 16, 4, 4), "head_dim",
     "num_heads * head_dim = 8 must equal"),
    ({"window": 2, "num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads", "3 does not divide dim 16"),
    ({"window": 2}, TensorType("maps", 16, 4, 4), "", "tokens"),
    ({"window": 2}, TensorType("tokens", 16, 4, 4, prefix=1), "", "prefix"),
    ({"window": 2, "num_heads": 2, "generator": "stage", "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
     "generator", "use generator: block"),
], ids=["window", "too-many-levels", "non-square", "inner-width", "heads", "maps", "prefix", "stage-prefix"])
def test_shape_rule_refusals(config: dict, x: TensorType, field: str, message: str) -> None:
    opdef = TOKEN_MIXERS.get("global_query_attention")
    with pytest.raises(ShapeIssue) as info:
        opdef.resolve(op_spec(TOKEN_MIXERS, "global_query_attention", config), x)
    assert info.value.field == field or not field
    assert message in info.value.message


def test_levels_out_of_range_is_a_schema_error() -> None:
    with pytest.raises(ValueError, match="levels"):
        op_spec(TOKEN_MIXERS, "global_query_attention", {"levels": -1})


def test_the_stage_runs_one_generator_once_for_its_global_blocks() -> None:
    """``generator: stage``: the compiler moves the generator to the stage (timm's ``stages.i.global_block``), the
    stage runs it once on its blocks' input and hands its queries to each global block; the cost model counts it
    once per stage."""
    path = next(p for p in EXAMPLES if p.stem == "tiny_global_query_attention")
    graph = ml.to_graph(str(path))
    net = perturbed(ml.build(graph))
    stage = net.stages[1]
    keys = list(net.state_dict())
    assert sum(".global_block." in k and k.endswith("conv1.conv_dw.weight") for k in keys) == 3  # one per stage
    assert not any(".token_mixer.global_block." in k for k in keys)
    assert sum(p.numel() for p in net.parameters()) == graph_cost(graph).params
    calls, seen = [], []
    stage.global_block.register_forward_hook(lambda m, i, o: calls.append(o))
    for j in (1, 3):  # the stage's two global blocks
        stage.blocks[j].token_mixer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)
        stage_input = stage.forward_pre(net.stages[0](net.stem(x)))
        expected = stage.global_block(stage_input)
    assert len(calls) == 2 and len(seen) == 2  # once in the forward, once here
    assert all(q is calls[0] for q in seen)
    assert max_diff(calls[0], expected) == 0


def test_generator_params_and_flops_match_the_module() -> None:
    for dim, levels, size in ((16, 0, 4), (64, 3, 56), (256, 0, 14), (40, 2, 12)):
        generator = QueryGenerator(dim, levels)
        assert generator_params(dim, levels) == sum(p.numel() for p in generator.parameters())
        flops, _ = count_flops(lambda g=generator, s=size, d=dim: g(torch.zeros(1, s, s, d)))
        assert generator_flops(dim, (size, size), levels) == flops


def test_gradient_checkpointing_and_feature_taps_hand_the_stage_context_on() -> None:
    path = next(p for p in EXAMPLES if p.stem == "tiny_global_query_attention")
    net = perturbed(ml.build(str(path))).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = net(x)
    plain.sum().backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    assert grads["stages.1.global_block.blocks.conv1.conv_dw.weight"].abs().sum() > 0
    net.zero_grad()
    net.set_grad_checkpointing(True)
    torch.manual_seed(0)
    checkpointed = net(x)
    checkpointed.sum().backward()
    assert max_diff(plain, checkpointed) == 0
    assert all(max_diff(p.grad, grads[k]) == 0 for k, p in net.named_parameters())
    net.eval()
    net.set_feature_modules(["stages.1.blocks.3"])  # a block tap: the stage runs block by block
    with torch.no_grad():
        tap = net.forward_intermediates(x, stop_early=True, intermediates_only=True)[0]  # (B, C, H, W)
        expected = net.stages[1](net.stages[0](net.stem(x)))  # (B, H, W, C); the stage has no norm
    assert max_diff(tap, expected.permute(0, 3, 1, 2)) == 0


def test_a_stage_refuses_two_different_generators() -> None:
    spec = ml.load_spec(str(next(p for p in EXAMPLES if p.stem == "tiny_global_query_attention"))).model_dump()
    blocks = spec["stages"][0]["block"]
    spec["stages"][0]["block"] = [blocks[1], {**blocks[1], "token_mixer": {**blocks[1]["token_mixer"], "window": 4}}]
    with pytest.raises(ml.SpecError, match=r"stages\[0\]\.block\[1\]\.token_mixer: its stage context \(a query "
                                           r"generator of width 16, 1 levels\) differs from \(a query generator of "
                                           r"width 16, 2 levels\) of stages\[0\]\.block\[0\]\.token_mixer; a stage "
                                           r"has one"):
        ml.to_graph(spec)
