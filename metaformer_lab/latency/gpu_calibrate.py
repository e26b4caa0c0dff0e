"""GPU efficiency factors fitted on published measurements: timm's benchmark tables (docs/architecture.md, "Latency").

A table in timm's benchmark format (``model, infer_img_size, infer_samples_per_sec, infer_step_time,
infer_batch_size, ...``; ``infer_step_time`` in ms per batch) holds one measured forward pass per row.
Each row whose timm model is a zoo model, at an input size the zoo model expresses, becomes a point
(network, GPU, dtype, batch) -> latency; every other row is listed as skipped with its reason, never
guessed. The estimator's own kernel records of each point (:mod:`.gpu`, on the meta device) are the
design: the fit finds the per-class compute and memory efficiency factors and the per-kernel overhead
that minimise the squared log error of ``sum over kernels of max(flops / (peak * ec), bytes /
(bandwidth * em)) + kernels * launch`` against the measured step times (bounded nonlinear least
squares, with a weak pull towards the defaults so that a factor the data does not bind stays put).

The same fit pooled over several GPUs' tables (each point against its own GPU's datasheet) gives
factors for GPUs without a table: :func:`gpu_efficiency` returns a GPU's own profile where one is
shipped, the pooled factors otherwise (``estimated from datasheet, factors fitted on ...``), and the
uncalibrated defaults only where nothing was fitted.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import functools
import hashlib
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from metaformer_lab.core.errors import Issue, LatencyError, MetaformerLabError
from metaformer_lab.latency.gpu import (
    DEFAULT_COMPUTE_EFFICIENCY,
    DEFAULT_MEMORY_EFFICIENCY,
    GPUS,
    TENSOR_CORE_CLASSES,
    Efficiency,
    GpuSpec,
    KernelCache,
    _checked_dtype,
    gpu_spec,
    graph_records,
    pooled_label,
    roofline_s,
)
from metaformer_lab.latency.profile import read_document, write_document

TABLE_COLUMNS = ("model", "infer_img_size", "infer_step_time", "infer_batch_size")
"""The columns of timm's benchmark format a table must have."""
TABLES_DIR = Path(__file__).resolve().parent / "timm_benchmarks"
"""The shipped tables and their README (source, GPU, torch / CUDA, commit)."""
GPU_PROFILES_DIR = Path(__file__).resolve().parent / "gpu_profiles"
"""The shipped GPU profiles: one per table (``gpu-<gpu>-<dtype>.json``), one pooled (``datasheet-<dtype>.json``)."""
SHIPPED_TABLES: Mapping[str, str] = {
    "rtx3090": "benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv",
    "rtx5090": "benchmark-infer-amp-nchw-pt291-cu130-5090.csv",
    "rtx-pro-6000": "benchmark-infer-amp-nchw-pt291-cu130-pro6000maxq.csv",
}
"""The tables the shipped profiles were fitted on, by GPU (the only ones: timm's others are kept aside)."""
FORMAT = "metaformer-lab gpu profile"
VERSION = 1
PRIOR_WEIGHT = 0.05
"""Weight of the pull towards the default factors, per log unit: a factor that no kernel is bound by stays
at its default; one that binds a measurable share of the time moves freely (a factor 2x off its default costs
as much as one network mispredicted by 3.5 %). Chosen by the shipped tables' in-sample, leave-one-family-out
and leave-one-GPU-out errors (0.02 to 0.3 tried; ``benchmarks/gpu_tables.py``)."""
SHARPNESS = 2.0
"""The smooth roofline of fitted profiles (:func:`.roofline_s`): ``sqrt(compute^2 + memory^2)`` per kernel. Chosen
by the shipped tables' errors: against the hard max it lowers leave-one-GPU-out MAPE on the RTX 3090 from 11.5 %
to 8.7 % at the same in-sample error (p = 1, 1.5, 2, 4 and the max tried; ``benchmarks/gpu_tables.py``)."""
_EFF_BOUNDS = (0.003, 5.0)
_LAUNCH_BOUNDS_US = (0.01, 20.0)
_POWER_BOUNDS = (0.0, 1.0)
"""The power exponent: 0 (every GPU holds its datasheet peak) to 1 (power alone sets the tensor-core rate)."""


# --- reading a table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One row of a benchmark table: its line number, timm model, input size, batch and step time (ms)."""

    line: int
    model: str
    img_size: int
    batch_size: int
    step_ms: float


def _number(raw: str | None, kind: type[int] | type[float]) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0 or (kind is int and value != int(value)):
        return None
    return value


def read_table(path: str | os.PathLike[str]) -> list[TableRow]:
    """The rows of a table in timm's benchmark format.

    Raises:
        LatencyError: with one issue ``(path, message)``: no such file, an empty file, a missing column, a
            value that is not a positive number, a row that repeats another's model and input size.
    """
    where = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LatencyError.single(where, "no such table file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LatencyError.single(where, f"is not a readable text table ({err})") from None
    if not text.strip():
        raise LatencyError.single(where, "is empty: a benchmark table needs a header and at least one row")
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in TABLE_COLUMNS if c not in header]
    if missing:
        raise LatencyError.single(where, f"has no column {', '.join(repr(c) for c in missing)} (timm's benchmark "
                                         f"format: {', '.join(TABLE_COLUMNS)}, ...)")
    rows: list[TableRow] = []
    seen: dict[tuple[str, int], int] = {}
    for line, raw in enumerate(reader, start=2):
        raw = {str(k).strip(): v for k, v in raw.items() if k is not None}
        model = str(raw.get("model") or "").strip()
        if not model:
            raise LatencyError.single(where, f"line {line}: no model name")
        values = {}
        for column, kind in (("infer_img_size", int), ("infer_batch_size", int), ("infer_step_time", float)):
            value = _number(raw.get(column), kind)
            if value is None:
                what = "a positive integer" if kind is int else "a positive number (ms per batch)"
                raise LatencyError.single(where, f"line {line} ({model}): {column} {raw.get(column)!r} is not {what}")
            values[column] = value
        key = (model, int(values["infer_img_size"]))
        if key in seen:
            raise LatencyError.single(where, f"line {line} repeats line {seen[key]} ({model} at {key[1]} px): one row "
                                             "per model and input size")
        seen[key] = line
        rows.append(TableRow(line, model, key[1], int(values["infer_batch_size"]), values["infer_step_time"]))
    if not rows:
        raise LatencyError.single(where, "has a header but no rows")
    return rows


