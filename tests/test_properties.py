"""Property tests (hypothesis): random valid specs build and forward to the declared output shape;
random mutations of valid specs give a SpecError or a valid network, never a raw exception."""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaformer_lab as ml
from metaformer_lab import SpecError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

NORMS = [None, {"type": "layernorm"}, {"type": "batchnorm"}, {"type": "groupnorm", "groups": 2},
         {"type": "rmsnorm"}, {"type": "affine"}, {"type": "layernorm", "bias": False}]


@st.composite
def token_mixers(draw: st.DrawFn, layout: str, grid: int, prefix: int, width: int = 16,
                 depth: int = 0) -> dict[str, Any]:
    """A token mixer valid on a square ``grid`` of ``width`` channels (a multiple of 4)."""
    head_dim = 8 if width % 8 == 0 else 4
    grid_only = prefix == 0
    options = ["identity", "attention", "linear_attention"]
    if layout == "tokens":
        options.append("pooling_attention")  # prefix tokens ride along unpooled
    if grid_only:
        options += ["random_mixing", "dwconv", "sepconv", "token_mlp", "token_linear"]
        if layout == "maps":
            options.append("pooling")
        if layout == "tokens":
            options += ["window_attention", "sr_attention", "agent_attention", "routing_attention",
                        "aggregated_attention"]
            if grid >= 3:
                options.append("dilated_attention")
        if width % 2 == 0:
            options.append("scale_aware_modulation")
        if depth == 0:
            options += ["parallel", "split"]
    kind = draw(st.sampled_from(options))
    if kind == "attention":
        return {"type": kind, "head_dim": head_dim, "qkv_bias": draw(st.booleans()), "qk_norm": draw(st.booleans())}
    if kind == "linear_attention":
        return {"type": kind, "head_dim": head_dim, "feature_map": draw(st.sampled_from(["elu", "relu"]))}
    if kind == "window_attention":
        window = draw(st.sampled_from([w for w in (2, 4) if grid % w == 0]))
        return {"type": kind, "head_dim": head_dim, "window": window,
                "shift": draw(st.booleans()), "rel_pos_bias": draw(st.booleans())}
    if kind == "sr_attention":
        sr_ratio = draw(st.sampled_from([r for r in (1, 2) if grid % r == 0]))
        return {"type": kind, "head_dim": head_dim, "sr_ratio": sr_ratio,
                "reduction": draw(st.sampled_from(["conv", "pool"])), "pool_size": 2}
    if kind == "pooling_attention":
        stride = draw(st.sampled_from([s for s in (1, 2) if grid % s == 0]))
        return {"type": kind, "head_dim": head_dim, "kernel": 3, "kv_stride": stride,
                "residual_pooling": draw(st.booleans())}
    if kind == "agent_attention":
        return {"type": kind, "head_dim": head_dim, "agents": draw(st.sampled_from([1, 4])),
                "sr_ratio": draw(st.sampled_from([r for r in (1, 2) if grid % r == 0]))}
    if kind == "routing_attention":
        regions = draw(st.sampled_from([r for r in (1, 2) if grid % r == 0]))
        return {"type": kind, "head_dim": head_dim, "regions": regions, "topk": draw(st.integers(1, regions**2))}
    if kind == "aggregated_attention":
        return {"type": kind, "head_dim": head_dim, "window": 3, "pool_size": min(grid, 2), "cpb_hidden": 16}
    if kind == "dilated_attention":
        wide = grid >= 5 and (width // head_dim) % 2 == 0
        dilations = draw(st.sampled_from([[1, 2], [1]] if wide else [[1]]))
        return {"type": kind, "head_dim": head_dim, "dilations": dilations}
    if kind == "scale_aware_modulation":
        return {"type": kind, "num_heads": draw(st.sampled_from([h for h in (2, 4) if width % h == 0])),
                "expand_ratio": 2}
    if kind in ("dwconv", "sepconv"):
        return {"type": kind, "kernel": draw(st.sampled_from([1, 3, [1, 3]]))}
    if kind == "pooling":
        return {"type": kind, "pool_size": draw(st.sampled_from([1, 3]))}
    if kind in ("parallel", "split"):
        n = draw(st.integers(2, 3))
        if kind == "parallel":
            return {"type": kind, "branches": [draw(token_mixers(layout, grid, prefix, width, 1)) for _ in range(n)]}
        ratios = [0.5, 0.5] if n == 2 else [0.5, 0.25, 0.25]
        widths = [width - sum(int(r * width) for r in ratios[1:])] + [int(r * width) for r in ratios[1:]]
        return {"type": kind, "ratios": ratios,
                "branches": [draw(token_mixers(layout, grid, prefix, w, 1)) for w in widths]}
    return {"type": kind}


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.sampled_from([16, 32]))
    stem = draw(st.sampled_from([{"type": "patchify", "patch": 2}, {"type": "patchify", "patch": 4},
                                 {"type": "conv", "kernel": 3, "stride": 2},
                                 {"type": "conv_stack", "strides": [2, 1]}]))
    grid = size // (stem.get("patch") or 2)
    stages, dim, prefix, layout = [], None, 0, "maps"
    for i in range(draw(st.integers(1, 3))):
        new_dim = draw(st.sampled_from([16, 32]))
        layout = draw(st.sampled_from(["maps", "tokens"])) if prefix == 0 else "tokens"
        stage: dict[str, Any] = {"depth": draw(st.integers(1, 2)), "dim": new_dim, "layout": layout}
        if i > 0 and prefix == 0 and grid >= 4 and (new_dim != dim or draw(st.booleans())):
            stage["downsample"] = draw(st.sampled_from([{"type": "conv"}, {"type": "pool"}, {"type": "patch_merging"}]))
            grid //= 2
        elif i > 0:
            stage["dim"] = new_dim = dim  # type: ignore[assignment]
        if layout == "tokens" and i == 2 and draw(st.booleans()):
            stage["prefix_tokens"] = prefix = 1
            stage["pos_embed"] = {"type": "learned"}
        elif draw(st.booleans()):
            stage["pos_embed"] = {"type": "peg", "after_block": 0} if prefix == 0 else {"type": "learned"}
        stage["block"] = {
            "template": "metaformer" if prefix else draw(st.sampled_from(["metaformer", "convnext"])),
            "token_mixer": draw(token_mixers(layout, grid, prefix, new_dim)),
            "channel_mixer": draw(st.sampled_from([{"type": "mlp", "ratio": 2.0}, {"type": "glu", "ratio": 1.0},
                                                   {"type": "conv_ffn", "ratio": 1.0}])),
            "norm": draw(st.sampled_from(NORMS)),
            "layer_scale": draw(st.sampled_from([None, 1e-5])),
            "res_scale": draw(st.sampled_from([None, 1.0])),
        }
        stage["norm"] = draw(st.sampled_from(NORMS[:3]))
        stages.append(stage)
        dim = new_dim
    head = draw(st.sampled_from([{"type": "pool_norm_linear"}, {"type": "mlp_head", "ratio": 1.0}]))
    if prefix:
        head = {"type": "class_token"}
    return {"name": "random", "input": {"size": size}, "num_classes": draw(st.sampled_from([0, 7])),
            "defaults": {"drop_path_rate": 0.1}, "stem": stem, "stages": stages, "head": head}


