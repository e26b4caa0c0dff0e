"""The paper check: a zoo model timm does not have (``Paper`` in its family file) against its publication.

Its parameter count must equal what the authors' official code builds (within ``PARAMS_TOLERANCE``) and its
multiply-adds the paper's table (within ``GMACS_TOLERANCE``), both from the graph at the model's input size (no
module is built). Where the paper's table disagrees with the authors' own code beyond that tolerance, the family
file records the code's figure (``code_gmacs``, with a note) and the check holds the model to it instead. ``zoo
check`` runs it for paper models as it runs the fixed-point protocol for timm's.
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
    code_gmacs: float | None = None
    """The authors' code's multiply-adds, where the paper's table disagrees with that code (``Paper.code_gmacs``)."""

    @property
    def params_error(self) -> float:
        return self.params / self.authors_params - 1.0

    @property
    def gmacs_error(self) -> float:
        """Against the paper's table, always reported."""
        return self.gmacs / self.paper_gmacs - 1.0

    @property
    def checked_gmacs_error(self) -> float:
        """Against what the check holds the model to: the authors' code's figure where one is recorded, else the
        paper's."""
        return self.gmacs / (self.code_gmacs or self.paper_gmacs) - 1.0

    @property
    def passed(self) -> bool:
        return abs(self.params_error) <= PARAMS_TOLERANCE and abs(self.checked_gmacs_error) <= GMACS_TOLERANCE

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
                       gmacs=round(cost.flops / 2e9, 4), paper_gmacs=paper.gmacs, code_gmacs=paper.code_gmacs)