@dataclass(frozen=True)
class TableSource:
    """Where a table comes from: its file name and digest, the text that describes it, torch / CUDA."""

    table: str
    sha256: str
    source: str
    date: str | None
    torch: str | None
    cuda: str | None

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "sha256": self.sha256, "source": self.source, "date": self.date,
                "torch": self.torch, "cuda": self.cuda}


def _versions(name: str) -> tuple[str | None, str | None]:
    """torch and CUDA versions from timm's file naming (``...-pt291-cu130-...``: 2.9.1, 13.0)."""
    torch_m = re.search(r"-pt(\d)(\d)(\d+)", name)
    cuda_m = re.search(r"-cu(\d\d)(\d)", name)
    return (".".join(torch_m.groups()) if torch_m else None,
            f"{int(cuda_m.group(1))}.{cuda_m.group(2)}" if cuda_m else None)


def table_source(path: str | os.PathLike[str], *, source: str | None = None, date: str | None = None) -> TableSource:
    """The provenance of a table: ``source`` when given, else the line of a README.md beside it that names
    the file (the shipped tables' README gives GPU, torch / CUDA, timm's commit and its date); ``date`` when
    given, else the last YYYY-MM-DD date in that text."""
    p = Path(path)
    text = source
    readme = p.parent / "README.md"
    if text is None and readme.is_file():
        lines = readme.read_text(errors="replace").splitlines()
        naming = [ln.strip() for ln in lines if p.name in ln]
        intro = next((ln.strip() for ln in lines if "huggingface/pytorch-image-models" in ln), "")
        if naming:
            text = " ".join(filter(None, [intro, naming[0]]))
    if date is None and text is not None:
        found = re.findall(r"\b(\d{4}-\d{2}-\d{2})\b", text)
        date = found[-1] if found else None
    torch_v, cuda_v = _versions(p.name)
    return TableSource(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), text or f"{p.name} (no source given)",
                       date, torch_v, cuda_v)


# --- mapping rows to zoo models --------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """A table row the zoo expresses: the zoo model, its family, and the measured step time on ``gpu``."""

    row: TableRow
    zoo: str
    family: str
    gpu: str

    @property
    def measured_ms(self) -> float:
        return self.row.step_ms

    def key(self, dtype: str) -> str:
        return f"{self.zoo}|{self.row.img_size}|{self.row.batch_size}|{dtype}"


@dataclass(frozen=True)
class Skipped:
    line: int
    model: str
    img_size: int
    reason: str


@functools.cache
def _zoo_by_timm() -> dict[str, tuple[str, str]]:
    """timm model name -> (zoo model, family), for zoo models that are timm's registered model unchanged."""
    from metaformer_lab.zoo.models import catalog

    out: dict[str, tuple[str, str]] = {}
    for name, model in sorted(catalog().items()):
        if model.in_timm_registry and not model.entry.kwargs:
            out.setdefault(model.timm_name, (name, model.family))
    return out


@functools.cache
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=512)
def _graph(zoo: str, img_size: int) -> Any:
    from metaformer_lab.graph.lower import lower
    from metaformer_lab.spec.load import read_spec, with_input_size

    return lower(with_input_size(read_spec(zoo), img_size))


