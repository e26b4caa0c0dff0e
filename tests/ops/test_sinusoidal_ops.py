"""Fixed sine-cosine position embeddings: the values against the authors' formulas written out one entry at a
time (T2T-ViT's ``get_sinusoid_encoding``, MAE's ``get_2d_sincos_pos_embed``), a buffer in the state_dict and
never a parameter, and the shape rule's refusal."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build_op, max_diff, op_spec

import metaformer_lab as ml
from metaformer_lab.core.errors import SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.common import LATENCY_KEY


def _t2t_reference(tokens: int, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """T2T-ViT: position p, channel j: angle ``p / t^(2 (j // 2) / C)``, sin in even channels, cos in odd ones."""
    table = torch.zeros(tokens, channels, dtype=torch.float64)
    for p in range(tokens):
        for j in range(channels):
            angle = p / math.pow(temperature, 2 * (j // 2) / channels)
            table[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table.float()


def _mae_reference(height: int, width: int, channels: int, prefix: int) -> torch.Tensor:
    """MAE: half the channels for the column coordinate, half for the row, each half [sin | cos] of
    ``coord / 10000^(k / (C/4))``; the class token a row of zeros."""
    quarter = channels // 4
    rows = [[0.0] * channels for _ in range(prefix)]
    for y in range(height):
        for x in range(width):
            row = []
            for coord in (x, y):
                angles = [coord / 10000 ** (k / quarter) for k in range(quarter)]
                row += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).float()


@pytest.mark.parametrize(("x", "temperature"), [(TensorType("tokens", 10, 3, 4, prefix=1), 10000.0),
                                                (TensorType("tokens", 7, 2, 3), 100.0)], ids=["prefixed", "odd-width"])
def test_1d_is_t2t_vits_sinusoid_encoding(x: TensorType, temperature: float) -> None:
    module = build_op("pos_embed", "sinusoidal", {"variant": "1d", "temperature": temperature}, x)
    assert max_diff(module.weight[0], _t2t_reference(x.num_tokens, x.channels, temperature)) < 1e-6


def test_2d_is_maes_sincos_embedding_with_a_zero_class_token() -> None:
    x = TensorType("tokens", 16, 3, 4, prefix=1)
    module = build_op("pos_embed", "sinusoidal", {}, x)
    assert max_diff(module.weight[0], _mae_reference(3, 4, 16, prefix=1)) < 1e-6


@pytest.mark.parametrize("variant", ["1d", "2d"])
def test_maps_and_grid_tokens_get_the_same_table(variant: str) -> None:
    tokens = build_op("pos_embed", "sinusoidal", {"variant": variant}, TensorType("tokens", 8, 3, 4))
    maps = build_op("pos_embed", "sinusoidal", {"variant": variant}, TensorType("maps", 8, 3, 4))
    x = torch.randn(2, 3, 4, 8)  # (B, H, W, C)
    assert max_diff(maps(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), tokens(x)) == 0.0
    assert max_diff(tokens(x) - x, tokens.weight.view(1, 3, 4, 8).expand_as(x)) < 1e-6


def test_the_table_is_a_state_dict_buffer_never_a_parameter() -> None:
    """The authors keep ``pos_embed`` as a frozen parameter, so it is in their state_dict: a persistent buffer
    takes it, strictly, while nothing trains it or counts it as a weight."""
    spec = {"name": "s", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 16, "layout": "tokens", "prefix_tokens": 1,
                        "pos_embed": {"type": "sinusoidal", "variant": "1d"},
                        "block": {"token_mixer": {"type": "attention", "num_heads": 2}}}],
            "head": {"type": "class_token"}}
    net = ml.build(spec)
    pos = net.stages[0].pos_embed
    assert not list(pos.parameters()) and "stages.0.pos_embed.weight" in net.state_dict()
    theirs = {"weight": torch.nn.Parameter(_t2t_reference(17, 16)[None], requires_grad=False)}
    pos.load_state_dict(theirs, strict=True)
    assert max_diff(pos.weight, theirs["weight"]) == 0.0


def test_2d_refuses_a_width_not_divisible_by_4() -> None:
    spec = {"name": "s", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 1, "dim": 18, "pos_embed": {"type": "sinusoidal"},
                        "block": {"token_mixer": {"type": "pooling"}}}],
            "head": {"type": "pool_norm_linear"}}
    with pytest.raises(SpecError) as err:
        ml.to_graph(spec)
    assert [(i.path, i.message) for i in err.value.issues] == [
        ("stages[0].pos_embed.variant", "2d needs a width divisible by 4 (sin and cos of columns and rows), got 18; "
                                        "use 1d or a multiple of 4")]


def test_learned_position_decay_takes_it_into_weight_decay() -> None:
    """``decay: true`` (timm's Visformer, whose pos_embeds take weight decay): no parameter is exempt; by default
    the embedding is kept out of weight decay as timm's ViT keeps ``pos_embed``; the latency key is unchanged."""
    x_type = TensorType("maps", 8, 3, 4)
    assert build_op("pos_embed", "learned", {}, x_type).no_weight_decay() == {"weight"}
    assert build_op("pos_embed", "learned", {"decay": True}, x_type).no_weight_decay() == set()
    assert '"decay"' not in op_spec("pos_embed", "learned", {}).model_dump_json(context={LATENCY_KEY: True})
