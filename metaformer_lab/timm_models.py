"""Every zoo model in timm's registry under an ``mfl_`` prefix: after ``import metaformer_lab.timm_models``,
``timm.create_model("mfl_caformer_s18", num_classes=10)`` (and ``timm.list_models("mfl_*")``, timm's
``train.py --model mfl_...``) build this project's module, with timm's model protocol
(:mod:`metaformer_lab.compile.protocol`). ``pretrained=True`` loads timm's own weights through the zoo's
key map (timm downloads them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import register_model

from metaformer_lab.zoo import list_models
from metaformer_lab.zoo.interop import create_model

PREFIX = "mfl_"
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm's factory passes these to every model


def _entrypoint(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = PREFIX + name
    entry.__module__ = __name__
    entry.__doc__ = f"metaformer-lab's {name} (the zoo's fixed point of timm's {name})."
    return entry


REGISTERED = tuple(register_model(_entrypoint(name)).__name__ for name in list_models())
"""The names registered with timm."""

__all__ = ["PREFIX", "REGISTERED"]
