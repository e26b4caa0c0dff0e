"""The paper check: a zoo model timm does not have (``Paper`` in its family file) against its publication.

Its parameter count must equal what the authors' official code builds (within ``PARAMS_TOLERANCE``) and its
multiply-adds the paper's table (within ``GMACS_TOLERANCE``, or within the paper's rounding: half a unit of its
last printed digit, wider for a small model printed to one decimal, CMT-Ti's 0.6), both from the graph at the
model's input size (no module is built). ``zoo check`` runs it for paper models as it runs the fixed-point
protocol for timm's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from metaformer_lab.core.errors import SpecError
from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.graph.lower import lower
from metaformer_lab.spec.load import read_spec
from metaformer_lab.zoo.models import get

PARAMS_TOLERANCE = 0.01
"""Relative: the issue's bar for 'equal to the authors' code' where a count cannot match exactly."""
GMACS_TOLERANCE = 0.05
"""Relative: papers round their tables, and some count attention's matmuls and some do not."""


@dataclass(frozen=True)
class PaperResult:
    name: str
    arxiv: str
    params: int
    authors_params: int
    gmacs: float
    paper_gmacs: float

    @property
    def params_error(self) -> float:
        return self.params / self.authors_params - 1.0

    @property
    def gmacs_error(self) -> float:
        return self.gmacs / self.paper_gmacs - 1.0

    @property
    def gmacs_rounding(self) -> float:
        """Half a unit of the paper's last printed digit (0.05 for 0.6 or 4.0): what its rounding may hide."""
        decimals = len(repr(self.paper_gmacs).partition(".")[2])
        return 0.5 * 10.0 ** -decimals

    @property
    def gmacs_ok(self) -> bool:
        """Within ``GMACS_TOLERANCE`` of the paper's figure, or within its rounding."""
        gap = abs(self.gmacs - self.paper_gmacs)
        return abs(self.gmacs_error) <= GMACS_TOLERANCE or gap <= self.gmacs_rounding + 1e-12

    @property
    def passed(self) -> bool:
        return abs(self.params_error) <= PARAMS_TOLERANCE and self.gmacs_ok

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "paper": True, "passed": self.passed}


def check_paper(name: str) -> PaperResult:
    """Zoo model ``name`` (a paper model) against its paper's record; SpecError for a fixed point."""
    zoo = get(name)
    paper = zoo.entry.paper
    if paper is None:
        raise SpecError.single(name, "is a fixed point of timm's module: run the fixed-point protocol (zoo.check)")
    cost = graph_cost(lower(read_spec(name)))
    return PaperResult(name=name, arxiv=paper.arxiv, params=cost.params, authors_params=paper.params,
                       gmacs=round(cost.flops / 2e9, 4), paper_gmacs=paper.gmacs)
