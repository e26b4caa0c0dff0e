"""The table of invalid space files, each with the exact path and message of its error (used by the space and
CLI tests)."""

from __future__ import annotations

import pytest

MIXERS = ("{choice: [{type: pooling}, {type: dwconv, kernel: {choice: [3, 5]}}, "
          "{type: attention, head_dim: {choice: [8, 32]}}]}")
PARTS = {
    "name": "name: small",
    "input": "input: {size: 32}",
    "num_classes": "num_classes: 10",
    "stem": "stem: {type: patchify, patch: 4}",
    "stages": ("stages:\n"
               f"  - {{depth: {{int: [1, 2]}}, dim: {{choice: [16, 32]}}, block: {{token_mixer: {MIXERS}}}}}\n"
               "  - {depth: 1, dim: 32, downsample: {type: conv}, block: {token_mixer: {type: pooling}}}"),
    "ties": "",
    "references": "",
}


def refs(**params: object) -> str:
    """A ``references`` entry ``r`` in block style (parameter names hold brackets, which flow style refuses)."""
    lines = "".join(f"    '{k}': {v}\n" for k, v in params.items())
    return "references:\n  r:\n" + lines.rstrip("\n")


D, W, TM = "stages[0].depth", "stages[0].dim", "stages[0].block.token_mixer"


def doc(**parts: str) -> str:
    """The base space (valid) with some top-level entries replaced; '' drops an entry."""
    merged = {**PARTS, **parts}
    return "\n".join(v for v in merged.values() if v) + "\n"


def stage0(body: str) -> str:
    """The base space's stages with the first stage replaced."""
    second = "  - {depth: 1, dim: 32, downsample: {type: conv}, block: {token_mixer: {type: pooling}}}"
    return f"stages:\n  - {body}\n{second}"


BLOCK = f"block: {{token_mixer: {MIXERS}}}"

INVALID_SPACES = [
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, block: {token_mixer: {choice: [{type: poolin}]}}}")),
                 "stages[0].block.token_mixer.choice[0].type", "unknown 'poolin' (did you mean 'pooling'?)",
                 id="unknown-op"),
    pytest.param(doc(stages=stage0(f"{{depth: 1, dim: {{choice: []}}, {BLOCK}}}")),
                 "stages[0].dim.choice", "needs at least one option", id="empty-choice"),
    pytest.param(doc(stages=stage0(f"{{depth: {{int: [4, 1]}}, dim: 16, {BLOCK}}}")),
                 "stages[0].depth.int", "the range is reversed: low 4 > high 1", id="depth-range-reversed"),
    pytest.param(doc(ties="ties: [{share: block.token_mixer, stages: [0, 5]}]"),
                 "ties[0].stages[1]", "stage 5 does not exist; the space has 2 stage(s), 0..1", id="tie-missing-stage"),
    pytest.param(doc(references=refs(**{D: 1, W: 16, TM: "attention", f"{TM}[attention].head_dim": 32})),
                 "references.r", "does not decode: stages[0].block.token_mixer.head_dim: 32 does not divide dim 16; "
                                 "parameters: stages[0].dim=16, stages[0].block.token_mixer=attention, "
                                 "stages[0].block.token_mixer[attention].head_dim=32", id="reference-does-not-decode"),
    pytest.param(doc(references=refs(**{D: 1, W: 16, TM: "pooling", "stages[0].dpth": 2})),
                 "references.r.stages[0].dpth", "is not a parameter of this point", id="reference-unknown-parameter"),
    pytest.param(doc(references=refs(**{D: 1, W: 24, TM: "pooling"})),
                 "references.r.stages[0].dim", "24 is not one of 16, 32", id="reference-value-not-offered"),
    pytest.param(doc(references=refs(**{D: 1, W: [16, 32], TM: "pooling"})),
                 "references.r.stages[0].dim", "[16, 32] is not one of 16, 32", id="reference-value-a-list"),
    pytest.param(doc(references=refs(**{D: 1, TM: "pooling"})),
                 "references.r", "parameter 'stages[0].dim' is missing (one of 16, 32)", id="reference-missing"),
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, "
                                    "block: {token_mixer: {choice: [{type: pooling, kernel: 3}]}}}")),
                 "stages[0].block.token_mixer.choice[0].kernel", "unknown field", id="unknown-field-in-option"),
    pytest.param(doc(stages=stage0(f"{{depth: 1, dim: {{choice: [16], nme: w}}, {BLOCK}}}")),
                 "stages[0].dim.nme", "unknown field (did you mean 'name'?)", id="unknown-choice-key"),
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, block: {token_mixer: {choice: [{type: pooling}, "
                                   "{type: pooling, pool_size: 5}]}}}")),
                 "stages[0].block.token_mixer.choice[1]", "label 'pooling' is used twice", id="duplicate-labels"),
    pytest.param(doc(stages="stages:\n  - {depth: 1, dim: {choice: [16, 32], name: w}, block: {token_mixer: "
                            "{type: pooling}}}\n  - {depth: 1, dim: {choice: [32, 64], name: w}, "
                            "downsample: {type: conv}, block: {token_mixer: {type: pooling}}}"),
                 "stages[1].dim",
                 "is parameter 'w' like stages[0].dim, but offers one of 32, 64 instead of one of 16, 32",
                 id="shared-name-other-values"),
    pytest.param(doc(num_classes="num_classes: 10\nnum_stages: {choice: [1, 3]}"),
                 "num_stages", "3 is outside 1..2", id="num-stages-out-of-range"),
    pytest.param(doc(ties="ties: [{share: block.norm}]"),
                 "ties[0].share", "stage 0 has no choice 'block.norm'", id="tie-shares-a-fixed-value"),
    pytest.param(doc(ties="ties: [{share: block.token_mixer, non_decreasing: dim}]"),
                 "ties[0]", "give exactly one of share, non_decreasing", id="tie-two-relations"),
    pytest.param(doc(stages=stage0(f"{{depth: {{int: [1, 2.5]}}, dim: 16, {BLOCK}}}")),
                 "stages[0].depth.int", "expected [low, high], two integers", id="int-range-of-floats"),
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, variant: {choice: {a: 3}}, block: {token_mixer: "
                                   "{type: pooling}}}")),
                 "stages[0].variant.choice.a", "a variant's option must be a mapping of fields",
                 id="variant-not-mapping"),
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, variant: {choice: {a: {dim: 32}}}, "
                                   "block: {token_mixer: {type: pooling}}}")),
                 "stages[0].variant.choice.a.dim", "variant 'a' sets 'dim', which the mapping around it sets already",
                 id="variant-collides"),
    pytest.param(doc(stages=stage0("{depth: 1, dim: 16, block: {choice: [poolformr]}}")),
                 "stages[0].block.choice[0]", "unknown block 'poolformr' (did you mean 'poolformer'?)",
                 id="unknown-named-block"),
    pytest.param(doc(name="nam: small"), "nam", "unknown field", id="unknown-top-level-key"),
    pytest.param(doc(stem=""), "stem", "is required", id="missing-stem"),
    pytest.param(doc(stages=stage0(f"{{depth: {{float: [0.1, 1.0], log: true, step: 0.1}}, dim: 16, {BLOCK}}}")),
                 "stages[0].depth.step", "a log range takes no step", id="log-range-with-step"),
]
