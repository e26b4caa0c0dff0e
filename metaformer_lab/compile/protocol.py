"""timm's model protocol on compiled networks, so that they drop into timm's ``train.py``, ``create_optimizer_v2``
(weight decay and layer-wise lr decay), ``resolve_data_config``, feature extraction (``FeatureGetterNet``) and
detection necks.

Feature taps follow timm: a hierarchical network (its stages change the grid) has one feature per stage; an
isotropic one (every stage on the stem's grid: ViT, DeiT, CaiT, ConViT, Mixer, ResMLP) one per block, leaving
out blocks that update the prefix tokens only (CaiT's class attention), as timm indexes those models.
``set_feature_modules`` picks other taps (the zoo adopts timm's own choice that way, e.g. CoAtNet's stem).

The *final norm* is timm's model-level ``norm``: the last stage's norm of an isotropic network, or of a
hierarchical one where no other stage has a norm (PVTv2's per-stage norms belong to their stages).
``forward_intermediates(norm=True)`` applies it where timm does: to every block of an isotropic network, to the
last stage of a hierarchical one.

timm is imported inside functions only: ``validate`` imports this module and must not pay for timm's import.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.heads import Head, PoolNormLinear
from metaformer_lab.ops.position import LearnedPosition, PrefixTokens

if TYPE_CHECKING:
    from metaformer_lab.compile.network import Stage

_TAP = re.compile(r"stages\.(\d+)(?:\.blocks\.(\d+))?")
_STEM = (-1, None)

Tap = tuple[int, int | None]
"""A feature tap: (stage, block) for a block's output, (stage, None) for a stage's, (-1, None) for the stem's."""


