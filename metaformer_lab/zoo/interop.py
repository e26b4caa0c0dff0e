"""timm weights in and out: convert state_dicts both ways, create models, adopt timm modules."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.network import Network
from metaformer_lab.compile.protocol import feature_backbone
from metaformer_lab.core.errors import Issue, SpecError
from metaformer_lab.core.meta import on_meta
from metaformer_lab.graph.lower import lower
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.spec.load import SpecSource, read_spec
from metaformer_lab.zoo.keymap import CheckpointError, convert, invert
from metaformer_lab.zoo.models import ZooModel, catalog, get


def _spec(name: str, num_classes: int | None = None) -> ArchSpec:
    spec = read_spec(name)
    return spec if num_classes is None else spec.model_copy(update={"num_classes": num_classes})


def _shapes(spec: ArchSpec) -> dict[str, torch.Size]:
    """Our state_dict keys and shapes for ``spec``, built on the meta device."""
    with on_meta():
        net = compile_graph(lower(spec))
    return {k: v.shape for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=32)
def _classifier_keys(name: str) -> tuple[str, ...]:
    """The reference's classifier weight keys: from its pretrained config, else from get_classifier() (a meta
    copy of the reference, built once per process)."""
    with on_meta():
        reference = get(name).reference()
    cfg = getattr(reference, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names is None:
        get_classifier = getattr(reference, "get_classifier", None)
        heads = get_classifier() if callable(get_classifier) else ()
        heads = heads if isinstance(heads, tuple) else (heads,)
        names = [n for n, m in reference.named_modules() if any(m is h for h in heads)]
    return tuple(f"{n}.weight" for n in ((names,) if isinstance(names, str) else names))


def timm_num_classes(zoo: ZooModel, timm_state_dict: Mapping[str, Tensor]) -> int:
    """The number of classes a timm state_dict was trained for (0 when it has no classifier)."""
    for key in _classifier_keys(zoo.name):
        if key in timm_state_dict:
            return int(timm_state_dict[key].shape[0])
    return 0


def convert_state_dict(name: str, timm_state_dict: Mapping[str, Tensor], *,
                       num_classes: int | None = None) -> dict[str, Tensor]:
    """A timm state_dict of zoo model ``name`` as ours (keys renamed, tensors reshaped).

    ``num_classes`` defaults to what the checkpoint's classifier says. Raises CheckpointError listing
    every key that does not fit.
    """
    zoo = get(name)
    classes = timm_num_classes(zoo, timm_state_dict) if num_classes is None else num_classes
    return convert(zoo.key_map, timm_state_dict, _shapes(_spec(name, classes)))


def _our_num_classes(spec: ArchSpec, state_dict: Mapping[str, Tensor]) -> int:
    default = _shapes(spec)
    changed = [k for k, shape in default.items() if k in state_dict and state_dict[k].shape != shape]
    if changed:  # only the classifier depends on the class count
        return int(state_dict[changed[0]].shape[0])
    missing = [k for k in default if k not in state_dict]
    return 0 if missing and all(k.startswith("head.") for k in missing) else spec.num_classes


def to_timm_state_dict(name: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state_dict of zoo model ``name`` as timm's, so a model trained here loads into timm."""
    zoo = get(name)
    classes = _our_num_classes(_spec(name), state_dict)
    reference = zoo.reference_keys(num_classes=classes)
    table = invert(zoo.key_map, list(reference))
    out: dict[str, Tensor] = {}
    issues: list[Issue] = []
    for key, value in state_dict.items():
        theirs = table.get(key)
        if theirs is None:
            issues.append(Issue(key, f"has no counterpart in timm's {zoo.timm_name}"))
        elif value.numel() != reference[theirs].numel():
            issues.append(Issue(key, f"shape {tuple(value.shape)} does not fit {tuple(reference[theirs])}"))
        else:
            out[theirs] = value.reshape(reference[theirs])
    issues += [Issue(k, "missing from the state_dict") for k in reference if k not in out and not issues]
    if issues:
        raise CheckpointError(issues)
    return out


