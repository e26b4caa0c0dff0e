"""What ``zoo check --record`` writes (``zoo/status.json``; ``zoo list`` shows it)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from metaformer_lab.zoo.fixed_point import CheckResult
from metaformer_lab.zoo.papers import PaperResult


def write_record(results: Sequence[CheckResult | PaperResult], failures: Sequence[tuple[str, Exception]],
                 path: Path) -> None:
    """The protocol's results with provenance, merged into ``path`` (models not run keep their rows)."""
    old = json.loads(path.read_text())["models"] if path.is_file() else []
    rows = {row["name"]: row for row in old}
    rows.update({r.name: r.to_json() for r in results})
    rows.update({name: {"name": name, "passed": False, "error": str(err)} for name, err in failures})
    record = {
        "protocol": "timm state_dict + N(0, .02) noise on every parameter and float buffer, strict load, "
                    "batch 2, eval, max |dlogit| <= tolerance, exact state_dict round trip; paper models: params "
                    "within 1% of the authors' code, GMACs within 5% of the paper",
        "provenance": {"timm": timm.__version__, "torch": torch.__version__, "python": platform.python_version(),
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")},
        "models": [rows[k] for k in sorted(rows)],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
