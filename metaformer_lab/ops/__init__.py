"""The block library: one file per op family, registries built from explicit lists (listable, no
import side effects). Each op is a config class + shape rule + module builder (see core.registry); the op files
take torch from core.lazy_torch, so reading them (to check a spec) does not import torch."""

from __future__ import annotations

from metaformer_lab.core.registry import Registry
from metaformer_lab.ops import (
    agent_attention,
    aggregated_attention,
    attention,
    class_attention,
    composite,
    concat,
    conv_mixers,
    cross_scale,
    dilated_attention,
    downsamplers,
    focal_attention,
    focal_modulation,
    gated,
    global_query_attention,
    gpsa,
    heads,
    identity,
    inception_mixer,
    layer_class_attention,
    linear_attention,
    mbconv,
    mlp,
    multiscale_linear_attention,
    norms,
    pooling,
    pooling_attention,
    position,
    random_mixing,
    rel_pos_attention,
    routing_attention,
    scale_aware_modulation,
    soft_split,
    sr_attention,
    stems,
    talking_heads,
    token_mlp,
    window_attention,
)

TOKEN_MIXERS = Registry.of("token mixer", [
    identity.IDENTITY,
    random_mixing.RANDOM_MIXING,
    pooling.POOLING,
    conv_mixers.DWCONV,
    conv_mixers.SEPCONV,
    token_mlp.TOKEN_MLP,
    token_mlp.TOKEN_LINEAR,
    attention.ATTENTION,
    window_attention.WINDOW_ATTENTION,
    global_query_attention.GLOBAL_QUERY_ATTENTION,
    sr_attention.SR_ATTENTION,
    agent_attention.AGENT_ATTENTION,
    routing_attention.ROUTING_ATTENTION,
    pooling_attention.POOLING_ATTENTION,
    linear_attention.LINEAR_ATTENTION,
    talking_heads.TALKING_HEADS_ATTENTION,
    class_attention.CLASS_ATTENTION,
    gpsa.GPSA,
    rel_pos_attention.REL_POS_ATTENTION,
    multiscale_linear_attention.MULTISCALE_LINEAR_ATTENTION,
    focal_modulation.FOCAL_MODULATION,
    scale_aware_modulation.SCALE_AWARE_MODULATION,
    dilated_attention.DILATED_ATTENTION,
    focal_attention.FOCAL_ATTENTION,
    mbconv.MBCONV,
    composite.PARALLEL,
    composite.SPLIT,
    gated.GATED,
    concat.CONCAT,
    inception_mixer.INCEPTION_MIXER,
    aggregated_attention.AGGREGATED_ATTENTION,
])
CHANNEL_MIXERS = Registry.of("channel mixer", [mlp.MLP, mlp.CONV_FFN, mlp.GLU, mbconv.MBCONV])
NORMS = Registry.of("norm", norms.NORM_DEFS)
STEMS = Registry.of("stem", [stems.PATCHIFY, stems.CONV_STEM, stems.CONV_STACK, cross_scale.CROSS_SCALE_STEM,
                             soft_split.SOFT_SPLIT_STEM, soft_split.T2T])
DOWNSAMPLERS = Registry.of("downsampler", [downsamplers.CONV_DOWN, downsamplers.PATCH_MERGING,
                                           downsamplers.POOL_DOWN, cross_scale.CROSS_SCALE_DOWN,
                                           soft_split.SOFT_SPLIT_DOWN])
HEADS = Registry.of("head", [heads.POOL_NORM_LINEAR, heads.CLASS_TOKEN, heads.MLP_HEAD, heads.CONV_MLP_HEAD,
                             layer_class_attention.LAYER_CLASS_ATTENTION])
POSITIONS = Registry.of("position embedding", [position.LEARNED_POS, position.SINUSOIDAL_POS, position.PEG])

REGISTRIES: dict[str, Registry] = {
    "token_mixer": TOKEN_MIXERS,
    "channel_mixer": CHANNEL_MIXERS,
    "norm": NORMS,
    "stem": STEMS,
    "downsample": DOWNSAMPLERS,
    "head": HEADS,
    "pos_embed": POSITIONS,
}
"""Role name (as in the spec and the graph) -> registry."""

__all__ = ["CHANNEL_MIXERS", "DOWNSAMPLERS", "HEADS", "NORMS", "POSITIONS", "REGISTRIES", "STEMS", "TOKEN_MIXERS"]
