"""metaformer-lab: vision architectures as declarative YAML, checked as typed graphs, compiled to PyTorch."""

from metaformer_lab.api import build, dump_spec, load_spec, to_graph
from metaformer_lab.core.errors import Issue, MetaformerLabError, SpecError
from metaformer_lab.core.types import TensorType
from metaformer_lab.spec.arch import ArchSpec

__version__ = "0.1.0"

__all__ = ["ArchSpec", "Issue", "MetaformerLabError", "SpecError", "TensorType", "__version__", "build", "dump_spec",
           "load_spec", "to_graph"]
