"""Known models as fixed points: zoo YAMLs that reproduce timm's modules, and timm weights in and out."""

from metaformer_lab.zoo.catalog import ZooModel, catalog, get, list_models
from metaformer_lab.zoo.check import CheckResult, check
from metaformer_lab.zoo.interop import convert_state_dict, create_model, from_timm, to_timm_state_dict
from metaformer_lab.zoo.keymap import CheckpointError, KeyMap

__all__ = [
    "CheckResult", "CheckpointError", "KeyMap", "ZooModel", "catalog", "check", "convert_state_dict", "create_model",
    "from_timm", "get", "list_models", "to_timm_state_dict",
]