def _forward_matches_graph(spec: Any) -> None:
    graph = ml.to_graph(spec)
    net = ml.build(graph).eval()
    with torch.no_grad():
        y = net(torch.randn(graph.input_type.shape(2)))
    assert tuple(y.shape) == graph.output_type.shape(2)


@SETTINGS
@given(specs())
def test_random_valid_specs_build_to_the_declared_shape(data: dict[str, Any]) -> None:
    spec = ml.load_spec(data)
    _forward_matches_graph(spec)
    assert ml.load_spec(ml.spec.read_spec(ml.spec.spec_to_dict(spec))) == spec


JUNK = ["x", -1, 0, 0.5, 1.5, 3, 7, True, None, [], {}, [1, 2, 3], 10**9, "1e-6"]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _container(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutations(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    data = copy.deepcopy(draw(specs()))
    path = draw(st.sampled_from(_paths(data)))
    parent, key = _container(data, path), path[-1]
    kind = draw(st.sampled_from(["junk", "delete", "unknown_key", "unknown_tag"]))
    if kind == "junk":
        parent[key] = draw(st.sampled_from(JUNK))
    elif kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "unknown_key":
        target = parent if isinstance(parent, dict) else data
        target["no_such_field"] = 1
    else:
        dicts = [p for p in _paths(data) if isinstance(_container(data, p), dict) and p[-1] == "type"]
        if not dicts:
            return data, "none"
        tagged = draw(st.sampled_from(dicts))
        _container(data, tagged)["type"] = "no_such_op"
    return data, kind


@SETTINGS
@given(mutations())
def test_mutations_give_spec_errors_never_raw_exceptions(mutation: tuple[dict[str, Any], str]) -> None:
    data, kind = mutation
    try:
        spec = ml.load_spec(data)
    except SpecError as err:
        assert err.issues and all(i.message for i in err.issues)
        return
    assert kind not in ("unknown_key", "unknown_tag"), "an unknown field or type must be rejected"
    _forward_matches_graph(spec)
