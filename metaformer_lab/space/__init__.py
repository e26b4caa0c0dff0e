"""Search spaces: declared, typed spaces of architectures, decoded define-by-run from Optuna trials.

    space = load_space("tiny")                       # a shipped space, or a path
    spec = decode(space, optuna.trial.FixedTrial(params))
    specs = sample(space, 20, seed=0).specs
    found = contains(space, load_spec("poolformer_s12")).params
"""

from metaformer_lab.space.contains import Containment, contains
from metaformer_lab.space.decode import InvalidPoint, Point, Sample, decode, decode_point, sample
from metaformer_lab.space.load import SpaceSource, load_space
from metaformer_lab.space.schema import SearchSpace, space_names
from metaformer_lab.space.size import Validity, continuous, count_points, show_tree, valid_share
from metaformer_lab.space.tree import Choice

__all__ = [
    "Choice", "Containment", "InvalidPoint", "Point", "Sample", "SearchSpace", "SpaceSource", "Validity", "contains",
    "continuous", "count_points", "decode", "decode_point", "load_space", "sample", "show_tree", "space_names",
    "valid_share",
]
