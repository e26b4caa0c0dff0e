"""The table of invalid specs, each with the exact path and message of its error (used by the spec and
CLI tests)."""

from __future__ import annotations

import pytest

POOL = "{token_mixer: {type: pooling}}"
S0 = f"{{depth: 1, dim: 16, block: {POOL}}}"
S1 = ("{depth: 1, dim: 32, downsample: {type: conv}, layout: tokens, "
      "block: {token_mixer: {type: attention, head_dim: 8}}}")
PARTS = {
    "name": "name: base",
    "input": "input: {size: 32}",
    "num_classes": "num_classes: 10",
    "stem": "stem: {type: patchify, patch: 4}",
    "stages": f"stages: [{S0}, {S1}]",
    "head": "head: {type: pool_norm_linear}",
}


def doc(**parts: str) -> str:
    """The base spec (valid) with some top-level entries replaced; '' drops an entry."""
    merged = {**PARTS, **{k: v for k, v in parts.items()}}
    return "\n".join(v for v in merged.values() if v) + "\n"


def stages(*items: str) -> str:
    return "stages: [" + ", ".join(items) + "]"


def block(text: str, stage: str = "depth: 1, dim: 16") -> str:
    return f"{{{stage}, block: {text}}}"


INVALID = [
    # --- schema: types, ranges, names -----------------------------------------------------
    pytest.param(doc(stages=stages(block("{token_mixer: {type: atention}}"))), "stages[0].block.token_mixer.type",
                 "unknown 'atention' (did you mean 'attention'?)", id="unknown-mixer"),
    pytest.param(doc(stages=stages(block("{channel_mixer: {type: mlp}}"))), "stages[0].block.token_mixer",
                 "is required", id="missing-mixer"),
    pytest.param(doc(stages=stages(block("{token_mixer: {pool_size: 3}}"))), "stages[0].block.token_mixer.type",
                 "is required; one of: identity", id="mixer-without-type"),
    pytest.param(doc(stem="stem: {type: conv, kernl: 3}"), "stem.kernl", "unknown field (did you mean 'kernel'?)",
                 id="unknown-field"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 0, dim: 16"))), "stages[0].depth", "0 must be >= 1",
                 id="depth-zero"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 1, dim: wide"))), "stages[0].dim",
                 "expected an integer, got 'wide'", id="dim-not-int"),
    pytest.param(doc(num_classes="num_classes: -3"), "num_classes", "-3 must be >= 0", id="negative-classes"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: pooling, pool_size: 4}}"))),
                 "stages[0].block.token_mixer.pool_size", "4 must be odd", id="even-pool"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 1, dim: 16, layout: rows"))), "stages[0].layout",
                 "'rows' is not one of", id="bad-layout"),
    pytest.param(doc(input="input: {size: 100000}"), "input.size", "100000 must be <= 4096", id="huge-input"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: pooling}, layer_scale: -1.0}"))),
                 "stages[0].block.layer_scale", "-1 must be >= 0", id="negative-layer-scale"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: pooling}, template: poolformer}"))),
                 "stages[0].block.template", "'poolformer' is not one of", id="unknown-template"),
    pytest.param(doc(head="head: {type: linear}"), "head.type", "unknown 'linear'", id="unknown-head"),
    pytest.param(doc(name="name: my model!"), "name", "may contain only letters", id="bad-name"),
    pytest.param(doc(stages=stages(S0, "{depth: 1, dim: 32, downsample: {type: conv}, layout: tokens, block: "
                                       "{token_mixer: {type: attention, head_dim: 8, qkv_bias: 1}}}")),
                 "stages[1].block.token_mixer.qkv_bias", "expected true or false, got 1", id="int-as-bool"),
    pytest.param(doc(stages="stages: []"), "stages", "needs at least 1 item(s), got 0", id="no-stages"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: dwconv, kernel: [3, 3, 3]}}"))),
                 "stages[0].block.token_mixer.kernel", "expected one integer or a list of two", id="kernel-3d"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: pooling}, channel_mixer: {type: mlp, ratio: 0.0}}"))),
                 "stages[0].block.channel_mixer.ratio", "0 must be > 0", id="zero-ratio"),
    pytest.param("name: base\nnumclasses: 3\n" + "\n".join(v for k, v in PARTS.items() if k != "name"),
                 "numclasses", "unknown field (did you mean 'num_classes'?)", id="top-level-typo"),
    pytest.param(doc(stages=stages(block(POOL)), head="head: {type: pool_norm_linear, drop: 1.5}"), "head.drop",
                 "1.5 must be < 1", id="drop-out-of-range"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: parallel, branches: [{type: identity}]}}"))),
                 "stages[0].block.token_mixer.branches", "needs at least 2 item(s), got 1", id="parallel-one-branch"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: parallel, branches: [{type: identity}, "
                                         "{type: poling}]}}"))),
                 "stages[0].block.token_mixer.branches[1].type", "unknown 'poling' (did you mean 'pooling'?)",
                 id="composite-branch-type"),
    # --- named blocks -----------------------------------------------------------------------
    pytest.param(doc(stages=stages(block("convformr"))), "stages[0].block",
                 "unknown block 'convformr' (did you mean 'convformer'?)", id="unknown-block"),
    pytest.param(doc(stages=stages(block("[poolformer, poolformr]"))), "stages[0].block[1]",
                 "unknown block 'poolformr'", id="unknown-block-in-list"),
    pytest.param(doc(stages=stages(block("{base: convnxt, layer_scale: 0.1}"))), "stages[0].block.base",
                 "unknown block 'convnxt' (did you mean 'convnext'?)", id="unknown-base"),
    pytest.param(doc(stages=stages(block("../../etc/passwd"))), "stages[0].block",
                 "expected a block name", id="block-path-traversal"),
    # --- shapes (checked on the typed graph) ------------------------------------------------
    pytest.param(doc(stages=stages(S0, "{depth: 1, dim: 40, downsample: {type: conv}, layout: tokens, block: "
                                       "{token_mixer: {type: attention, num_heads: 3, head_dim: null}}}")),
                 "stages[1].block.token_mixer.num_heads", "3 does not divide dim 40", id="heads-dont-divide"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: window_attention, window: 3, num_heads: 2}}",
                                         "depth: 1, dim: 16, layout: tokens"))),
                 "stages[0].block.token_mixer.window", "3 does not divide the 8x8 feature map", id="window"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: window_attention, partition: grid, window: 2, "
                                         "shift: true, num_heads: 2}}", "depth: 1, dim: 16, layout: tokens"))),
                 "stages[0].block.token_mixer.shift", "only with partition: window; grid groups are not shifted",
                 id="grid-shifted"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 1, dim: 16, layout: tokens"))),
                 "stages[0].block.token_mixer.type", "pooling needs layout 'maps', but it gets 'tokens'",
                 id="pooling-on-tokens"),
    pytest.param(doc(input="input: {size: 30}"), "stem.patch", "4 does not divide the 30x30 input", id="patch"),
    pytest.param(doc(stages=stages(S0, block(POOL, "depth: 1, dim: 32"))), "stages[1].dim",
                 "32 differs from the 16 channels coming in", id="width-change-without-downsample"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 1, dim: 16, layout: tokens")), head="head: {type: class_token}"),
                 "head.tokens[0]", "0 is not a prefix token index; the input has 0 prefix token(s)",
                 id="class-head-without-class-token"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 1, dim: 16, prefix_tokens: 1"))), "stages[0].prefix_tokens",
                 "prefix tokens need layout 'tokens'", id="prefix-on-maps"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: identity}}", "depth: 1, dim: 16, layout: tokens, "
                                         "prefix_tokens: 1"), block(POOL))),
                 "stages[1].layout", "cannot turn tokens with 1 prefix token(s) into maps", id="prefix-to-maps"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: split, ratios: [0.5, 0.4], branches: "
                                         "[{type: identity}, {type: pooling}]}}"))),
                 "stages[0].block.token_mixer.ratios", "must sum to 1, got 0.9", id="split-sum"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: split, ratios: [0.5, 0.5], branches: "
                                         "[{type: identity}, {type: pooling}, {type: identity}]}}"))),
                 "stages[0].block.token_mixer.ratios", "2 ratios for 3 branches", id="split-count"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: pooling}, norm: {type: groupnorm, groups: 3}}"))),
                 "stages[0].block.norm.groups", "3 does not divide 16 channels", id="groups"),
    pytest.param(doc(input="input: {size: 36}",
                     stages=stages(block("{token_mixer: {type: identity}}", "depth: 1, dim: 16, layout: tokens"),
                                   "{depth: 1, dim: 32, downsample: {type: patch_merging}, layout: tokens, "
                                   "block: {token_mixer: {type: identity}}}")),
                 "stages[1].downsample.type", "patch_merging needs an even grid, got 9x9", id="patch-merging-odd"),
    pytest.param(doc(stages=stages(block(POOL, "depth: 2, dim: 16, pos_embed: {type: peg, after_block: 2}"))),
                 "stages[0].pos_embed.after_block", "2 is past the last block (depth 2)", id="peg-past-end"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: sr_attention, num_heads: 2, sr_ratio: 3}}",
                                         "depth: 1, dim: 16, layout: tokens"))),
                 "stages[0].block.token_mixer.sr_ratio", "3 does not divide", id="sr-ratio"),
    pytest.param(doc(stem="stem: {type: conv_stack, strides: [2, 2], widths: [8, 8]}"), "stem.widths",
                 "needs 1 entries (one per conv but the last), got 2", id="conv-stack-widths"),
    pytest.param(doc(stages=stages(S0, "{depth: 1, dim: 32, downsample: {type: conv, kernel: 31, padding: 0}, "
                                       f"block: {POOL}}}")),
                 "stages[1].downsample.kernel", "31 is larger than the padded 8x8 input", id="kernel-too-large"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: random_mixing}}", "depth: 1, dim: 16, layout: tokens, "
                                         "prefix_tokens: 1"))),
                 "stages[0].block.token_mixer.type", "works on the token grid only", id="random-mixing-prefix"),
    pytest.param(doc(stages=stages(block("{token_mixer: null, channel_mixer: null}"))), "stages[0].block.token_mixer",
                 "null leaves the 'metaformer' block without a branch; give it a token mixer or a channel mixer",
                 id="block-without-branch"),
    pytest.param(doc(stages=stages(block("{token_mixer: null, template: plain}"))), "stages[0].block.token_mixer",
                 "null leaves the 'plain' block without a branch; give it a token mixer", id="plain-without-mixer"),
    pytest.param(doc(stages=stages(block("{token_mixer: null, shortcut: {type: conv}}"))), "stages[0].block.shortcut",
                 "is unused: its branch is left out (token_mixer: null)", id="shortcut-without-token-mixer"),
    pytest.param(doc(stages=stages(block("{first: poolformer}"))), "stages[0].block.cycle", "is required",
                 id="first-without-cycle"),
    pytest.param(doc(stages=stages(block("{first: poolformer, cycel: [poolformer]}"))), "stages[0].block.cycel",
                 "unknown field (did you mean 'cycle'?)", id="cycle-typo"),
    pytest.param(doc(stages=stages(block("{first: poolformer, cycle: [poolformer, poolformr]}"))),
                 "stages[0].block.cycle[1]", "unknown block 'poolformr' (did you mean 'poolformer'?)",
                 id="unknown-block-in-cycle"),
    pytest.param(doc(stages=stages(block("{first: {token_mixer: {type: atention}}, cycle: poolformer}"))),
                 "stages[0].block.first.token_mixer.type", "unknown 'atention' (did you mean 'attention'?)",
                 id="unknown-mixer-in-first"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: dwconv, kernel: 3, groups: 3}}"))),
                 "stages[0].block.token_mixer.groups", "3 does not divide the conv's 16 input channels",
                 id="dwconv-groups"),
    pytest.param(doc(stages=stages(S0, "{depth: 1, dim: 32, downsample: {type: conv, groups: 3}, "
                                       f"block: {POOL}}}")),
                 "stages[1].downsample.groups", "3 does not divide the conv's 16 input channels",
                 id="downsample-groups"),
    pytest.param(doc(stages=stages(block("{token_mixer: {type: mbconv, stride: 2, dw_residual: true}, "
                                         "channel_mixer: null, template: plain}"))),
                 "stages[0].block.token_mixer.dw_residual", "needs the kxk conv to keep the grid",
                 id="strided-inner-residual"),
]
