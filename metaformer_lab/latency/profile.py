"""Latency profiles: named, versioned JSON files of per-op latencies measured on one device, plus the
whole-model correction fitted on measured networks and the profile's measured accuracy.

A profile is valid for one :class:`~metaformer_lab.latency.target.LatencyTarget` (device and its model,
dtype, batch size, threads, input size, memory format, compile mode, deploy form), stored as the file's
``settings`` with the torch version and date. Shipped profiles live in ``metaformer_lab/latency/profiles/``;
:func:`find_profile` picks the one whose target matches or says which come close; :func:`match_profile`
also takes one made on another CPU model, for the caller to fit to this host (:mod:`.host`).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from metaformer_lab.core.errors import Issue, LatencyError
from metaformer_lab.latency.target import LatencyTarget

FORMAT = "metaformer-lab latency profile"
VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
FEATURES = ("ops_ms", "blocks", "branches", "stages", "one")
"""Whole-model correction: measured ~ coef . (sum of op latencies, blocks, residual branches, stages, 1)."""


@dataclass(frozen=True)
class OpEntry:
    """One measured op: median and spread in ms, the memory order it returns, and what nearest-neighbour
    estimates compare (config hash, kind, op type, input and output element counts, input memory order)."""

    ms: float
    p10: float
    p90: float
    out_mem: str
    config: str
    kind: str
    op: str
    numel_in: int
    numel_out: int
    mem: str
    passes: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"ms": round(self.ms, 6), "p10": round(self.p10, 6), "p90": round(self.p90, 6), "out_mem": self.out_mem,
                "config": self.config, "kind": self.kind, "op": self.op, "numel_in": self.numel_in,
                "numel_out": self.numel_out, "mem": self.mem, "passes": self.passes}


@dataclass
class Profile:
    """A loaded profile. ``settings`` holds its target's fields (:attr:`target`), the torch version and the
    date; ``accuracy`` the last ``latency evaluate`` report."""

    name: str
    settings: dict[str, Any]
    ops: dict[str, OpEntry] = field(default_factory=dict)
    correction: list[float] | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    host_scale: float = 1.0
    """Factor fitted to the host in use (:mod:`.host`); not saved: it belongs to the host, not the profile."""
    host_check: dict[str, Any] | None = None

    @cached_property
    def target(self) -> LatencyTarget:
        """What the profile is valid for (its ``settings`` less the torch version and date)."""
        return LatencyTarget.from_json(self.settings)

    @cached_property
    def by_config(self) -> dict[str, list[OpEntry]]:
        groups: dict[str, list[OpEntry]] = defaultdict(list)
        for entry in self.ops.values():
            groups[entry.config].append(entry)
        return dict(groups)

    @cached_property
    def by_op(self) -> dict[tuple[str, str], list[OpEntry]]:
        groups: dict[tuple[str, str], list[OpEntry]] = defaultdict(list)
        for entry in self.ops.values():
            groups[(entry.kind, entry.op)].append(entry)
        return dict(groups)

    @cached_property
    def by_kind(self) -> dict[str, list[OpEntry]]:
        groups: dict[str, list[OpEntry]] = defaultdict(list)
        for entry in self.ops.values():
            groups[entry.kind].append(entry)
        return dict(groups)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "description": self.description,
                "settings": self.settings, "correction": {"features": list(FEATURES), "coef": self.correction},
                "fit": self.fit, "accuracy": self.accuracy,
                "ops": {k: e.to_json() for k, e in sorted(self.ops.items())}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a killed calibration leaves the previous file intact)."""
        self.path = write_document(path, self.to_json())

    def summary(self) -> dict[str, Any]:
        """Provenance and accuracy without the op table (for listings)."""
        return {"name": self.name, "path": str(self.path) if self.path else None, **self.settings,
                "ops": len(self.ops), "fit": {k: v for k, v in self.fit.items() if k != "models"},
                "accuracy": self.accuracy}


