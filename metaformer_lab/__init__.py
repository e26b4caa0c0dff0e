"""metaformer-lab: vision architectures as declarative YAML, checked as typed graphs, compiled to PyTorch."""

from metaformer_lab.api import build, dump_spec, load_spec, to_graph
from metaformer_lab.core.errors import Issue, MetaformerLabError, SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.space import contains, decode, load_space, sample
from metaformer_lab.spec.arch import ArchSpec
from metaformer_lab.zoo import convert_state_dict, create_model, from_timm, list_models, to_timm_state_dict

__version__ = "0.1.0"

__all__ = ["ArchSpec", "Issue", "MetaformerLabError", "SpecError", "TensorType", "__version__", "build", "contains",
           "convert_state_dict", "create_model", "decode", "dump_spec", "from_timm", "list_models", "load_space",
           "load_spec", "sample", "to_graph", "to_timm_state_dict"]
