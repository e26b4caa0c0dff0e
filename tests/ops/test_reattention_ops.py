"""Re-attention (DeepViT, Zhou et al. 2021): ``attention``'s ``reattention`` option against a written-out reference
of the authors' ``ReAttention`` (same parameter names, so their state_dict loads), in training and in eval mode."""

from __future__ import annotations

import pytest
import torch
from helpers import build_op, max_diff, op_spec, perturbed
from torch import Tensor, nn

import metaformer_lab as ml
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import TOKEN_MIXERS

TOL = 1e-5


class _ReAttentionReference(nn.Module):
    """DeepViT's re-attention written out head by head: ``softmax(q kᵀ * scale)``, each head's new map a weighted
    sum of all heads' maps plus a bias, normalised per head with batch statistics (training) or running ones
    (eval), then applied to v. Parameter names are the authors' (``qkv``, ``reatten_matrix``, ``var_norm``,
    ``proj``); ``transform_scale`` multiplies the normalised maps by ``head_dim^-0.5``."""

    def __init__(self, dim: int, heads: int, transform_scale: bool) -> None:
        super().__init__()
        self.heads, self.transform_scale = heads, transform_scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.reatten_matrix = nn.Conv2d(heads, heads, 1)
        self.var_norm = nn.BatchNorm2d(heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        B, N, C = x.shape
        d = C // self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
        maps = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)  # (B, heads, N, N)
        weight, bias = self.reatten_matrix.weight[:, :, 0, 0], self.reatten_matrix.bias
        mixed = torch.stack([sum(weight[h, g] * maps[:, g] for g in range(self.heads)) + bias[h]
                             for h in range(self.heads)], dim=1)  # (B, heads, N, N)
        norm = self.var_norm
        if self.training:
            mean, var = mixed.mean(dim=(0, 2, 3)), mixed.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = norm.running_mean, norm.running_var
        shape = (1, self.heads, 1, 1)
        mixed = (mixed - mean.view(shape)) / (var.view(shape) + norm.eps).sqrt() * norm.weight.view(shape) \
            + norm.bias.view(shape)
        if self.transform_scale:
            mixed = mixed * d**-0.5
        return self.proj((mixed @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("transform_scale", [False, True], ids=["plain", "transform-scale"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reattention_matches_the_written_out_reference(train: bool, transform_scale: bool) -> None:
    x = TensorType("tokens", 16, 3, 3, prefix=1)
    reference = perturbed(_ReAttentionReference(16, 4, transform_scale))
    ours = build_op(TOKEN_MIXERS, "attention", {"num_heads": 4, "reattention": True, "fused": False,
                                                "scale_order": "after", "reattention_scale": transform_scale}, x)
    ours.load_state_dict(reference.state_dict(), strict=True)  # the authors' names, as they are
    reference.train(train)
    ours.train(train)
    inputs = torch.randn(x.shape(2))
    with torch.no_grad():
        assert max_diff(ours(inputs), reference(inputs)) < TOL


def test_reattention_folds_its_batchnorm_into_the_head_mix() -> None:
    spec = {"name": "d", "input": {"channels": 3, "size": 16}, "num_classes": 4,
            "stem": {"type": "patchify", "patch": 4},
            "stages": [{"depth": 2, "dim": 16, "layout": "tokens", "prefix_tokens": 1,
                        "block": {"token_mixer": {"type": "attention", "num_heads": 2, "reattention": True,
                                                  "fused": False}}}],
            "head": {"type": "class_token"}}
    net = ml.build(spec)
    mixer = net.stages[0].blocks[0].token_mixer
    assert mixer.reatten_matrix.weight.abs().max() > 0.1  # PyTorch's default init, as the authors', not std .02
    net = perturbed(net)
    deployed = ml.deploy(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(deployed(x), net(x)) < 1e-4


@pytest.mark.parametrize(("config", "field", "message"), [
    ({"reattention": True}, "reattention",
     "mixes the attention maps, which the fused kernel never forms; set fused: false"),
    ({"reattention_scale": True, "fused": False}, "reattention_scale",
     "scales re-attention's maps; set reattention: true"),
], ids=["fused", "scale-alone"])
def test_reattention_refusals_name_the_field(config: dict[str, bool], field: str, message: str) -> None:
    spec = op_spec(TOKEN_MIXERS, "attention", {"num_heads": 2, **config})
    with pytest.raises(ShapeIssue) as err:
        TOKEN_MIXERS.get("attention").resolve(spec, TensorType("tokens", 16, 2, 2))
    assert (err.value.field, err.value.message) == (field, message)


def test_reattention_is_left_out_of_the_latency_key_at_its_default() -> None:
    from metaformer_lab.ops.common import LATENCY_KEY

    spec = op_spec(TOKEN_MIXERS, "attention", {"num_heads": 2})
    assert "reattention" not in spec.model_dump_json(context={LATENCY_KEY: True})  # nor reattention_scale
    on = op_spec(TOKEN_MIXERS, "attention", {"num_heads": 2, "reattention": True, "fused": False})
    assert '"reattention":true' in on.model_dump_json(context={LATENCY_KEY: True})