class TimmProtocol(nn.Module):
    """timm's model interface; ``Network`` provides ``stem``, ``stages``, ``head`` and the types.

    Attributes (timm's):
        num_classes: the classifier's outputs (0: the head returns pooled features).
        num_features: channels of ``forward_features``' output.
        head_hidden_size: width of ``forward_head(x, pre_logits=True)``.
        feature_info: one dict per feature tap: ``num_chs``, ``reduction``, ``module`` (path in this network).
        pretrained_cfg: timm's data/model config (``default_cfg`` is the same dict).
        grad_checkpointing: recompute each block in the backward pass when training.
    Attributes (ours):
        isotropic: whether features are taken per block (see the module's docstring).
        final_norm_stage: the stage whose norm is the model's final norm, or None.
        group_layers: fixed (fine, coarse) layer ids per parameter name for ``group_matcher``, or None.
    """

    name: str
    stem: nn.Module
    stages: nn.Sequential
    head: nn.Module
    input_type: TensorType
    output_type: TensorType
    feature_types: list[TensorType]

    grad_checkpointing: bool
    isotropic: bool
    final_norm_stage: int | None
    group_layers: tuple[dict[str, int], dict[str, int]] | None
    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, Any]]
    pretrained_cfg: dict[str, Any]

    def init_protocol(self) -> None:
        """Set timm's attributes from the compiled structure (once the submodules exist)."""
        self.grad_checkpointing = False
        self.group_layers = None
        stem = self._stem_type()
        grids = {t.grid for t in self.feature_types}
        self.isotropic = len(grids) == 1 and stem is not None and stem.grid in grids
        has_norm = [not isinstance(self._stage(i).norm, nn.Identity) for i in range(len(self.stages))]
        last = len(self.stages) - 1
        final = self.isotropic or (has_norm[last] and not any(has_norm[:last]))
        self.final_norm_stage = last if final else None
        self.num_features = self.feature_types[-1].channels
        self.num_classes = self.head.num_classes if isinstance(self.head, Head) else self.output_type.channels
        self.head_hidden_size = (self.head.hidden_size(self.num_features) if isinstance(self.head, Head)
                                 else self.num_features)
        self.feature_info = [self._feature(tap) for tap in self.default_feature_taps()]
        self.pretrained_cfg = self.default_pretrained_cfg()

    # --- classifier -----------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        """The final classifier layer(s), as timm's ``get_classifier``."""
        return self.head.classifier if isinstance(self.head, Head) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: ``forward`` returns the pooled pre-logit features).

        ``global_pool``: None keeps the pooling; 'avg' or 'max' changes it ('token' or None for class-token
        heads); '' (with 0 classes) removes the head, so that ``forward`` returns ``forward_features``' output.
        ``output_type``, ``num_classes``, ``head_hidden_size`` and ``pretrained_cfg`` follow the new head.
        """
        dd = self._device_dtype()
        if global_pool == "":
            if num_classes:
                raise ValueError("global_pool='' leaves the features unpooled; a classifier needs pooled features")
            self.head = nn.Identity()
        elif isinstance(self.head, Head):
            self.head.reset(num_classes, global_pool, in_features=self.num_features, **dd)
        elif isinstance(self.head, nn.Identity):
            if num_classes or global_pool:
                head = PoolNormLinear.plain(self._features_type(), num_classes, global_pool or "avg", **dd)
                self.head = head.train(self.training)
        else:
            raise TypeError(f"cannot reset a head of type {type(self.head).__name__}")
        self._sync_head()

    def head_pre_logits(self, x: Tensor) -> Tensor:
        """The head's pooled (and normed) features before its classifier."""
        if isinstance(self.head, Head):
            return self.head.pre_logits(x)
        if isinstance(self.head, nn.Identity):
            return x
        raise TypeError(f"a head of type {type(self.head).__name__} has no pre-logits")

    # --- optimisation ---------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters timm's optimizer keeps out of weight decay: what each module declares
        through its own ``no_weight_decay()`` (position embeddings, prefix tokens, relative position tables)."""
        names: set[str] = set()
        for path, module in self.named_modules():
            hook = getattr(module, "no_weight_decay", None)
            if module is not self and callable(hook):
                names |= {f"{path}.{name}" for name in hook()}
        return names & {name for name, _ in self.named_parameters()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | functools.partial[int]:
        """Parameter groups in timm's format (layer-wise lr decay): the stem with learned position embeddings
        and prefix tokens, then one group per block (a stage's downsampler joins its first block, its norm
        closes it), or per stage when ``coarse`` (hierarchical networks). With ``group_layers`` set, a
        callable giving each parameter's layer id (timm's other format)."""
        if self.group_layers is not None:
            layers = self.group_layers[int(coarse)]
            return functools.partial(_layer_of, layers, max(layers.values(), default=-1) + 1)
        embeds = [rf"^stages\.{i}\.{part}\." for i in range(len(self.stages)) for part in ("prefix", "pos_embed")
                  if isinstance(getattr(self._stage(i), part), PrefixTokens | LearnedPosition)]
        stem = "|".join([r"^stem\.", *embeds])
        if coarse and not self.isotropic:
            return {"stem": stem, "blocks": r"^stages\.(\d+)\."}
        return {"stem": stem, "blocks": [(r"^stages\.(\d+)\.blocks\.(\d+)\.", None),
                                         (r"^stages\.(\d+)\.norm\.", (99999,)),
                                         (r"^stages\.(\d+)\.", (0,))]}

    def set_group_layers(self, fine: Mapping[str, int], coarse: Mapping[str, int]) -> None:
        """Fix ``group_matcher``'s layer id of each parameter name (others, e.g. a new head, come last); the zoo
        gives its models timm's own grouping this way."""
        self.group_layers = (dict(fine), dict(coarse))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (in training) instead of storing its activations."""
        self.grad_checkpointing = enable

    def forward_checkpointed(self, x: Tensor) -> Tensor:
        """``forward_features`` with every block checkpointed."""
        x = self.stem(x)
        for i in range(len(self.stages)):
            stage = self._stage(i)
            x = stage.norm(stage.forward_body(x, checkpointed=True))
        return x

    # --- features -------------------------------------------------------------------------------------

    def default_feature_taps(self) -> list[Tap]:
        """One tap per stage, or per block (prefix-only blocks left out) of an isotropic network."""
        if not self.isotropic:
            return [(i, None) for i in range(len(self.stages))]
        return [(i, j) for i in range(len(self.stages)) for j, block in enumerate(self._stage(i).blocks)
                if not getattr(block, "updates_prefix_only", False)]

    def feature_candidates(self) -> list[dict[str, Any]]:
        """``feature_info`` entries of everything that can be tapped by default: the stem, then the default taps."""
        stem = [self._feature(_STEM)] if self._stem_type() is not None else []
        return stem + [self._feature(tap) for tap in self.default_feature_taps()]

    def set_feature_modules(self, modules: Sequence[str]) -> None:
        """Tap these modules (``stem``, ``stages.i`` or ``stages.i.blocks.j``, in forward order) for
        ``feature_info`` and ``forward_intermediates``."""
        taps = [_parse(m) for m in modules]
        for tap in taps:
            self._require(tap)
        order = [_order(t) for t in taps]
        if order != sorted(set(order)):
            raise ValueError(f"feature modules must be distinct and in forward order: {list(modules)}")
        self.feature_info = [self._feature(t) for t in taps]

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The features of ``feature_info`` (``indices``: the last n if an int, all if None, else these
        positions), as timm's ``forward_intermediates``: NCHW (or NLC) maps, prefix tokens dropped; ``norm``
        applies the final norm where timm does; ``stop_early`` stops after the last one taken. Returns the
        intermediates, or (final features in this network's layout, intermediates)."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), cast(Any, indices))
        taps = {_parse(self.feature_info[k]["module"]) for k in take}
        last = _parse(self.feature_info[max_index]["module"])
        self._require(last)
        in_hw = (x.shape[-2], x.shape[-1])
        checkpointed = self.grad_checkpointing and self.training
        out: list[Tensor] = []
        x = self.stem(x)
        if _STEM in taps:
            out.append(self._format(x, self._stem_type(), output_fmt, in_hw))
        for i in range(last[0] + 1 if stop_early else len(self.stages)):
            stage, kind = self._stage(i), self.feature_types[i]
            final = self._final_norm(i)
            blocks = {j for s, j in taps if s == i and j is not None}
            stop = last[1] if stop_early and last[0] == i else None
            if blocks or stop is not None:
                x = stage.forward_pre(x)
                context = stage.context_of(x)
                collected: list[Tensor] = []  # a collecting stage's prefix tokens of each block
                block_kind = kind.with_prefix(stage.collect) if stage.collect else kind
                for j in range(len(stage.blocks)):
                    x = stage.forward_block(j, x, checkpointed=checkpointed, taps=collected, context=context)
                    if j in blocks:
                        out.append(self._format(final(x) if norm else x, block_kind, output_fmt, in_hw))
                    if j == stop:
                        return out if intermediates_only else (final(x), out)
                x = stage.gather(x, collected)
            else:
                x = stage.forward_body(x, checkpointed=checkpointed)
            if (i, None) in taps:
                keep_final_norm_off = i == self.final_norm_stage and not norm
                out.append(self._format(x if keep_final_norm_off else stage.norm(x), kind, output_fmt, in_hw))
            x = stage.norm(x)
        return out if intermediates_only else (x, out)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the features at ``indices`` do not need, as timm does: later stages and blocks; the
        final norm with ``prune_norm`` (or with the stage that holds it, for a hierarchical network); the head
        with ``prune_head`` or when the output no longer ends where it did. Returns the absolute indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.feature_info), cast(Any, indices))
        i, j = _parse(self.feature_info[max_index]["module"])
        self._require((i, j))
        final = self._final_norm(len(self.stages) - 1) if self.isotropic else None
        dropped = i + 1 < len(self.stages)
        self.stages = self.stages[: i + 1]
        if j is not None:
            self._stage(i).blocks = self._stage(i).blocks[: j + 1]
        if self.final_norm_stage is not None and self.final_norm_stage > i:
            self.final_norm_stage = None
        if final is not None and dropped and i >= 0 and isinstance(self._stage(i).norm, nn.Identity):
            self._stage(i).norm, self.final_norm_stage = final, i  # an isotropic net keeps its final norm
        if prune_norm and self.final_norm_stage is not None:
            self._stage(self.final_norm_stage).norm = nn.Identity()
        ends_earlier = dropped or (not self.isotropic and max_index < len(self.feature_info) - 1)
        self.num_features = self._features_type().channels
        if prune_head or ends_earlier:
            self.head = nn.Identity()
        self._sync_head()
        return list(take)

    # --- config ---------------------------------------------------------------------------------------

    def default_pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained config for this network: the compiled input size, ImageNet's mean/std, timm's
        defaults for crop and interpolation, and module paths in this network; no weights (``url`` '')."""
        from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        first_conv = next((n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)), None)
        return {"url": "", "hf_hub_id": None, "architecture": self.name,
                "input_size": (self.input_type.channels, *self.input_type.grid), "fixed_input_size": True,
                "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": self.num_classes,
                "pool_size": None, "first_conv": first_conv, "classifier": self._classifier_names()}

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    # --- internals ------------------------------------------------------------------------------------

    def _stage(self, i: int) -> Stage:
        return cast("Stage", self.stages[i])

    def _final_norm(self, i: int) -> nn.Module:
        """The final norm where block taps of stage ``i`` take it (``norm=True``), else Identity."""
        k = self.final_norm_stage
        usable = k is not None and (self.isotropic or k == i)
        return self._stage(k).norm if usable and k is not None else nn.Identity()

    def _stem_type(self) -> TensorType | None:
        """The stem's output type, from its convs (every stem is a stack of them on maps)."""
        h, w, channels = self.input_type.height, self.input_type.width, None
        for m in self.stem.modules():
            if isinstance(m, nn.Conv2d):
                pad = m.padding if isinstance(m.padding, tuple) else (0, 0)
                h, w = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                        for size, p, d, k, s in zip((h, w), pad, m.dilation, m.kernel_size, m.stride, strict=True))
                channels = m.out_channels
        return None if channels is None else TensorType("maps", channels, h, w)

    def _tap_type(self, tap: Tap) -> TensorType:
        if tap == _STEM:
            stem = self._stem_type()
            if stem is None:
                raise ValueError("this network's stem has no conv to take features from")
            return stem
        return self.feature_types[tap[0]]

    def _features_type(self) -> TensorType:
        """The type of ``forward_features``' output (after pruning too)."""
        return self._tap_type((len(self.stages) - 1, None) if len(self.stages) else _STEM)

    def _feature(self, tap: Tap) -> dict[str, Any]:
        kind = self._tap_type(tap)
        return {"num_chs": kind.channels, "reduction": self.input_type.height // kind.height, "module": _path(tap)}

    def _require(self, tap: Tap) -> None:
        i, j = tap
        if tap != _STEM and (i >= len(self.stages) or (j is not None and j >= len(self._stage(i).blocks))):
            raise ValueError(f"'{_path(tap)}' is not in this network (pruned?)")

    def _format(self, y: Tensor, kind: TensorType | None, fmt: str, in_hw: tuple[int, int]) -> Tensor:
        """A stage's or block's output as NCHW maps or NLC tokens, prefix tokens dropped."""
        assert kind is not None
        if y.ndim == 3:  # (B, P + H*W, C)
            y = y[:, kind.prefix:]
            if fmt == "NLC":
                return y
            h, w = self._grid(kind, in_hw, y.shape[1])
            return y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
        if kind.layout == "tokens":  # (B, H, W, C)
            return y.flatten(1, 2) if fmt == "NLC" else y.permute(0, 3, 1, 2).contiguous()
        return y.flatten(2).transpose(1, 2) if fmt == "NLC" else y  # (B, C, H, W)

    def _grid(self, kind: TensorType, in_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
        h, w = kind.grid
        if in_hw != self.input_type.grid:
            r = self.input_type.height // kind.height
            h, w = in_hw[0] // r, in_hw[1] // r
        if h * w != tokens:
            raise ValueError(f"{tokens} tokens do not form the {h}x{w} grid of this input")
        return h, w

    def _classifier_names(self) -> str | tuple[str, ...]:
        fcs = self.get_classifier()
        fcs = fcs if isinstance(fcs, tuple) else (fcs,)
        names = tuple(next(n for n, m in self.named_modules(remove_duplicate=False) if m is fc) for fc in fcs)
        return names[0] if len(names) == 1 else names

    def _device_dtype(self) -> dict[str, Any]:
        ref = next((p for p in [*self.head.parameters(), *self.parameters()] if p.is_floating_point()), None)
        return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}

    def _sync_head(self) -> None:
        """``num_classes``, ``head_hidden_size``, ``output_type`` and the config after the head changed."""
        if isinstance(self.head, Head):
            self.num_classes = self.head.num_classes
            self.head_hidden_size = self.head.hidden_size(self.num_features)
            self.output_type = TensorType("vector", self.num_classes or self.head_hidden_size)
        else:
            self.num_classes, self.head_hidden_size = 0, self.num_features
            self.output_type = self._features_type()
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": self.num_classes,
                               "classifier": self._classifier_names()}


