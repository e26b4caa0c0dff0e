"""metaformer-lab: vision architectures as declarative YAML, checked as typed graphs, compiled to PyTorch.

The public names are resolved on first use (PEP 562 ``__getattr__``): ``import metaformer_lab`` and any
``import metaformer_lab.<sub>`` (the command line's ``--help`` among them) stay cheap and never import
torch or timm, which only ``build``/``to_graph`` and the zoo's timm interop need. ``from metaformer_lab import X``
and ``metaformer_lab.X`` work as before; a type checker sees the eager imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaformer_lab.api import build, deploy, dump_spec, load_spec, to_graph
    from metaformer_lab.core.errors import Issue, MetaformerLabError, SpecError
    from metaformer_lab.core.types import TensorType
    from metaformer_lab.space import contains, decode, load_space, sample
    from metaformer_lab.spec.arch import ArchSpec
    from metaformer_lab.zoo import convert_state_dict, create_model, from_timm, list_models, to_timm_state_dict

__version__ = "0.1.0"

# public name -> the module that defines it; kept in step with the TYPE_CHECKING block above (a test checks)
_EXPORTS: dict[str, str] = {
    "build": "metaformer_lab.api", "deploy": "metaformer_lab.api", "dump_spec": "metaformer_lab.api",
    "load_spec": "metaformer_lab.api", "to_graph": "metaformer_lab.api",
    "Issue": "metaformer_lab.core.errors", "MetaformerLabError": "metaformer_lab.core.errors",
    "SpecError": "metaformer_lab.core.errors",
    "TensorType": "metaformer_lab.core.types",
    "contains": "metaformer_lab.space", "decode": "metaformer_lab.space", "load_space": "metaformer_lab.space",
    "sample": "metaformer_lab.space",
    "ArchSpec": "metaformer_lab.spec.arch",
    "convert_state_dict": "metaformer_lab.zoo", "create_model": "metaformer_lab.zoo", "from_timm": "metaformer_lab.zoo",
    "list_models": "metaformer_lab.zoo", "to_timm_state_dict": "metaformer_lab.zoo",
}

__all__ = ["ArchSpec", "Issue", "MetaformerLabError", "SpecError", "TensorType", "__version__", "build", "contains",
           "convert_state_dict", "create_model", "decode", "deploy", "dump_spec", "from_timm", "list_models",
           "load_space", "load_spec", "sample", "to_graph", "to_timm_state_dict"]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and cache the name here (later lookups are plain)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's own names plus the lazily resolved public ones, so ``dir()`` and completion list them all."""
    return sorted(set(globals()) | set(__all__))