def map_rows(rows: Sequence[TableRow], gpu: str, *, path: str = "table") -> tuple[list[Point], list[Skipped]]:
    """The rows the zoo expresses as points on ``gpu``, and the others with the reason each was skipped.

    Raises:
        LatencyError: a row names a model timm does not know (a damaged table, not one to skip).
    """
    known = _timm_models()
    zoo = _zoo_by_timm()
    points: list[Point] = []
    skipped: list[Skipped] = []
    for row in rows:
        if row.model not in known:
            close = difflib.get_close_matches(row.model, list(zoo) or sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise LatencyError.single(path, f"line {row.line}: '{row.model}' is not a timm model{hint}")
        if row.model not in zoo:
            skipped.append(Skipped(row.line, row.model, row.img_size, "no zoo model"))
            continue
        name, family = zoo[row.model]
        try:
            _graph(name, row.img_size)
        except MetaformerLabError as err:
            skipped.append(Skipped(row.line, row.model, row.img_size, f"{name} at {row.img_size} px: "
                                                                      f"{err.issues[0]}"))
            continue
        points.append(Point(row, name, family, gpu))
    return points, skipped


# --- kernel records per point -----------------------------------------------------------------------

Kernels = tuple[tuple[str, int, int, int], ...]
"""A network's kernels, grouped: (class, flops, bytes moved, launches)."""


def network_kernels(zoo: str, img_size: int, batch_size: int, dtype: str, cache: KernelCache | None = None,
                    amp: bool = True) -> Kernels:
    """The grouped kernel records of zoo model ``zoo`` at ``img_size`` and ``batch_size`` (meta device), run as
    under autocast at ``dtype`` (timm's tables: AMP) unless ``amp`` is False."""
    graph = _graph(zoo, img_size)
    counts: Counter[tuple[str, int, int]] = Counter()
    for records in graph_records(graph, batch_size=batch_size, dtype=dtype, amp=amp, cache=cache).values():
        for k in records or ():
            counts[(k.op_class, k.flops, k.bytes_moved)] += 1
    return tuple((c, f, b, n) for (c, f, b), n in sorted(counts.items()))


def _estimator_digest() -> str:
    """Changes whenever the estimator's code, the ops, the lowering, the zoo, torch or timm do: a records cache
    keyed by it never goes stale."""
    import timm
    import torch

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode() + timm.__version__.encode())
    for root, pattern in ((package, "latency/gpu.py"), (package, "ops/*.py"), (package, "graph/*.py"),
                          (package, "spec/*.py"), (package, "zoo/**/*.yaml"), (package, "blocks/*.yaml"),
                          (package.parent, "blocks/*.yaml")):
        for path in sorted(root.glob(pattern)):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class RecordStore:
    """Grouped kernel records by point key, optionally persisted to a JSON file (the benchmark's cache)."""

    path: Path | None = None
    records: dict[str, Kernels] = field(default_factory=dict)
    cache: KernelCache = field(default_factory=KernelCache)
    dirty: bool = False

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> RecordStore:
        store = cls(Path(path) if path is not None else None)
        if store.path is not None and store.path.is_file():
            try:
                raw = json.loads(store.path.read_text())
            except (OSError, json.JSONDecodeError):
                raw = {}
            if raw.get("digest") == _estimator_digest():
                store.records = {k: tuple(tuple(r) for r in v) for k, v in raw.get("records", {}).items()}
        return store

    def get(self, point: Point, dtype: str) -> Kernels:
        key = point.key(dtype)
        if key not in self.records:
            self.records[key] = network_kernels(point.zoo, point.row.img_size, point.row.batch_size, dtype,
                                                self.cache)
            self.dirty = True
        return self.records[key]

    def save(self) -> None:
        if self.path is not None and self.dirty:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"digest": _estimator_digest(), "records": self.records}))
            tmp.replace(self.path)
            self.dirty = False


# --- the fit -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    kind: str  # compute | memory | launch
    op_class: str | None


@dataclass
class _Design:
    """Every point's kernels as flat arrays: seconds at the full compute rate (the datasheet's) and at the full
    bandwidth of the point's GPU, the log of the GPU's power per TFLOPS for tensor-core kernels (0 for the others
    and where the power is not known), class index, point index, launches, and each point's GPU's own per-kernel
    overhead (s; what a fit that does not fit the overhead uses)."""

    classes: list[str]
    tc: np.ndarray
    tm: np.ndarray
    power: np.ndarray
    cls: np.ndarray
    row: np.ndarray
    count: np.ndarray
    launches: np.ndarray
    measured_s: np.ndarray
    launch_s: np.ndarray

    @classmethod
    def of(cls, kernels: Sequence[Kernels], gpus: Sequence[GpuSpec], dtype: str, measured_ms: Sequence[float],
           launch_us: float | None = None) -> _Design:
        """``launch_us``: every point's per-kernel overhead when not fitted (None: its GPU's datasheet figure)."""
        classes = sorted({k[0] for ks in kernels for k in ks})
        index = {c: i for i, c in enumerate(classes)}
        tc, tm, lp, ci, ri, cnt = [], [], [], [], [], []
        launches = np.zeros(len(kernels))
        for r, (ks, gpu) in enumerate(zip(kernels, gpus, strict=True)):
            log_power = math.log(gpu.watts_per_tflops) if gpu.watts_per_tflops is not None else 0.0
            for c, flops, moved, n in ks:
                peak, _ = gpu.peak_tflops(c, dtype)
                tc.append(flops / (peak * 1e12))
                tm.append(moved / (gpu.bandwidth_gbs * 1e9))
                lp.append(log_power if c in TENSOR_CORE_CLASSES else 0.0)
                ci.append(index[c])
                ri.append(r)
                cnt.append(n)
                launches[r] += n
        overhead_s = np.array([(g.launch_us if launch_us is None else launch_us) * 1e-6 for g in gpus])
        return cls(classes, np.array(tc), np.array(tm), np.array(lp), np.array(ci, dtype=np.int64),
                   np.array(ri, dtype=np.int64), np.array(cnt, dtype=np.float64), launches,
                   np.array(measured_ms, dtype=np.float64) * 1e-3, overhead_s)

    def params(self, power: bool = False, launch: bool = True) -> list[_Param]:
        """compute factors (classes with FLOPs), memory factors, with ``power`` the power exponent where the
        tensor-core kernels' GPUs differ in power per TFLOPS, with ``launch`` the per-kernel overhead."""
        has_flops = {self.classes[i] for i in np.unique(self.cls[self.tc > 0])}
        out = [_Param("compute", c) for c in self.classes if c in has_flops]
        out += [_Param("memory", c) for c in self.classes]
        tensor = self.power[(self.tc > 0) & (self.power != 0)]
        if power and tensor.size and np.ptp(tensor) > 1e-9:
            out.append(_Param("power", None))
        return [*out, *([_Param("launch", None)] if launch else [])]


def _values(params: Sequence[_Param], x: np.ndarray,
            classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, float | None, float]:
    """Per class compute and memory factors, the launch overhead (s; None: not a parameter) and the power exponent
    at ``x`` (the logarithms of the factors and of the overhead in us; the exponent itself)."""
    ec = np.full(len(classes), np.inf)
    em = np.ones(len(classes))
    launch_s: float | None = None
    power = 0.0
    for p, raw in zip(params, x, strict=True):
        v = math.exp(raw)
        if p.kind == "compute":
            ec[classes.index(p.op_class)] = v
        elif p.kind == "memory":
            em[classes.index(p.op_class)] = v
        elif p.kind == "power":
            power = float(raw)
        else:
            launch_s = v * 1e-6
    return ec, em, launch_s, power