def feature_backbone(net: TimmProtocol, out_indices: int | Sequence[int] | None = None, *, norm: bool = False,
                     output_fmt: str = "NCHW") -> nn.Module:
    """``net`` as a feature backbone (timm's ``FeatureGetterNet``: pruned to the features it needs, returning
    a list of maps, ``feature_info`` for the selected ones). ``out_indices`` defaults to every stage of a
    hierarchical network and the last 3 blocks of an isotropic one (timm's defaults)."""
    from timm.models._features import FeatureGetterNet

    if out_indices is None:
        out_indices = min(3, len(net.feature_info)) if net.isotropic else len(net.feature_info)
    indices = out_indices if isinstance(out_indices, int) else tuple(out_indices)
    return FeatureGetterNet(net, out_indices=indices, norm=norm, output_fmt=output_fmt)


def _layer_of(layers: dict[str, int], default: int, name: str) -> int:
    return layers.get(name, default)


def _parse(module: str) -> Tap:
    if module == "stem":
        return _STEM
    match = _TAP.fullmatch(module)
    if match is None:
        raise ValueError(f"'{module}' is not a feature module (stem, stages.i or stages.i.blocks.j)")
    return int(match[1]), None if match[2] is None else int(match[2])


def _path(tap: Tap) -> str:
    i, j = tap
    if tap == _STEM:
        return "stem"
    return f"stages.{i}" if j is None else f"stages.{i}.blocks.{j}"


def _order(tap: Tap) -> tuple[float, float]:
    i, j = tap
    return (float(i), float("inf") if j is None else float(j))
