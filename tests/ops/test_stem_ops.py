"""Stems, downsamplers and embeddings beyond a single conv: the conv stack's per-conv kernels, act/norm order and
max-pool (against timm's Visformer, LeViT and ResNet stems, and CMT's stem written out), the conv downsampler's
activation, CrossFormer's cross-scale embedding, T2T-ViT's soft split and its tokens-to-token module (against
references written here)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, build_op, max_diff, op_spec, perturbed, port
from torch import Tensor, nn

import metaformer_lab
from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.types import TensorType
from metaformer_lab.latency.gpu import estimate_gpu
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.ops.common import LATENCY_KEY

TOL = 1e-5
B = 2
IMAGE = TensorType("maps", 3, 32, 32)


def _run(module: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return module(x)


# --- conv stack -------------------------------------------------------------------------------------

def test_conv_stack_matches_timm_visformer_stem() -> None:
    """Visformer's stem: one 7x7 stride-2 conv, BatchNorm, ReLU (``init_channels``)."""
    from timm.models.visformer import Visformer

    ref = Visformer(img_size=32, init_channels=16, embed_dim=32, depth=3, num_heads=2, num_classes=0).stem
    config = {"strides": [2], "kernels": [7], "act": "relu"}
    ours = port(ref, build_op("stem", "conv_stack", config, IMAGE, 16),
                [(r"^0\.", "0.conv."), (r"^1\.", "0.norm.")])
    x = torch.randn(IMAGE.shape(B))
    assert max_diff(_run(ours, x), _run(ref, x)) <= TOL


