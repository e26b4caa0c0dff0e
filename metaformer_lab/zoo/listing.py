"""What ``zoo list`` shows: each model's family, token mixers, size and cost, read from a record.

``zoo/listing.json`` holds what the graph gives (parameters, GFLOPs at the model's input size, token mixers)
and ``zoo/status.json`` the fixed-point status, so listing the zoo imports neither torch nor timm and builds
nothing. ``metaformer-lab zoo list --record metaformer_lab/zoo/listing.json`` recomputes the record from the
graphs (:func:`size_models`); a test recomputes it too and compares, so it cannot drift from the YAMLs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

ZOO_DIR = Path(__file__).resolve().parent
LISTING_FILE = ZOO_DIR / "listing.json"
STATUS_FILE = ZOO_DIR / "status.json"


@dataclass(frozen=True)
class ModelRow:
    """One zoo model as listed; ``status`` is the recorded fixed-point (or paper) check result."""

    name: str
    family: str
    token_mixers: list[str]
    params: int
    gflops: float
    input_size: int | list[int]
    status: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recorded_status() -> dict[str, dict[str, Any]]:
    """Model name -> its row of ``zoo/status.json`` (written by ``zoo check --record``)."""
    if not STATUS_FILE.is_file():
        return {}
    return {row["name"]: row for row in json.loads(STATUS_FILE.read_text())["models"]}


def status_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not recorded"
    if not row.get("passed"):
        return "FAILED"
    if row.get("paper"):
        code = f"; code {row['gmacs'] / row['code_gmacs'] - 1:+.0%}" if row.get("code_gmacs") else ""
        return f"paper (GMACs {row['gmacs'] / row['paper_gmacs'] - 1:+.0%}{code})"
    diff = row["max_abs_diff"]
    return f"yes (Δ {diff:.1e})" if diff else "yes (Δ 0)"


def recorded_rows(path: Path = LISTING_FILE) -> list[ModelRow]:
    """Every model of the record at ``path`` with its recorded status, sorted by name."""
    status = recorded_status()
    rows = json.loads(path.read_text())["models"]
    return [ModelRow(**row, status=status_text(status.get(row["name"]))) for row in sorted(rows, key=_name)]


def _name(row: dict[str, Any]) -> str:
    return str(row["name"])


def token_mixer_tags(spec: BaseModel) -> list[str]:
    """Token-mixer types used by a spec, in order of first use (composite branches included)."""
    from pydantic import BaseModel

    from metaformer_lab.ops import TOKEN_MIXERS

    found: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, BaseModel):
            if type(value) in TOKEN_MIXERS.specs():
                found[value.type] = None  # type: ignore[attr-defined]
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, (list, dict)):  # lists of blocks and branches; a block's steps by name
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)

    walk(spec)
    return list(found)


def size_models(names: Iterable[str]) -> list[ModelRow]:
    """Rows computed from each model's graph (the spec is lowered and costed; no module is built)."""
    from metaformer_lab.graph.cost import graph_cost
    from metaformer_lab.graph.lower import lower
    from metaformer_lab.spec.load import read_spec
    from metaformer_lab.zoo.models import get

    status = recorded_status()
    rows = []
    for name in names:
        spec = read_spec(name)
        cost = graph_cost(lower(spec))
        rows.append(ModelRow(name, get(name).family, token_mixer_tags(spec), cost.params, round(cost.flops / 1e9, 6),
                             spec.input.size, status_text(status.get(name))))
    return rows


def write_listing(rows: Iterable[ModelRow], path: Path) -> None:
    """The record ``zoo list`` reads: rows without their status (``zoo/status.json`` keeps that)."""
    models = [{k: v for k, v in row.to_json().items() if k != "status"} for row in sorted(rows, key=lambda r: r.name)]
    head = {"made_by": "metaformer-lab zoo list --record metaformer_lab/zoo/listing.json",
            "gflops": "FLOPs / 1e9 at batch 1 and the model's input size (torch's FLOP counter, meta device)"}
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    rows = ",\n".join(f"  {json.dumps(model)}" for model in models)  # one model a line: readable diffs
    path.write_text("{\n" + "\n".join(lines) + '\n "models": [\n' + rows + "\n ]\n}\n")