def _predict_s(design: _Design, params: Sequence[_Param], x: np.ndarray, with_jacobian: bool = False,
               sharpness: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each network's time (s) at parameters ``x``, and d time / d x (the kernel time as :func:`.roofline_s`)."""
    ec, em, launch_s, power = _values(params, x, design.classes)
    a = design.tc * np.exp(-power * design.power) / ec[design.cls]
    b = design.tm / em[design.cls]
    top = np.maximum(a, b)
    if sharpness is None:
        share_a = (a > b).astype(np.float64)  # d kernel / d log(compute time), over the kernel time
        kernel = top
    else:
        safe = np.where(top > 0, top, 1.0)
        u, v = (a / safe) ** sharpness, (b / safe) ** sharpness
        kernel = top * (u + v) ** (1 / sharpness)
        share_a = np.where(top > 0, u / np.where(u + v > 0, u + v, 1.0), 0.0)
    t = kernel * design.count
    rows = len(design.measured_s)
    per_kernel = design.launch_s if launch_s is None else launch_s
    pred = np.bincount(design.row, t, minlength=rows) + design.launches * per_kernel
    if not with_jacobian:
        return pred, None
    col_of = {(p.kind, p.op_class): j for j, p in enumerate(params)}
    compute_col = np.array([col_of.get(("compute", c), -1) for c in design.classes])
    memory_col = np.array([col_of[("memory", c)] for c in design.classes])
    n = len(params)
    jac = np.zeros(rows * n)
    has_compute = compute_col[design.cls] >= 0
    jac += np.bincount(design.row[has_compute] * n + compute_col[design.cls][has_compute],
                       -(t * share_a)[has_compute], minlength=rows * n)
    jac += np.bincount(design.row * n + memory_col[design.cls], -t * (1 - share_a), minlength=rows * n)
    if ("power", None) in col_of:
        jac += np.bincount(design.row * n + col_of[("power", None)], -t * share_a * design.power,
                           minlength=rows * n)
    jac = jac.reshape(rows, n)
    if launch_s is not None:
        jac[:, col_of[("launch", None)]] = design.launches * launch_s
    return pred, jac


def _initial(params: Sequence[_Param], prior: Efficiency, launch_us: float) -> np.ndarray:
    """The prior as a parameter vector (logarithms of the factors and of the overhead in us; the exponent)."""
    out = []
    for p in params:
        if p.kind == "compute":
            out.append(math.log(prior.compute_of(p.op_class or "")))
        elif p.kind == "memory":
            out.append(math.log(prior.memory_of(p.op_class or "")))
        elif p.kind == "power":
            out.append(prior.power_exponent or 0.0)
        else:
            out.append(math.log(launch_us))
    return np.array(out, dtype=np.float64)


ROW_NOISE = 0.01
"""Relative noise assumed per measured row when saying how well the data determine each factor."""


@dataclass(frozen=True)
class FitResult:
    """Fitted factors and what bound them: per parameter, the share of the fitted time it governs and how well
    the data alone determine it (relative standard deviation with :data:`ROW_NOISE` per row, from the
    Gauss-Newton information at the fit; large where factors trade off against each other)."""

    efficiency: Efficiency
    shares: dict[str, float]
    predicted_ms: list[float]
    spread: dict[str, float] = field(default_factory=dict)


def fit_points(kernels: Sequence[Kernels], gpus: Sequence[GpuSpec], measured_ms: Sequence[float], *,
               dtype: str = "float16", prior: Efficiency | None = None, prior_weight: float | None = None,
               sharpness: float | None = SHARPNESS, power: bool = False, launch: bool = True) -> FitResult:
    """Fit per-class efficiency factors and the per-kernel overhead to whole networks' measured times.

    Args:
        kernels: each network's grouped kernel records (:func:`network_kernels`).
        gpus: the GPU each was measured on (one GPU: a per-GPU fit; several: pooled factors).
        measured_ms: the measured forward times, ms.
        dtype: the dtype they ran at.
        prior: the factors a parameter is pulled towards (None: the defaults).
        prior_weight: the pull, per log unit (None: :data:`PRIOR_WEIGHT`).
        sharpness: the kernel time's roofline (:func:`.roofline_s`), kept in the fitted factors.
        power: also fit :attr:`.Efficiency.power_exponent` (the GPUs must differ in power per TFLOPS; pulled
            towards the prior's, 0 by default).
        launch: fit the per-kernel overhead; False: keep the prior's (None: each GPU's datasheet figure).
    """
    from scipy.optimize import least_squares

    if not kernels or len(kernels) != len(measured_ms) or len(gpus) != len(kernels):
        raise LatencyError.single("measured_ms", f"{len(measured_ms)} measurements for {len(kernels)} networks "
                                                 f"on {len(gpus)} GPUs; give one of each per network")
    prior = prior or Efficiency()
    prior_weight = PRIOR_WEIGHT if prior_weight is None else prior_weight
    gpu0 = gpus[0]
    design = _Design.of(kernels, gpus, dtype, measured_ms, prior.launch_us)
    params = design.params(power, launch)
    launch0 = gpu0.launch_us if prior.launch_us is None else prior.launch_us
    x0 = _initial(params, prior, launch0)
    bounds = {"launch": tuple(math.log(b) for b in _LAUNCH_BOUNDS_US), "power": _POWER_BOUNDS}
    efficiency_bounds = tuple(math.log(b) for b in _EFF_BOUNDS)
    lower, upper = (np.array([bounds.get(p.kind, efficiency_bounds)[i] for p in params]) for i in (0, 1))
    log_measured = np.log(design.measured_s)
    scale = float(np.exp(np.median(np.log(_predict_s(design, params, x0, sharpness=sharpness)[0]) - log_measured)))
    start = np.clip(np.where([p.kind in ("compute", "memory") for p in params], x0 + math.log(scale), x0),
                    lower + 1e-9, upper - 1e-9)

    def residuals(x: np.ndarray) -> np.ndarray:
        pred, _ = _predict_s(design, params, x, sharpness=sharpness)
        return np.concatenate([np.log(pred) - log_measured, prior_weight * (x - x0)])

    def jacobian(x: np.ndarray) -> np.ndarray:
        pred, jac = _predict_s(design, params, x, with_jacobian=True, sharpness=sharpness)
        assert jac is not None
        return np.vstack([jac / pred[:, None], prior_weight * np.eye(len(params))])

    best = None
    for x_start in (start, np.clip(x0, lower + 1e-9, upper - 1e-9)):
        fit = least_squares(residuals, x_start, jac=jacobian, bounds=(lower, upper), method="trf", x_scale=1.0,
                            ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=2000)
        if best is None or fit.cost < best.cost:
            best = fit
    assert best is not None
    pred, jac = _predict_s(design, params, best.x, with_jacobian=True, sharpness=sharpness)
    assert jac is not None
    governed = -jac.sum(0) / pred.sum()  # each factor's share of the time (the overhead's: minus it)
    data_jac = jac / pred[:, None]
    info = data_jac.T @ data_jac
    spread_of = np.sqrt(np.clip(np.diag(np.linalg.pinv(info, rcond=1e-12)), 0, None)) * ROW_NOISE
    compute, memory = dict(prior.compute), dict(prior.memory)
    shares: dict[str, float] = {}
    spread: dict[str, float] = {}
    launch_us = launch0 if launch else prior.launch_us
    power_exponent = None
    for p, v, j in zip(params, np.exp(best.x), range(len(params)), strict=True):
        key = p.kind if p.op_class is None else f"{p.kind}.{p.op_class}"
        spread[key] = round(min(float(spread_of[j]), 99.0), 6)
        if p.kind == "power":  # an exponent, not a share of the time
            power_exponent = float(best.x[j])
            continue
        if p.kind == "compute":
            compute[p.op_class or ""] = float(v)
        elif p.kind == "memory":
            memory[p.op_class or ""] = float(v)
        else:
            launch_us = float(v)
        share = -float(governed[j]) if p.kind == "launch" else float(governed[j])
        shares[key] = round(share, 6)
    eff = replace(prior, compute=compute, memory=memory, launch_us=launch_us, calibrated=True, dtype=dtype,
                  sharpness=sharpness, power_exponent=power_exponent)
    return FitResult(eff, shares, [float(v) * 1e3 for v in pred], spread)


def predict_points(kernels: Sequence[Kernels], gpus: Sequence[GpuSpec], efficiency: Efficiency,
                   dtype: str) -> list[float]:
    """The estimator's time (ms) of each network on its GPU with ``efficiency`` (same as :func:`.estimate_gpu`)."""
    out = []
    for ks, gpu in zip(kernels, gpus, strict=True):
        launch_s = (gpu.launch_us if efficiency.launch_us is None else efficiency.launch_us) * 1e-6
        total = 0.0
        for c, flops, moved, n in ks:
            peak = efficiency.peak_tflops(gpu, c, dtype)
            compute_s = flops / (peak * 1e12 * efficiency.compute_of(c)) if flops else 0.0
            memory_s = moved / (gpu.bandwidth_gbs * 1e9 * efficiency.memory_of(c))
            total += n * (roofline_s(compute_s, memory_s, efficiency.sharpness) + launch_s)
        out.append(total * 1e3)
    return out


# --- errors --------------------------------------------------------------------------------------------


def errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """MAPE, Spearman rank correlation, median and extreme ratios predicted / measured, within ±10 %."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(p) == 0:
        return {"n": 0}
    ratio = p / m
    out: dict[str, Any] = {"n": int(len(p)), "mape": float(np.mean(np.abs(ratio - 1))),
                           "median_ratio": float(np.median(ratio)), "max_error": float(np.max(np.abs(ratio - 1))),
                           "within_10": float(np.mean(np.abs(ratio - 1) <= 0.10))}
    if len(p) >= 3:
        from scipy.stats import spearmanr

        out["spearman"] = float(spearmanr(p, m).statistic)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def by_family(points: Sequence[Point], predicted: Sequence[float]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(points):
        groups[p.family].append(i)
    return {f: errors([predicted[i] for i in idx], [points[i].measured_ms for i in idx])
            for f, idx in sorted(groups.items())}


def leave_one_family_out(points: Sequence[Point], kernels: Sequence[Kernels], dtype: str,
                         prior: Efficiency | None = None, prior_weight: float | None = None) -> list[float]:
    """Each point predicted by factors fitted on the other families' points (same GPUs)."""
    gpus = [gpu_spec(p.gpu) for p in points]
    predicted = [math.nan] * len(points)
    for family in sorted({p.family for p in points}):
        train = [i for i, p in enumerate(points) if p.family != family]
        test = [i for i, p in enumerate(points) if p.family == family]
        if not train:
            continue
        fit = fit_points([kernels[i] for i in train], [gpus[i] for i in train],
                         [points[i].measured_ms for i in train], dtype=dtype, prior=prior,
                         prior_weight=prior_weight)
        for i, ms in zip(test, predict_points([kernels[i] for i in test], [gpus[i] for i in test], fit.efficiency,
                                              dtype), strict=True):
            predicted[i] = ms
    return predicted


# --- profiles --------------------------------------------------------------------------------------------


@dataclass
class GpuProfile:
    """Efficiency factors fitted on published measurements, with their provenance and measured error.

    ``kind`` is ``table`` (one GPU's table: its estimates are calibrated) or ``pooled`` (several GPUs'
    tables: factors for any GPU's datasheet).
    """

    name: str
    kind: str
    dtype: str
    efficiency: Efficiency
    gpu: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    leave_one_gpu_out: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    made_with: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def held_out_error(self) -> tuple[float, str] | None:
        """The mean absolute error of these factors on networks (or GPUs) the fit did not see, and what was
        held out: leave-one-family-out for one GPU's table, leave-one-GPU-out for pooled factors."""
        if self.kind == "table":
            mape, what = (self.fit.get("leave_one_family_out") or {}).get("mape"), "leave-one-family-out"
        else:
            mape, what = (self.leave_one_gpu_out.get("overall") or {}).get("mape"), "leave-one-GPU-out"
        return None if mape is None else (float(mape), f"{what} error of profile '{self.name}'")

    @property
    def batch_range(self) -> tuple[int, int] | None:
        return self.efficiency.batch_range

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "kind": self.kind, "gpu": self.gpu,
                "gpu_name": GPUS[self.gpu].full_name if self.gpu in GPUS else None,
                "datasheet": GPUS[self.gpu].to_json() if self.gpu in GPUS else None, "dtype": self.dtype,
                "efficiency": self.efficiency.to_json(), "sources": self.sources, "created": self.created,
                "made_with": self.made_with, "fit": self.fit, "leave_one_gpu_out": self.leave_one_gpu_out,
                "rows": self.rows, "skipped": self.skipped}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically."""
        self.path = write_document(path, self.to_json())

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "gpu": self.gpu, "dtype": self.dtype,
                "path": str(self.path) if self.path else None, "label": self.efficiency.label,
                "fitted_on": list(self.efficiency.fitted_on), "created": self.created,
                "batch_range": list(self.batch_range) if self.batch_range else None,
                "sources": [{k: s.get(k) for k in ("table", "torch", "cuda", "date")} for s in self.sources],
                "rows": len(self.rows), "in_sample": self.fit.get("in_sample"),
                "leave_one_family_out": self.fit.get("leave_one_family_out"),
                "leave_one_gpu_out": self.leave_one_gpu_out.get("overall", self.leave_one_gpu_out or None)}


def load_gpu_profile(path: str | os.PathLike[str]) -> GpuProfile:
    """Read a GPU profile; raises LatencyError for a file that is not one."""
    where = os.fspath(path)
    raw = read_document(path, FORMAT, VERSION, "GPU profile")
    try:
        return GpuProfile(name=str(raw["name"]), kind=str(raw["kind"]), dtype=str(raw["dtype"]),
                          efficiency=Efficiency.from_json(raw["efficiency"]), gpu=raw.get("gpu"),
                          sources=list(raw.get("sources") or []), rows=list(raw.get("rows") or []),
                          skipped=dict(raw.get("skipped") or {}), fit=dict(raw.get("fit") or {}),
                          leave_one_gpu_out=dict(raw.get("leave_one_gpu_out") or {}),
                          created=str(raw.get("created", "")), made_with=dict(raw.get("made_with") or {}),
                          path=Path(path))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LatencyError.single(where, f"is a damaged GPU profile ({err!r})") from None
    except LatencyError as err:  # a factor out of range: say in which file
        raise LatencyError([Issue(f"{where}: {i.path}", i.message) for i in err.issues]) from None


@functools.cache
def shipped_gpu_profiles() -> tuple[GpuProfile, ...]:
    return tuple(load_gpu_profile(p) for p in sorted(GPU_PROFILES_DIR.glob("*.json")))


def resolve_gpu_profile(name_or_path: str | os.PathLike[str]) -> GpuProfile:
    """A GPU profile by path or by the name of a shipped one."""
    text = os.fspath(name_or_path)
    shipped = {p.name: p for p in shipped_gpu_profiles()}
    if text in shipped:
        return shipped[text]
    if text.endswith(".json") or "/" in text or Path(text).exists():
        return load_gpu_profile(text)
    close = difflib.get_close_matches(text, list(shipped), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; shipped: {', '.join(shipped) or 'none'}"
    raise LatencyError.single(text, f"no such GPU profile file, and no shipped GPU profile of that name{hint}")


def gpu_profile_for(gpu: str | GpuSpec, dtype: str,
                    profiles: Sequence[GpuProfile] | None = None) -> GpuProfile | None:
    """The profile an estimate for ``gpu`` at ``dtype`` uses: the GPU's own fitted one, else the one pooled
    over the calibrated GPUs, else None (the uncalibrated defaults)."""
    name = gpu_spec(gpu).name
    found = shipped_gpu_profiles() if profiles is None else profiles
    own = [p for p in found if p.kind == "table" and p.gpu == name and p.dtype == dtype]
    pooled = [p for p in found if p.kind == "pooled" and p.dtype == dtype]
    return (own or pooled or [None])[0]


def gpu_efficiency(gpu: str | GpuSpec, dtype: str, profiles: Sequence[GpuProfile] | None = None) -> Efficiency:
    """The factors an estimate for ``gpu`` at ``dtype`` uses (:func:`gpu_profile_for`'s, or the defaults)."""
    profile = gpu_profile_for(gpu, dtype, profiles)
    return Efficiency() if profile is None else profile.efficiency


def _made_with() -> dict[str, Any]:
    import torch

    from metaformer_lab import __version__

    return {"torch": torch.__version__, "metaformer_lab": __version__}


def _skipped_json(skipped: Sequence[Skipped]) -> dict[str, Any]:
    no_zoo = sorted({s.model for s in skipped if s.reason == "no zoo model"})
    other = [{"line": s.line, "model": s.model, "img_size": s.img_size, "reason": s.reason}
             for s in skipped if s.reason != "no zoo model"]
    return {"count": len(skipped), "no_zoo_model": no_zoo, "not_expressible": other}


def _rows_json(points: Sequence[Point], fitted: Sequence[float], lofo: Sequence[float]) -> list[dict[str, Any]]:
    return [{"line": p.row.line, "model": p.row.model, "zoo": p.zoo, "family": p.family, "gpu": p.gpu,
             "img_size": p.row.img_size, "batch_size": p.row.batch_size, "measured_ms": p.measured_ms,
             "fitted_ms": round(f, 4), "leave_one_family_out_ms": round(lo, 4)}
            for p, f, lo in zip(points, fitted, lofo, strict=True)]


def _batch_range(points: Sequence[Point]) -> tuple[int, int]:
    batches = [p.row.batch_size for p in points]
    return min(batches), max(batches)


def table_label(gpu: str, source: TableSource, dtype: str, batch_range: tuple[int, int]) -> str:
    lo, hi = batch_range
    batches = f"batch {lo}" if lo == hi else f"batch {lo}-{hi}"
    return f"calibrated on {gpu} from {source.table} ({dtype}, {batches})"


@dataclass(frozen=True)
class TableFit:
    profile: GpuProfile
    points: list[Point]
    skipped: list[Skipped]


def calibrate_from_table(path: str | os.PathLike[str], gpu: str, *, dtype: str = "float16", name: str | None = None,
                         source: str | None = None, date: str | None = None, store: RecordStore | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         prior_weight: float | None = None) -> TableFit:
    """Fit ``gpu``'s efficiency factors and launch overhead on a timm benchmark table (module docstring);
    ``prior_weight`` as in :func:`fit_points`.

    Raises:
        LatencyError: an unknown GPU or dtype, a damaged table (:func:`read_table`, :func:`map_rows`), or a
            table none of whose rows the zoo expresses. Nothing is written.
    """
    spec = gpu_spec(gpu)
    _checked_dtype(dtype)
    where = os.fspath(path)
    rows = read_table(path)
    points, skipped = map_rows(rows, spec.name, path=where)
    if not points:
        raise LatencyError.single(where, f"none of its {len(rows)} rows names a zoo model at an input size the zoo "
                                         "expresses: nothing to fit")
    store = store or RecordStore()
    kernels = []
    for i, p in enumerate(points):
        kernels.append(store.get(p, dtype))
        if progress is not None:
            progress(i + 1, len(points))
    store.save()
    measured = [p.measured_ms for p in points]
    weight = PRIOR_WEIGHT if prior_weight is None else prior_weight
    fit = fit_points(kernels, [spec] * len(points), measured, dtype=dtype, prior_weight=weight)
    lofo = leave_one_family_out(points, kernels, dtype, prior_weight=weight)
    src = table_source(path, source=source, date=date)
    batch_range = _batch_range(points)
    eff = replace(fit.efficiency, gpu=spec.name, dtype=dtype, fitted_on=(spec.name,), batch_range=batch_range, amp=True,
                  label=table_label(spec.name, src, dtype, batch_range),
                  source=f"fitted on {len(points)} rows of {src.table} ({spec.full_name}, {dtype})")
    profile = GpuProfile(
        name=name or f"gpu-{spec.name}-{dtype}", kind="table", dtype=dtype, efficiency=eff, gpu=spec.name,
        sources=[src.to_json()], rows=_rows_json(points, fit.predicted_ms, lofo), skipped=_skipped_json(skipped),
        fit={"in_sample": errors(fit.predicted_ms, measured), "leave_one_family_out": errors(lofo, measured),
             "per_family": by_family(points, fit.predicted_ms),
             "per_family_leave_one_family_out": by_family(points, lofo), "governed_share": fit.shares,
             "spread_at_1pct_noise": fit.spread, "prior_weight": weight},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), made_with=_made_with())
    return TableFit(profile, points, skipped)


