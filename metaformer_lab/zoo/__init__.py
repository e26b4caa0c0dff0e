"""Known models as fixed points: zoo YAMLs that reproduce timm's modules, and timm weights in and out.

The public names are resolved on first use (PEP 562 ``__getattr__``), as in the package root: the catalog and
the interop import timm and torch, which ``zoo list`` (read from ``zoo/listing.py``'s record) never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaformer_lab.zoo.fixed_point import CheckResult, check
    from metaformer_lab.zoo.interop import convert_state_dict, create_model, from_timm, to_timm_state_dict
    from metaformer_lab.zoo.keymap import CheckpointError, KeyMap
    from metaformer_lab.zoo.models import ZooModel, catalog, get, list_models

# public name -> the module that defines it; kept in step with the TYPE_CHECKING block above (a test checks)
_EXPORTS: dict[str, str] = {
    "ZooModel": "metaformer_lab.zoo.models", "catalog": "metaformer_lab.zoo.models",
    "get": "metaformer_lab.zoo.models", "list_models": "metaformer_lab.zoo.models",
    "CheckResult": "metaformer_lab.zoo.fixed_point", "check": "metaformer_lab.zoo.fixed_point",
    "convert_state_dict": "metaformer_lab.zoo.interop", "create_model": "metaformer_lab.zoo.interop",
    "from_timm": "metaformer_lab.zoo.interop", "to_timm_state_dict": "metaformer_lab.zoo.interop",
    "CheckpointError": "metaformer_lab.zoo.keymap", "KeyMap": "metaformer_lab.zoo.keymap",
}

__all__ = [
    "CheckResult", "CheckpointError", "KeyMap", "ZooModel", "catalog", "check", "convert_state_dict", "create_model",
    "from_timm", "get", "list_models", "to_timm_state_dict",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
