"""The bottom layer: tensor types, error types, registries."""

from metaformer_lab.core.errors import Issue, MetaformerLabError, ShapeIssue, SpaceError, SpecError, StudyError
from metaformer_lab.core.registry import Case, CompositeDef, OpDef, Registry, UnknownTag, tag_of
from metaformer_lab.core.types import LAYOUTS, Layout, TensorType

__all__ = [
    "LAYOUTS", "Case", "CompositeDef", "Issue", "Layout", "MetaformerLabError", "OpDef", "Registry",
    "ShapeIssue", "SpaceError", "SpecError", "StudyError", "TensorType", "UnknownTag", "tag_of",
]