# --- several GPUs ------------------------------------------------------------------------------------------


def pooled_fit(fits: Sequence[TableFit], kernels: Mapping[str, Sequence[Kernels]], dtype: str) -> Efficiency:
    """Factors fitted on every point of several GPUs' tables at once, each against its own datasheet, with the
    power exponent (:attr:`.Efficiency.power_exponent`). The per-kernel overhead is not fitted: at batch 256 and
    more it is 1-2 % of the time and moves between 2 and 20 us from one fit to the next at the same error, while an
    estimate at batch 1 is mostly overhead; each GPU keeps its datasheet's (:data:`.DEFAULT_LAUNCH_US`, eager
    PyTorch's host time per kernel)."""
    points = [p for f in fits for p in f.points]
    ks = [k for f in fits for k in kernels[f.profile.name]]
    fit = fit_points(ks, [gpu_spec(p.gpu) for p in points], [p.measured_ms for p in points], dtype=dtype,
                     power=True, launch=False)
    gpus = tuple(f.profile.gpu or "" for f in fits)
    power = fit.efficiency.power_exponent
    scaled = f"; tensor-core peaks x (board W per TFLOPS)^{power:.2f}" if power else ""
    scaled += "; per-kernel overhead: each GPU's datasheet figure (tables at batch 256 and more do not fix it)"
    return replace(fit.efficiency, gpu=None, calibrated=False, dtype=dtype, fitted_on=gpus, amp=True,
                   batch_range=_batch_range(points), label=pooled_label(gpus),
                   source=f"pooled fit on {len(points)} rows of {len(fits)} GPUs' tables ({', '.join(gpus)}){scaled}")