def _entry(raw: Mapping[str, Any]) -> OpEntry:
    return OpEntry(ms=float(raw["ms"]), p10=float(raw["p10"]), p90=float(raw["p90"]), out_mem=str(raw["out_mem"]),
                   config=str(raw["config"]), kind=str(raw["kind"]), op=str(raw["op"]), numel_in=int(raw["numel_in"]),
                   numel_out=int(raw["numel_out"]), mem=str(raw["mem"]), passes=int(raw.get("passes", 1)))


def write_document(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    """Write ``document`` as JSON atomically: a killed writer leaves the previous file intact."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(target)
    return target


def read_document(path: str | os.PathLike[str], fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format`` is ``fmt`` at ``version``; raises LatencyError (one
    ``path: message`` line) for a missing, unreadable, foreign or outdated file."""
    where = os.fspath(path)
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LatencyError.single(where, f"no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LatencyError.single(where, f"is not a readable JSON {what} ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise LatencyError.single(where, f"is not a {fmt} (no 'format: {fmt}')")
    if raw.get("version") != version:
        raise LatencyError.single(where, f"{what} version {raw.get('version')} is not {version}; calibrate again")
    return raw


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a profile file; raises LatencyError for a file that is not one."""
    where = os.fspath(path)
    raw = read_document(path, FORMAT, VERSION, "profile")
    try:
        ops = {k: _entry(v) for k, v in raw.get("ops", {}).items()}
        coef = raw.get("correction", {}).get("coef")
        return Profile(name=str(raw["name"]), settings=dict(raw["settings"]), ops=ops,
                       correction=[float(c) for c in coef] if coef else None, fit=dict(raw.get("fit") or {}),
                       accuracy=dict(raw.get("accuracy") or {}), description=str(raw.get("description", "")),
                       path=Path(path))
    except (KeyError, TypeError, ValueError) as err:
        raise LatencyError.single(where, f"is a damaged profile ({err})") from None


def shipped_profiles() -> list[Profile]:
    return [load_profile(p) for p in sorted(PROFILES_DIR.glob("*.json"))]


def resolve_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A profile by path or by the name of a shipped one."""
    text = os.fspath(name_or_path)
    if text.endswith(".json") or "/" in text or Path(text).exists():
        return load_profile(text)
    shipped = {p.name: p for p in shipped_profiles()}
    if text in shipped:
        return shipped[text]
    import difflib

    close = difflib.get_close_matches(text, list(shipped), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; shipped: {', '.join(shipped) or 'none'}"
    raise LatencyError.single(text, f"no such profile file, and no shipped profile of that name{hint}")


def find_profile(want: LatencyTarget, profiles: Sequence[Profile] | None = None) -> Profile:
    """The shipped profile whose target matches ``want`` (:meth:`LatencyTarget.mismatches`); raises LatencyError
    listing the near matches."""
    candidates = list(profiles) if profiles is not None else shipped_profiles()
    scored = sorted(((p.target.mismatches(want), p) for p in candidates), key=lambda mp: len(mp[0]))
    if scored and not scored[0][0]:
        return scored[0][1]
    issues = [Issue("--profile", f"no shipped profile matches {want.describe()}"
                                 + (f" on {want.device_name}" if want.device_name and want.kind == "cpu" else ""))]
    issues += [Issue("--profile", f"near match '{p.name}': differs in {', '.join(m)}") for m, p in scored[:3]]
    raise LatencyError(issues)


def match_profile(want: LatencyTarget, *, adapt: bool,
                  profiles: Sequence[Profile] | None = None) -> tuple[Profile, bool]:
    """The shipped profile for ``want``, and whether it was made on another CPU model.

    A profile that matches every field but ``device_name`` (made on another CPU model, for a CPU target)
    is returned only when ``adapt`` says the caller fits it to this host (the host check of :mod:`.host`);
    its raw numbers are another machine's. Raises LatencyError (from :func:`find_profile`, listing the
    near matches) when none fits.
    """
    try:
        return find_profile(want, profiles), False
    except LatencyError:
        if not (adapt and want.kind == "cpu" and want.device_name is not None):
            raise
    try:
        return find_profile(replace(want, device_name=None), profiles), True
    except LatencyError:
        pass
    return find_profile(want, profiles), False  # raises, with the near matches of the full target


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0 and math.isfinite(p)]
