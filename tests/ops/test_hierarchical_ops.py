"""The non-attention ops of the hierarchical zoo families (Swin, PVTv2, Twins) against the timm modules they
reproduce, with copied (perturbed) weights: ConvFFN, the PEG, patch merging and the conv patch embeds; then
depth-reduced Swin / PVTv2 / Twins networks against timm through each family's key map.

The attention token mixers themselves are tested in test_attention_ops.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
from helpers import max_diff, perturbed, port
from timm.models.pvt_v2 import MlpWithDepthwiseConv, OverlapPatchEmbed
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging
from timm.models.swin_transformer_v2 import PatchMerging as TimmPatchMergingV2
from timm.models.twins import PatchEmbed as TwinsPatchEmbed
from timm.models.twins import PosConv
from torch import Tensor, nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.types import TensorType
from metaformer_lab.graph.lower import lower
from metaformer_lab.ops import CHANNEL_MIXERS, DOWNSAMPLERS, POSITIONS, STEMS
from metaformer_lab.spec.load import read_spec
from metaformer_lab.spec.yaml_io import load_yaml_file
from metaformer_lab.zoo import get
from metaformer_lab.zoo.keymap import convert

TOL = 1e-5
B = 2


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(1, 2)  # (B, H, W, C) -> (B, H*W, C)


# --- channel mixer --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra_relu", [False, True], ids=["pvt_v2", "pvt_v2_li"])
def test_conv_ffn_matches_timm_pvt_v2_mlp(extra_relu: bool) -> None:
    x_type = TensorType("tokens", 16, 6, 8)
    ref = MlpWithDepthwiseConv(16, hidden_features=64, extra_relu=extra_relu)
    spec = CHANNEL_MIXERS.get("conv_ffn").spec(ratio=4.0, hidden_act="relu" if extra_relu else "identity")
    ours = port(ref, CHANNEL_MIXERS.get("conv_ffn").make(spec, x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(_tokens(ours(x)), ref(_tokens(x), list(x_type.grid))) <= TOL


# --- position generator -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_peg_matches_twins_pos_conv(layout: str) -> None:
    x_type = TensorType(layout, 16, 6, 8)
    ref = PosConv(16, 16)
    opdef = POSITIONS.get("peg")
    ours = port(ref, opdef.make(opdef.spec(kernel=3), x_type), [(r"proj\.0\.", "proj.")])
    x = torch.randn(x_type.shape(B))
    grid = x if layout == "tokens" else x.permute(0, 2, 3, 1)  # (B, H, W, C)
    with torch.no_grad():
        y = ours(x) if layout == "tokens" else ours(x).permute(0, 2, 3, 1)
        assert max_diff(_tokens(y), ref(_tokens(grid), x_type.grid)) <= TOL


def test_peg_leaves_prefix_tokens_alone() -> None:
    x_type = TensorType("tokens", 8, 3, 4, prefix=1)
    opdef = POSITIONS.get("peg")
    ours = perturbed(opdef.make(opdef.spec(), x_type))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert torch.equal(ours(x)[:, :1], x[:, :1])


# --- downsamplers and stems ---------------------------------------------------------------------

def test_patch_merging_matches_timm_swin() -> None:
    x_type = TensorType("tokens", 16, 6, 8)
    opdef = DOWNSAMPLERS.get("patch_merging")
    spec = opdef.spec.model_validate({"norm": {"type": "layernorm", "eps": 1e-5}})
    assert opdef.resolve(spec, x_type, 32).out_type == TensorType("tokens", 32, 3, 4)
    ref = TimmPatchMerging(16, 32)
    ours = port(ref, opdef.make(spec, x_type, 32))
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


def test_patch_merging_with_the_norm_after_matches_timm_swin_v2() -> None:
    """Swin V2 normalises after the reduction (timm ``swin_transformer_v2.PatchMerging``)."""
    x_type = TensorType("tokens", 16, 6, 8)
    opdef = DOWNSAMPLERS.get("patch_merging")
    spec = opdef.spec.model_validate({"norm": None, "norm_after": {"type": "layernorm", "eps": 1e-5}})
    ref = TimmPatchMergingV2(16, 32)
    ours = port(ref, opdef.make(spec, x_type, 32), renames=[(r"^norm\.", "norm_after.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL


_LN5 = {"type": "layernorm", "eps": 1e-5}


def _downsample(config: dict[str, Any], x_type: TensorType, dim: int) -> nn.Module:
    opdef = DOWNSAMPLERS.get(config["type"])
    spec = opdef.spec.model_validate(config)
    return opdef.make(spec, x_type, dim)


def test_conv_downsample_matches_pvt_v2_overlap_patch_embed() -> None:
    """PVTv2's stage entry: conv 3x3 stride 2 pad 1, then LayerNorm (post-norm), NCHW in, NHWC out."""
    x_type = TensorType("maps", 16, 8, 8)
    config = {"type": "conv", "kernel": 3, "stride": 2, "padding": 1, "norm_after": _LN5}
    ref = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=16, embed_dim=32)
    ours = port(ref, _downsample(config, x_type, 32), [(r"proj\.", "conv.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        assert max_diff(ours(x).permute(0, 2, 3, 1), ref(x)) <= TOL


@pytest.mark.parametrize(("patch", "role"), [(4, "stem"), (2, "downsample")])
def test_patchify_and_conv_match_twins_patch_embed(patch: int, role: str) -> None:
    """Twins' per-stage patch embed: conv k = s = patch, then LayerNorm on the tokens."""
    channels = 3 if role == "stem" else 16
    x_type = TensorType("maps", channels, 16, 16)
    if role == "stem":
        opdef = STEMS.get("patchify")
        ours = opdef.make(opdef.spec.model_validate({"patch": patch, "norm_after": _LN5}), x_type, 32)
    else:
        config = {"type": "conv", "kernel": patch, "stride": patch, "padding": 0, "norm_after": _LN5}
        ours = _downsample(config, x_type, 32)
    ref = TwinsPatchEmbed(img_size=16, patch_size=patch, in_chans=channels, embed_dim=32)
    ours = port(ref, ours, [(r"proj\.", "conv.")])
    x = torch.randn(x_type.shape(B))
    with torch.no_grad():
        expected, size = ref(x)
        assert max_diff(ours(x).flatten(2).transpose(1, 2), expected) <= TOL
        assert size == (16 // patch, 16 // patch)


# --- whole networks, depth-reduced, through the family key maps -----------------------------------

def _reduced_spec(zoo_name: str, depths: list[int]) -> Any:
    """The zoo spec with fewer blocks per stage (named blocks are resolved by read_spec)."""
    from metaformer_lab.spec.load import zoo_dir

    data = copy.deepcopy(load_yaml_file(zoo_dir() / f"{zoo_name}.yaml"))
    for stage, depth in zip(data["stages"], depths, strict=True):
        stage["depth"] = depth
    return read_spec(data)


_NETWORKS = [
    ("swin_tiny_patch4_window7_224", [2, 2, 2, 2], {"depths": (2, 2, 2, 2)}),
    ("pvt_v2_b0", [1, 2, 1, 1], {"depths": (1, 2, 1, 1)}),
    ("pvt_v2_b2_li", [1, 1, 1, 2], {"depths": (1, 1, 1, 2)}),
    ("twins_pcpvt_small", [2, 1, 1, 2], {"depths": [2, 1, 1, 2]}),
    ("twins_svt_small", [2, 2, 3, 2], {"depths": [2, 2, 3, 2]}),
]


@pytest.mark.parametrize(("zoo_name", "depths", "kwargs"), _NETWORKS, ids=[n[0] for n in _NETWORKS])
def test_reduced_network_matches_timm(zoo_name: str, depths: list[int], kwargs: dict[str, Any]) -> None:
    """Block order, norms, the PEG's place and the head, checked end to end at fewer blocks."""
    zoo = get(zoo_name)
    torch.manual_seed(0)
    ref = perturbed(timm.create_model(zoo.timm_name, pretrained=False, **kwargs))
    ours = compile_graph(lower(_reduced_spec(zoo_name, depths))).eval()
    target = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(convert(zoo.key_map, ref.state_dict(), target), strict=True)
    x = torch.randn(B, 3, 224, 224)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) <= TOL
