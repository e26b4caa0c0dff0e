"""What ``zoo list`` shows and ``zoo check --record`` writes."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import BaseModel

from metaformer_lab.graph.cost import graph_cost
from metaformer_lab.graph.lower import lower
from metaformer_lab.ops import TOKEN_MIXERS
from metaformer_lab.spec.load import read_spec, zoo_dir
from metaformer_lab.zoo.catalog import get
from metaformer_lab.zoo.check import CheckResult


def status_file() -> Path:
    return zoo_dir() / "status.json"


@dataclass(frozen=True)
class ModelRow:
    name: str
    family: str
    token_mixers: list[str]
    params: int
    gflops: float
    input_size: int | list[int]
    status: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def token_mixer_tags(spec: BaseModel) -> list[str]:
    """Token-mixer types used by a spec, in order of first use (composite branches included)."""
    found: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, BaseModel):
            if type(value) in TOKEN_MIXERS.specs():
                found[value.type] = None  # type: ignore[attr-defined]
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(spec)
    return list(found)


def recorded_status() -> dict[str, dict[str, Any]]:
    path = status_file()
    if not path.is_file():
        return {}
    return {row["name"]: row for row in json.loads(path.read_text())["models"]}


def _status(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not recorded"
    if not row.get("passed"):
        return "FAILED"
    diff = row["max_abs_diff"]
    return f"yes (Δ {diff:.1e})" if diff else "yes (Δ 0)"


def model_rows(names: Iterable[str]) -> list[ModelRow]:
    status = recorded_status()
    rows = []
    for name in names:
        spec = read_spec(name)
        cost = graph_cost(lower(spec))
        rows.append(ModelRow(name, get(name).family, token_mixer_tags(spec), cost.params, cost.flops / 1e9,
                             spec.input.size, _status(status.get(name))))
    return rows


def write_record(results: Sequence[CheckResult], failures: Sequence[tuple[str, Exception]], path: Path) -> None:
    """The protocol's results with provenance, merged into ``path`` (models not run keep their rows)."""
    old = json.loads(path.read_text())["models"] if path.is_file() else []
    rows = {row["name"]: row for row in old}
    rows.update({r.name: r.to_json() for r in results})
    rows.update({name: {"name": name, "passed": False, "error": str(err)} for name, err in failures})
    record = {
        "protocol": "timm state_dict + N(0, .02) noise on every parameter and float buffer, strict load, "
                    "batch 2, eval, max |dlogit| <= tolerance, exact state_dict round trip",
        "provenance": {"timm": timm.__version__, "torch": torch.__version__, "python": platform.python_version(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")},
        "models": [rows[k] for k in sorted(rows)],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
