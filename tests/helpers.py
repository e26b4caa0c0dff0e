"""Shared test helpers (imported as ``helpers``; tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metaformer_lab.core.registry import Case, CompositeDef, OpDef
from metaformer_lab.ops import REGISTRIES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def all_cases() -> list[tuple[str, Any, Case]]:
    """(role, op definition, case) for every example case of every registered op."""
    out = []
    for role, registry in REGISTRIES.items():
        for opdef in registry:
            for case in opdef.cases:
                out.append((role, opdef, case))
    return out


def case_id(item: tuple[str, Any, Case]) -> str:
    role, opdef, case = item
    return f"{role}-{opdef.tag}" + (f"-{case.id}" if case.id else "")


def random_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape)


__all__ = ["EXAMPLES", "ROOT", "CompositeDef", "OpDef", "all_cases", "case_id", "random_input"]