def _load_timm_checkpoint(zoo: ZooModel, pretrained: bool, checkpoint_path: str | os.PathLike[str] | None
                          ) -> dict[str, Tensor]:
    if checkpoint_path is not None:
        from timm.models import load_state_dict

        path = os.fspath(checkpoint_path)
        if not os.path.isfile(path):
            raise SpecError.single(path, "no such checkpoint file")
        return load_state_dict(path)  # handles 'state_dict'/'model' nesting, 'module.' prefixes, safetensors
    if not zoo.in_timm_registry:
        raise SpecError.single(zoo.name, "timm has no pretrained weights for this model (not in its registry)")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(zoo.timm_name)
    if cfg is None or not cfg.has_weights:
        raise SpecError.single(zoo.name, f"timm has no pretrained weights for {zoo.timm_name}")
    try:
        return zoo.reference(pretrained=True).state_dict()  # timm downloads and caches the weights
    except OSError as err:  # no network, hub errors (requests' and huggingface_hub's errors are OSErrors)
        raise SpecError.single(zoo.name, f"could not fetch timm's weights: {err}") from err


@overload
def create_model(name_or_spec: SpecSource, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike[str] | None = None, num_classes: int | None = None,
                 features_only: Literal[False] = False, out_indices: int | Sequence[int] | None = None) -> Network: ...


@overload
def create_model(name_or_spec: SpecSource, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike[str] | None = None, num_classes: int | None = None,
                 features_only: Literal[True], out_indices: int | Sequence[int] | None = None) -> nn.Module: ...


def create_model(name_or_spec: SpecSource, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike[str] | None = None, num_classes: int | None = None,
                 features_only: bool = False, out_indices: int | Sequence[int] | None = None) -> nn.Module:
    """Our module for a zoo name (or any spec), optionally with timm's weights.

    A zoo model takes timm's conventions for it: its pretrained config (mean, std, crop, interpolation; our
    module paths), its feature taps (``feature_info``, ``forward_intermediates``) and its parameter grouping
    (``group_matcher``), see ``adopt_timm_conventions``.

    Args:
        name_or_spec: zoo name, YAML path, mapping or ArchSpec.
        pretrained: load timm's pretrained weights for this zoo model (timm downloads them).
        checkpoint_path: load a local timm checkpoint of this zoo model instead.
        num_classes: reset the classifier to this many classes (0: return pooled features); the
            rest of the checkpoint still loads.
        features_only: return a feature backbone (timm's ``FeatureGetterNet``) giving the maps at
            ``out_indices`` (positions in ``feature_info``; default: timm's, see ``feature_backbone``).
    """
    net = _create_network(name_or_spec, pretrained, checkpoint_path, num_classes)
    return feature_backbone(net, out_indices) if features_only else net


def _create_network(name_or_spec: SpecSource, pretrained: bool, checkpoint_path: str | os.PathLike[str] | None,
                    num_classes: int | None) -> Network:
    spec = read_spec(name_or_spec)
    if not pretrained and checkpoint_path is None:
        return adopt_timm_conventions(compile_graph(lower(_with_classes(spec, num_classes))), spec)
    if spec.name not in catalog():
        raise SpecError.single(spec.name, "weights load into zoo models only; this spec's name is not one")
    zoo = get(spec.name)
    timm_sd = _load_timm_checkpoint(zoo, pretrained, checkpoint_path)
    trained_classes = timm_num_classes(zoo, timm_sd)
    ours = convert_state_dict(zoo.name, timm_sd, num_classes=trained_classes)
    whole = num_classes is None or num_classes == trained_classes  # every value comes from the checkpoint
    net = compile_graph(lower(_with_classes(spec, trained_classes if num_classes is None else num_classes)),
                        init=not whole)
    if whole:
        net.load_state_dict(ours, strict=True)
    else:
        _load_except_classifier(net, ours)
    return adopt_timm_conventions(net, spec)


Groups = tuple[dict[str, int], dict[str, int]]