def mean_of_fits(fits: Sequence[TableFit], dtype: str) -> Efficiency:
    """The geometric mean of per-GPU factors (the alternative to a pooled fit)."""
    effs = [f.profile.efficiency for f in fits]
    classes_c = sorted({c for e in effs for c in e.compute} | set(DEFAULT_COMPUTE_EFFICIENCY))
    classes_m = sorted({c for e in effs for c in e.memory} | set(DEFAULT_MEMORY_EFFICIENCY))
    gm = lambda values: float(np.exp(np.mean(np.log(values))))  # noqa: E731
    gpus = tuple(f.profile.gpu or "" for f in fits)
    lows, highs = zip(*(e.batch_range or (1, 1) for e in effs), strict=True)
    return Efficiency(compute={c: gm([e.compute_of(c) for e in effs]) for c in classes_c},
                      memory={c: gm([e.memory_of(c) for e in effs]) for c in classes_m},
                      launch_us=gm([e.launch_us or 1e-3 for e in effs]), calibrated=False, gpu=None, dtype=dtype,
                      fitted_on=gpus, label=pooled_label(gpus), batch_range=(min(lows), max(highs)), amp=True,
                      sharpness=effs[0].sharpness,
                      source=f"geometric mean of the factors fitted on {', '.join(gpus)}")


