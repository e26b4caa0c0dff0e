"""Scale-aware modulation (SMT, Lin et al. 2023): ``scale_aware_modulation`` against the slow written-out reference
(``tests/references/scale_aware_modulation.py``) for each layout and option, against the authors' ``Attention``
(``ca_attention=1``) written out with their parameter names (their state_dict loads by one rename), and the shape
rule's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from references.scale_aware_modulation import reference
from torch import Tensor, nn

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5
TAG = "scale_aware_modulation"


@pytest.mark.parametrize(("config", "x"), [
    ({}, TensorType("tokens", 16, 5, 4)),
    ({}, TensorType("maps", 16, 4, 5)),
    ({"num_heads": 2, "kernel": 5, "kernel_step": 4, "expand_ratio": 1}, TensorType("tokens", 8, 3, 6)),
    ({"num_heads": 8, "kernel": 1, "expand_ratio": 3, "qkv_bias": False, "act": "relu"}, TensorType("maps", 16, 4, 4)),
    ({"num_heads": 1, "norm": None}, TensorType("tokens", 6, 3, 3)),
    ({"norm": {"type": "layernorm"}, "kernel_step": 0}, TensorType("maps", 8, 3, 5)),
], ids=["tokens", "maps", "two-heads-wide-steps", "eight-heads-relu", "one-head-no-norm", "layernorm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_scale_aware_modulation_matches_the_slow_reference(config: dict[str, Any], x: TensorType, train: bool) -> None:
    torch.manual_seed(0)
    module = perturbed(build_op(TOKEN_MIXERS, TAG, config, x))
    module.train(train)
    inputs = torch.randn(x.shape(3))
    with torch.no_grad():
        out = module(inputs)
        assert out.shape == inputs.shape
        assert max_diff(out, reference(module, inputs)) <= TOL


class _AuthorsSAM(nn.Module):
    """The authors' ``Attention`` with ``ca_attention=1`` (SMT models/smt.py), written out with their names."""

    def __init__(self, dim: int, ca_num_heads: int, expand_ratio: int) -> None:
        super().__init__()
        self.ca_num_heads, self.split_groups = ca_num_heads, dim // ca_num_heads
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.s = nn.Linear(dim, dim)
        for i in range(ca_num_heads):
            setattr(self, f"local_conv_{i + 1}", nn.Conv2d(dim // ca_num_heads, dim // ca_num_heads, 3 + i * 2,
                                                           padding=1 + i, groups=dim // ca_num_heads))
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=self.split_groups)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:  # (B, N, C)
        B, N, C = x.shape
        v = self.v(x)
        s = self.s(x).reshape(B, H, W, self.ca_num_heads, C // self.ca_num_heads).permute(3, 0, 4, 1, 2)
        outs = [getattr(self, f"local_conv_{i + 1}")(s[i]).reshape(B, self.split_groups, -1, H, W)
                for i in range(self.ca_num_heads)]
        s_out = torch.cat(outs, 2).reshape(B, C, H, W)
        s_out = self.proj1(self.act(self.bn(self.proj0(s_out)))).reshape(B, C, N).permute(0, 2, 1)
        return self.proj(s_out * v)


def test_the_authors_state_dict_loads_by_one_rename_and_gives_their_output() -> None:
    x = TensorType("tokens", 16, 5, 6)
    authors = perturbed(_AuthorsSAM(16, 4, 2))
    ours = build_op(TOKEN_MIXERS, TAG, {}, x)
    state = {_rename(k): v for k, v in authors.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(ours(inputs).flatten(1, 2), authors(inputs.flatten(1, 2), 5, 6)) <= TOL


def _rename(key: str) -> str:
    """The authors' ``local_conv_{i + 1}.*`` is our ``local_conv.{i}.*``; every other name is theirs."""
    if key.startswith("local_conv_"):
        index, rest = key[len("local_conv_"):].split(".", 1)
        return f"local_conv.{int(index) - 1}.{rest}"
    return key


def test_the_authors_conv_init_and_their_parameter_count() -> None:
    ours = build_op(TOKEN_MIXERS, TAG, {}, TensorType("tokens", 64, 7, 7))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in _AuthorsSAM(64, 4, 2).parameters())
    ours.init_weights()
    std = ours.local_conv[3].weight.std().item()  # fan_out = 81 * 16 / 16
    assert abs(std / (2 / 81) ** 0.5 - 1) < 0.2 and ours.local_conv[3].bias.abs().max() == 0


@pytest.mark.parametrize(("config", "x", "field", "message"), [
    ({"num_heads": 3}, TensorType("tokens", 16, 4, 4), "num_heads", "3 heads do not divide the input's 16 channels"),
    ({"kernel": 61, "kernel_step": 2}, TensorType("maps", 16, 4, 4), "kernel_step",
     "the last head's kernel 67 exceeds 63"),
], ids=["heads", "kernel"])
def test_the_shape_rule_refuses_bad_settings(config: dict[str, Any], x: TensorType, field: str, message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, TAG, config)
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get(TAG).resolve(spec, x)
    assert (err.value.field, err.value.message) == (field, message)


def test_prefix_tokens_are_refused_unless_routed_and_vectors_always() -> None:
    spec = op_spec(TOKEN_MIXERS, TAG, {})
    with pytest.raises(ShapeIssue, match="prefix"):
        TOKEN_MIXERS.get(TAG).resolve(spec, TensorType("tokens", 16, 4, 4, prefix=1))
    with pytest.raises(ShapeIssue):
        TOKEN_MIXERS.get(TAG).resolve(spec, TensorType("vector", 16))


@pytest.mark.parametrize("config", [{"kernel_step": 3}, {"kernel": 4}, {"num_heads": 0}, {"expand_ratio": 0}],
                         ids=["odd-step", "even-kernel", "no-heads", "no-expansion"])
def test_field_limits_are_checked_by_the_spec(config: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        op_spec(TOKEN_MIXERS, TAG, config)