def adopt_timm_conventions(net: Network, spec: ArchSpec) -> Network:
    """For a zoo model's spec (its class count aside): timm's pretrained config for it, timm's feature taps and
    timm's parameter grouping (layer-wise lr decay) on ``net``; any other spec keeps the defaults."""
    if spec.name not in catalog() or not get(spec.name).fixed_point or _spec(spec.name, spec.num_classes) != spec:
        return net  # not a zoo model, a paper model (no timm module to take conventions from), or changed
    modules, cfg, groups = _timm_conventions(spec.name)
    net.set_feature_modules(modules)
    if groups is not None:
        net.set_group_layers(*groups)
    ours = {k: net.pretrained_cfg[k] for k in ("url", "hf_hub_id", "architecture", "input_size", "num_classes",
                                                  "first_conv", "classifier")}
    net.pretrained_cfg = {**net.pretrained_cfg, **cfg, **ours}
    return net


@functools.cache
def _timm_conventions(name: str) -> tuple[tuple[str, ...], dict[str, Any], Groups | None]:
    """For zoo model ``name``: our modules for timm's feature taps (matched from the end by channels and
    reduction), timm's pretrained config from its local registry (nothing downloads), and timm's parameter
    grouping (fine, coarse: layer id per our parameter name) where its class has a ``group_matcher``."""
    zoo = get(name)
    with on_meta():
        reference = zoo.reference()
        net = compile_graph(lower(_spec(name)), init=False)
    candidates = [(c["num_chs"], c["reduction"], c["module"]) for c in net.feature_candidates()]
    modules: list[str] = []
    for info in reversed(getattr(reference, "feature_info", None) or []):  # from the end: a tie takes the later
        wanted = (info["num_chs"], info["reduction"])
        found = next((k for k in reversed(range(len(candidates))) if candidates[k][:2] == wanted), None)
        if found is None:  # no counterpart: keep our own taps
            modules = []
            break
        modules.insert(0, candidates[found][2])
        candidates = candidates[:found]
    cfg: dict[str, Any] = {}
    if zoo.in_timm_registry:
        from timm.models import get_pretrained_cfg

        timm_cfg = get_pretrained_cfg(zoo.timm_name)
        if timm_cfg is not None:
            cfg = {k: v for k, v in timm_cfg.to_dict().items() if k not in ("hf_hub_id", "tag", "custom_load")}
    groups: Groups | None = None
    matcher = getattr(reference, "group_matcher", None)
    if callable(matcher):
        from timm.models._manipulate import group_parameters

        table = invert(zoo.key_map, list(reference.state_dict()))
        fine, coarse = (group_parameters(reference, matcher(coarse=c), reverse=True) for c in (False, True))
        groups = ({ours: fine[k] for ours, k in table.items() if k in fine},
                  {ours: coarse[k] for ours, k in table.items() if k in coarse})
    return tuple(modules or (f["module"] for f in net.feature_info)), cfg, groups


def _with_classes(spec: ArchSpec, num_classes: int | None) -> ArchSpec:
    return spec if num_classes is None else spec.model_copy(update={"num_classes": num_classes})


def _load_except_classifier(net: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load everything but the classifier, which ``num_classes`` resized (it keeps its fresh init)."""
    own = net.state_dict()
    resized = {k for k, v in state_dict.items() if k not in own or own[k].shape != v.shape}
    result = net.load_state_dict({k: v for k, v in state_dict.items() if k not in resized}, strict=False)
    stray = [k for k in (*resized, *result.missing_keys) if not k.startswith("head.")]
    if stray:
        raise CheckpointError([Issue(k, "does not fit the model") for k in sorted(stray)])


def from_timm(timm_model: nn.Module) -> Network:
    """Our equivalent of a timm module, with its weights (the zoo name comes from its pretrained config)."""
    cfg: dict[str, Any] = getattr(timm_model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise SpecError.single(type(timm_model).__name__, "has no pretrained_cfg['architecture'] naming its model")
    classes = int(getattr(timm_model, "num_classes", _spec(name).num_classes))
    sd = convert_state_dict(name, timm_model.state_dict(), num_classes=classes)
    net = compile_graph(lower(_spec(name, classes)), init=False)  # every value comes from timm's state_dict
    net.load_state_dict(sd, strict=True)
    return adopt_timm_conventions(net, _spec(name, classes)).train(timm_model.training)