STRATEGIES: Mapping[str, Callable[[Sequence[TableFit], Mapping[str, Sequence[Kernels]], str], Efficiency]] = {
    "pooled": pooled_fit,
    "mean": lambda fits, kernels, dtype: mean_of_fits(fits, dtype),
}
"""How factors for a GPU without a table are made from the calibrated GPUs' fits."""


def leave_one_gpu_out(fits: Sequence[TableFit], kernels: Mapping[str, Sequence[Kernels]], dtype: str,
                      strategy: str = "pooled") -> dict[str, list[float]]:
    """Per GPU: its points predicted from its datasheet with factors made (``strategy``) from the others."""
    out: dict[str, list[float]] = {}
    for held in fits:
        others = [f for f in fits if f is not held]
        eff = STRATEGIES[strategy](others, kernels, dtype)
        ks = kernels[held.profile.name]
        out[held.profile.gpu or ""] = predict_points(ks, [gpu_spec(p.gpu) for p in held.points], eff, dtype)
    return out


def pooled_profile(fits: Sequence[TableFit], kernels: Mapping[str, Sequence[Kernels]], dtype: str) -> GpuProfile:
    """The profile for GPUs without a table: the strategy with the lower leave-one-GPU-out MAPE, both reported;
    each table profile gets its own leave-one-GPU-out figures too."""
    choice: dict[str, Any] = {}
    logo: dict[str, dict[str, list[float]]] = {}
    for strategy in STRATEGIES:
        logo[strategy] = leave_one_gpu_out(fits, kernels, dtype, strategy)
        pred = [v for f in fits for v in logo[strategy][f.profile.gpu or ""]]
        choice[strategy] = errors(pred, [p.measured_ms for f in fits for p in f.points])
    chosen = min(STRATEGIES, key=lambda s: choice[s]["mape"])
    eff = STRATEGIES[chosen](fits, kernels, dtype)
    points = [p for f in fits for p in f.points]
    ks = [k for f in fits for k in kernels[f.profile.name]]
    fitted = predict_points(ks, [gpu_spec(p.gpu) for p in points], eff, dtype)
    measured = [p.measured_ms for p in points]
    per_gpu = {}
    for f in fits:
        gpu = f.profile.gpu or ""
        per_gpu[gpu] = {**errors(logo[chosen][gpu], [p.measured_ms for p in f.points]),
                        "per_family": by_family(f.points, logo[chosen][gpu])}
        f.profile.leave_one_gpu_out = {"strategy": chosen, "fitted_on": [g.profile.gpu for g in fits if g is not f],
                                       "overall": {k: v for k, v in per_gpu[gpu].items() if k != "per_family"},
                                       "per_family": per_gpu[gpu]["per_family"]}
    all_logo = [v for f in fits for v in logo[chosen][f.profile.gpu or ""]]
    return GpuProfile(
        name=f"datasheet-{dtype}", kind="pooled", dtype=dtype, efficiency=eff, gpu=None,
        sources=[s for f in fits for s in f.profile.sources],
        rows=_rows_json(points, fitted, all_logo), skipped={},
        fit={"in_sample": errors(fitted, measured), "per_family": by_family(points, fitted),
             "strategies": choice, "chosen": chosen},
        leave_one_gpu_out={"strategy": chosen, "overall": errors(all_logo, measured), "per_gpu": per_gpu},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), made_with=_made_with())


__all__ = ["GPU_PROFILES_DIR", "SHIPPED_TABLES", "TABLES_DIR", "TABLE_COLUMNS", "GpuProfile", "Point", "RecordStore",
           "Skipped", "TableFit", "TableRow", "TableSource", "calibrate_from_table", "errors", "fit_points",
           "gpu_efficiency", "leave_one_family_out", "leave_one_gpu_out", "load_gpu_profile", "map_rows",
           "network_kernels", "pooled_fit", "pooled_profile", "predict_points", "read_table", "resolve_gpu_profile",
           "shipped_gpu_profiles", "table_source"]