@pytest.mark.parametrize("size", [(32, 32), (15, 16)])
def test_conv_stack_same_padding_matches_timm_maxvit_tf_stem(size: tuple[int, int]) -> None:
    """``same_padding``: MaxViT's tf stem (3x3/2 conv padded as TensorFlow pads, BN + tanh-GELU, 3x3 conv),
    bit for bit, on even and odd inputs."""
    from timm.models.maxxvit import Stem

    ref = Stem(3, 16, padding="same", bias=True, act_layer="gelu_tanh", norm_layer="batchnorm2d", norm_eps=1e-3)
    image = TensorType("maps", 3, *size)
    config = {"strides": [2, 1], "widths": [16], "bias": True, "same_padding": True, "act": "gelu_tanh",
              "norm": {"type": "batchnorm", "eps": 1e-3}, "last_norm": False, "last_act": False}
    ours = port(ref, build_op("stem", "conv_stack", config, image, 16),
                [(r"^conv1\.", "0.conv."), (r"^norm1\.", "0.norm."), (r"^conv2\.", "1.conv.")])
    x = torch.randn(image.shape(B))
    with torch.no_grad():
        y = ours(x)
        assert y.shape[-2:] == (-(-size[0] // 2), -(-size[1] // 2))
        assert torch.equal(y, ref(x))


def test_mbconv_same_padding_matches_timm_maxvit_tf_mbconv() -> None:
    """``same_padding`` on MBConv's strided depthwise conv: MaxViT's tf MbConvBlock (without its shortcut)."""
    from timm.models.maxxvit import MaxxVitConvCfg, MbConvBlock

    cfg = MaxxVitConvCfg(norm_eps=1e-3, act_layer="gelu_tanh", padding="same")
    ref = MbConvBlock(8, 16, stride=2, cfg=cfg)
    ref.shortcut = nn.Identity()  # the block's shortcut is ours too, but not the op's
    x_type = TensorType("maps", 8, 7, 6)
    config = {"stride": 2, "out_dim": 16, "expand_from": "out", "same_padding": True, "act": "gelu_tanh",
              "pre_norm": {"type": "batchnorm", "eps": 1e-3}, "norm": {"type": "batchnorm", "eps": 1e-3},
              "se_ratio": 0.25, "se_from": "out", "se_act": "silu", "out_bias": True}
    ours = port(ref, build_op("token_mixer", "mbconv", config, x_type),
                [(r"^conv1_1x1\.", "expand_conv."), (r"^norm1\.", "expand_norm."),
                 (r"^conv2_kxk\.", "dw_conv."), (r"^norm2\.", "dw_norm."), (r"^conv3_1x1\.", "project_conv.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = ref.conv3_1x1(ref.se(ref.norm2(ref.conv2_kxk(ref.norm1(ref.conv1_1x1(ref.pre_norm(x)))))))
        assert torch.equal(ours(x), expected)


def test_conv_stack_matches_timm_levit_stem() -> None:
    """LeViT's Stem16: four 3x3 stride-2 conv + BatchNorm, Hardswish between them, none after the last."""
    from timm.models.levit import Stem16

    ref = Stem16(3, 32, act_layer=nn.Hardswish)
    config = {"strides": [2, 2, 2, 2], "widths": [4, 8, 16], "act": "hardswish", "last_act": False}
    renames = [(rf"^conv{i + 1}\.linear\.", f"{i}.conv.") for i in range(4)]
    renames += [(rf"^conv{i + 1}\.bn\.", f"{i}.norm.") for i in range(4)]
    ours = port(ref, build_op("stem", "conv_stack", config, IMAGE, 32), renames)
    x = torch.randn(IMAGE.shape(B))
    assert max_diff(_run(ours, x), _run(ref, x)) <= TOL


def test_conv_stack_pool_matches_timm_resnet_stem() -> None:
    """ResNet's stem: 7x7 stride-2 conv, BatchNorm, ReLU, then a 3x3 stride-2 max-pool (padding 1)."""
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0)
    ref = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    config = {"strides": [2], "kernels": [7], "pool": {"kernel": 3, "stride": 2}}
    ours = port(ref, build_op("stem", "conv_stack", config, IMAGE, 64), [(r"^0\.", "0.conv."), (r"^1\.", "0.norm.")])
    x = torch.randn(IMAGE.shape(B))
    out = _run(ours, x)
    assert out.shape == (B, 64, 8, 8)
    assert max_diff(out, _run(ref, x)) <= TOL


def test_conv_stack_act_norm_matches_cmt_stem() -> None:
    """CMT's stem (not in timm): 3x3 conv stride 2, GELU, BatchNorm, then twice the same with stride 1."""
    config = {"strides": [2, 1, 1], "widths": [8, 8], "bias": True, "act": "gelu", "order": "act_norm"}
    ours = perturbed(build_op("stem", "conv_stack", config, IMAGE, 8))
    x = torch.randn(IMAGE.shape(B))
    expected = x
    for layer, stride in zip(ours, [2, 1, 1], strict=True):
        conv, bn = layer.conv, layer.norm
        expected = F.conv2d(expected, conv.weight, conv.bias, stride=stride, padding=1)
        expected = F.batch_norm(F.gelu(expected), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    assert max_diff(_run(ours, x), expected) <= TOL


def test_conv_stack_kernels_default_to_kernel_and_keep_the_module() -> None:
    """Leaving the new options out builds what was built before: same parameters, same names, same outputs."""
    config = {"strides": [2, 2], "kernel": 5}
    old = build_op("stem", "conv_stack", config, IMAGE, 16)
    new = build_op("stem", "conv_stack", {**config, "kernels": [5, 5], "order": "norm_act"}, IMAGE, 16)
    assert [(k, v.shape) for k, v in old.state_dict().items()] == [(k, v.shape) for k, v in new.state_dict().items()]
    new.load_state_dict(old.state_dict())
    x = torch.randn(IMAGE.shape(B))
    assert max_diff(_run(old, x), _run(new, x)) == 0


def test_act_norm_stack_deploys_without_folding_across_the_activation() -> None:
    config = {"strides": [2, 1], "widths": [8], "act": "gelu", "order": "act_norm", "pool": {}}
    module = perturbed(build_op("stem", "conv_stack", config, IMAGE, 8))
    deployed = metaformer_lab.deploy(module)
    x = torch.randn(IMAGE.shape(B))
    assert max_diff(_run(deployed, x), _run(module, x)) <= 1e-4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == 2


# --- conv downsampler's activation ------------------------------------------------------------------

def test_conv_downsampler_act_follows_its_norm_and_survives_deploy() -> None:
    x_type = TensorType("maps", 8, 8, 8)
    config = {"norm_after": {"type": "batchnorm"}, "act": "gelu"}
    module = perturbed(build_op("downsample", "conv", config, x_type, 16))
    x = torch.randn(x_type.shape(B))
    bn = module.norm
    with torch.no_grad():
        expected = F.gelu(F.batch_norm(module.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
    assert max_diff(_run(module, x), expected) <= TOL
    deployed = metaformer_lab.deploy(module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # the BatchNorm went into the conv
    assert max_diff(_run(deployed, x), expected) <= 1e-4


# --- cross-scale embedding (CrossFormer) ------------------------------------------------------------

def _crossformer_widths(dim: int, n: int) -> list[int]:
    """CrossFormer's split, as its PatchEmbed / PatchMerging loop computes it."""
    return [dim // 2 ** i if i == n - 1 else dim // 2 ** (i + 1) for i in range(n)]


def _crossformer_embed(x: Tensor, convs: list[nn.Conv2d], stride: int, kernels: list[int],
                       norm: nn.LayerNorm | None) -> Tensor:
    """CrossFormer's ``PatchEmbed.forward`` (norm after) on maps -> tokens (B, H*W, C), conv by conv."""
    tokens = [F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=(k - kernels[0]) // 2).flatten(2)
              .transpose(1, 2) for conv, k in zip(convs, kernels, strict=True)]
    out = torch.cat(tokens, dim=2)
    return norm(out) if norm is not None else out


def test_cross_scale_stem_matches_crossformer_patch_embed() -> None:
    config = {"kernels": [4, 8, 16, 32], "norm_after": {"type": "layernorm", "eps": 1e-5}}
    ours = perturbed(build_op("stem", "cross_scale", config, IMAGE, 48))
    convs = list(ours.conv.projs)
    assert [c.out_channels for c in convs] == _crossformer_widths(48, 4) == [24, 12, 6, 6]
    norm = nn.LayerNorm(48)
    norm.load_state_dict({"weight": ours.norm.weight, "bias": ours.norm.bias})
    x = torch.randn(IMAGE.shape(B))
    with torch.no_grad():
        expected = _crossformer_embed(x, convs, 4, [4, 8, 16, 32], norm)
    assert max_diff(_run(ours, x).flatten(2).transpose(1, 2), expected) <= TOL


def test_cross_scale_downsampler_matches_crossformer_patch_merging() -> None:
    """CrossFormer's PatchMerging: LayerNorm on the tokens first, then the convs (stride 2) concatenated."""
    x_type = TensorType("maps", 8, 8, 8)
    config = {"kernels": [2, 4], "norm_before": {"type": "layernorm", "eps": 1e-5}}
    ours = perturbed(build_op("downsample", "cross_scale", config, x_type, 16))
    convs = list(ours.conv.projs)
    assert [c.out_channels for c in convs] == _crossformer_widths(16, 2) == [8, 8]
    norm = nn.LayerNorm(8)
    norm.load_state_dict({"weight": ours.norm.weight, "bias": ours.norm.bias})
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        normed = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W), normed over C
        expected = _crossformer_embed(normed, convs, 2, [2, 4], None)
    assert max_diff(_run(ours, x).flatten(2).transpose(1, 2), expected) <= TOL


# --- soft split (T2T-ViT) ---------------------------------------------------------------------------

def _soft_split_reference(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """Patch by patch: token (i, j) is the zero-padded window at (i*stride, j*stride), flattened (C, row, col)."""
    padded = F.pad(x, (padding,) * 4)
    rows = (padded.shape[2] - kernel) // stride + 1
    cols = (padded.shape[3] - kernel) // stride + 1
    out = torch.empty(x.shape[0], rows, cols, x.shape[1] * kernel * kernel)
    for i in range(rows):
        for j in range(cols):
            window = padded[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            out[:, i, j] = window.flatten(1)
    return out  # (B, H', W', C*k*k)


@pytest.mark.parametrize(("role", "kernel", "stride", "x_type"), [
    pytest.param("stem", 7, 4, IMAGE, id="t2t-first"),
    pytest.param("downsample", 3, 2, TensorType("maps", 4, 8, 6), id="t2t-later"),
])
def test_soft_split_matches_a_patch_by_patch_reference(role: str, kernel: int, stride: int,
                                                       x_type: TensorType) -> None:
    width = x_type.channels * kernel * kernel
    module = build_op(role, "soft_split", {"kernel": kernel, "stride": stride}, x_type, width)
    x = torch.randn(x_type.shape(B))
    out = _run(module, x)
    padding = (kernel - stride + 1) // 2  # T2T's 7/4/2 and 3/2/1
    assert max_diff(out, _soft_split_reference(x, kernel, stride, padding)) == 0
    unfolded = nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)  # T2T's own call
    assert max_diff(out.flatten(1, 2), unfolded) == 0


def test_soft_split_projects_when_the_width_differs() -> None:
    """T2T's last split: unfold, then ``project``, a Linear from C*k*k to the embedding width."""
    x_type = TensorType("maps", 4, 8, 8)
    module = build_op("downsample", "soft_split", {}, x_type, 24)
    assert isinstance(module.proj, nn.Linear) and (module.proj.in_features, module.proj.out_features) == (36, 24)
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected = module.proj(_soft_split_reference(x, 3, 2, 1))
    assert max_diff(_run(module, x), expected) <= TOL


# --- what the shape rules refuse --------------------------------------------------------------------

@pytest.mark.parametrize(("role", "tag", "config", "x", "out_dim", "field", "message"), [
    pytest.param("stem", "conv_stack", {"strides": [2, 2], "kernels": [3]}, IMAGE, 16, "kernels",
                 "needs 2 entries (one per conv), got 1", id="kernels-count"),
    pytest.param("stem", "conv_stack", {"strides": [8, 8], "kernels": [3, 7]}, IMAGE, 16, "kernels[1]",
                 "7 is larger than the padded 4x4 input", id="kernel-too-large"),
    pytest.param("stem", "conv_stack", {"strides": [2], "pool": {"kernel": 3, "padding": 2}}, IMAGE, 16,
                 "pool.padding", "2 is more than half the kernel 3", id="pool-padding"),
    pytest.param("stem", "conv_stack", {"strides": [8, 4], "pool": {"kernel": 3, "padding": 0}}, IMAGE, 16,
                 "pool.kernel", "3 is larger than the padded 1x1 input", id="pool-too-large"),
    pytest.param("stem", "cross_scale", {"kernels": [4, 8]}, IMAGE, 15, "widths",
                 "the default split halves the width 1 times, but 2 does not divide 15", id="split"),
    pytest.param("stem", "cross_scale", {"kernels": [4, 8], "widths": [8, 4]}, IMAGE, 16, "widths",
                 "sum to 12, but the op's width is 16", id="widths-sum"),
    pytest.param("downsample", "cross_scale", {"kernels": [2, 5]}, TensorType("maps", 8, 8, 8), 16, "kernels[1]",
                 "5 minus the stride 2 is odd", id="odd-difference"),
    pytest.param("downsample", "cross_scale", {"kernels": [4, 2]}, TensorType("maps", 8, 8, 8), 16, "kernels[1]",
                 "2 is smaller than the stride 4", id="kernel-below-stride"),
    pytest.param("downsample", "soft_split", {"kernel": 7, "padding": 0}, TensorType("maps", 8, 4, 4), 16,
                 "kernel", "7 is larger than the padded 4x4 input", id="soft-split-kernel"),
    pytest.param("stem", "t2t", {"kernels": [3, 3, 3], "strides": [2, 2]}, IMAGE, 16, "strides",
                 "needs 3 entries (one per kernel), got 2", id="t2t-strides"),
    pytest.param("stem", "t2t", {"kernels": [7, 3, 3], "strides": [4, 8, 4]}, IMAGE, 16, "kernels[2]",
                 "3 is larger than the padded 1x1 input", id="t2t-too-small"),
])
def test_shape_rules_reject(role: str, tag: str, config: dict[str, Any], x: TensorType, out_dim: int, field: str,
                            message: str) -> None:
    with pytest.raises(ShapeIssue) as err:
        REGISTRIES[role].get(tag).resolve(op_spec(role, tag, config), x, out_dim)
    assert (err.value.field, err.value.message.split(";")[0]) == (field, message)


def test_a_spec_reports_the_path_of_a_bad_kernel() -> None:
    spec = {"name": "bad", "input": {"channels": 3, "size": 32}, "num_classes": 5,
            "stem": {"type": "conv_stack", "strides": [8, 8], "kernels": [3, 7]},
            "stages": [{"depth": 1, "dim": 16, "block": {"token_mixer": {"type": "pooling"}}}],
            "head": {"type": "pool_norm_linear"}}
    with pytest.raises(metaformer_lab.SpecError) as err:
        metaformer_lab.build(spec)
    assert [(i.path, i.message) for i in err.value.issues] == [("stem.kernels[1]",
                                                                "7 is larger than the padded 4x4 input")]


# --- latency keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "tag", "options"), [
    ("stem", "conv_stack", {"kernels": [3, 3], "order": "act_norm", "pool": {}}),
    ("downsample", "conv", {"act": "gelu"}),
])
def test_latency_keys_leave_out_new_options_at_their_defaults(role: str, tag: str, options: dict[str, Any]) -> None:
    key = op_spec(role, tag, {}).model_dump_json(context={LATENCY_KEY: True})
    assert not any(f'"{name}"' in key for name in options)
    for name, value in options.items():
        assert op_spec(role, tag, {name: value}).model_dump_json(context={LATENCY_KEY: True}) != key


# --- T2T-ViT's tokens-to-token module ---------------------------------------------------------------

class _T2TAttention(nn.Module):
    """T2T-ViT's token attention, as its code computes it: heads split out (one here), q scaled by the input
    width, the residual around the values."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.in_dim, self.scale = in_dim, dim**-0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=False)
        self.proj = nn.Linear(in_dim, in_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.in_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, 1, N, in_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.in_dim))
        return v.squeeze(1) + out


class _T2TTokenTransformer(nn.Module):
    def __init__(self, dim: int, in_dim: int) -> None:
        from timm.layers import Mlp

        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _T2TAttention(dim, in_dim)
        self.norm2, self.mlp = nn.LayerNorm(in_dim), Mlp(in_dim, in_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _T2TPerformer(nn.Module):
    """T2T-ViT's ``Token_performer`` (head_cnt 1, dropout left out), as its code computes it: kqv in that order,
    positive random features of a fixed orthogonal w (a frozen parameter there), einsums, eps 1e-8."""

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5) -> None:
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(self.emb)
        self.mlp = nn.Sequential(nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb))
        self.m = int(self.emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.randn(self.m, self.emb)) * self.m**0.5
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x: Tensor) -> Tensor:
        xd = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, self.m) / 2
        return torch.exp(torch.einsum("bti,mi->btm", x, self.w) - xd) / self.m**0.5

    def forward(self, x: Tensor) -> Tensor:
        k, q, v = torch.split(self.kqv(self.norm1(x)), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
        kptv = torch.einsum("bin,bim->bnm", v, kp)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, self.emb) + 1e-8)
        x = v + self.proj(y)
        return x + self.mlp(self.norm2(x))


class _T2TModule(nn.Module):
    """T2T-ViT's ``T2T_module`` (transformer or performer variant): splits 7/4/2, 3/2/1, 3/2/1, two token
    transformers, a projection; square maps rebuilt from the token count between the splits."""

    def __init__(self, in_chans: int, token_dim: int, embed_dim: int, performer: bool = False) -> None:
        super().__init__()
        self.soft_split0 = nn.Unfold(7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(3, stride=2, padding=1)
        block = _T2TPerformer if performer else _T2TTokenTransformer
        self.attention1 = block(in_chans * 49, token_dim)
        self.attention2 = block(token_dim * 9, token_dim)
        self.project = nn.Linear(token_dim * 9, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        for split, attention in ((self.soft_split0, self.attention1), (self.soft_split1, self.attention2)):
            x = attention(split(x).transpose(1, 2))
            B, N, C = x.shape
            side = int(N**0.5)
            x = x.transpose(1, 2).reshape(B, C, side, side)
        return self.project(self.soft_split2(x).transpose(1, 2))


def test_t2t_stem_matches_the_t2t_module() -> None:
    x_type = TensorType("maps", 3, 64, 64)
    ref = _T2TModule(3, token_dim=16, embed_dim=24)
    renames = [(r"^attention1\.", "attentions.0."), (r"^attention2\.", "attentions.1.")]
    ours = port(ref, build_op("stem", "t2t", {"token_dim": 16}, x_type, 24), renames)
    x = torch.randn(x_type.shape(B))
    out = _run(ours, x)
    assert out.shape == (B, 4, 4, 24)  # 64 / 4 / 2 / 2
    assert max_diff(out.flatten(1, 2), _run(ref, x)) <= TOL


def test_t2t_performer_stem_matches_the_performer_t2t_module() -> None:
    """``attention: performer``: T2T-ViT-14's Token_performer, its fixed w loaded like a weight."""
    x_type = TensorType("maps", 3, 64, 64)
    ref = _T2TModule(3, token_dim=16, embed_dim=24, performer=True)
    renames = [(r"^attention(\d)\.(kqv|proj|w)", r"attention\1.attn.\2"), (r"\.mlp\.0\.", ".mlp.fc1."),
               (r"\.mlp\.2\.", ".mlp.fc2."), (r"^attention1\.", "attentions.0."), (r"^attention2\.", "attentions.1.")]
    config = {"token_dim": 16, "attention": "performer", "qkv_bias": True}
    ours = port(ref, build_op("stem", "t2t", config, x_type, 24), renames)
    attn = ours.attentions[0].attn
    assert attn.w.shape == (8, 16) and "w" not in dict(attn.named_parameters())  # a buffer, int(0.5 * 16) features
    x = torch.randn(x_type.shape(B))
    out = _run(ours, x)
    assert out.shape == (B, 4, 4, 24)
    assert max_diff(out.flatten(1, 2), _run(ref, x)) <= TOL


def test_t2t_performer_features_are_fixed_and_orthogonal() -> None:
    module = build_op("stem", "t2t", {"token_dim": 16, "attention": "performer", "kernel_ratio": 0.25},
                      TensorType("maps", 3, 64, 64), 24)
    w = module.attentions[1].attn.w
    assert w.shape == (4, 16) and not w.requires_grad
    assert max_diff(w @ w.t(), 4 * torch.eye(4)) <= 1e-5  # orthogonal rows times sqrt(m)


def test_t2t_token_attention_changes_the_width_around_its_values() -> None:
    """The token transformer's input is C*k*k wide, its output token_dim: the residual is ``v``, not the input."""
    module = build_op("stem", "t2t", {"token_dim": 8}, TensorType("maps", 3, 64, 64), 16)
    attn = module.attentions[0].attn
    assert (attn.qkv.in_features, attn.qkv.out_features, attn.proj.out_features) == (147, 24, 8)
    x = torch.randn(B, 5, 147)
    with torch.no_grad():
        v = attn.qkv(x)[..., 16:]
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
        assert max_diff(attn(x), v) == 0


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm", "groupnorm", "rmsnorm", "affine"])
def test_t2t_takes_any_norm_on_its_tokens(norm: str) -> None:
    x_type = TensorType("maps", 3, 32, 32)
    config = {"kernels": [7, 3], "strides": [4, 2], "token_dim": 8, "norm": {"type": norm}}
    module = build_op("stem", "t2t", config, x_type, 16)
    assert _run(module, torch.randn(x_type.shape(B))).shape == (B, 4, 4, 16)


@pytest.mark.parametrize("name", ["tiny_cmt_style", "tiny_crossformer_style", "tiny_soft_split", "tiny_t2t_style"])
def test_the_gpu_estimate_reads_the_new_stems(name: str) -> None:
    """The estimator records every kernel on the meta device (the token attention's SDPA gets 4-D inputs)."""
    estimate = estimate_gpu(ROOT / "examples" / f"{name}.yaml", "h100", input_size=32)
    assert estimate.nodes_ms["stem"] > 0
