"""What a search is: space, dataset, evaluator, latency budget and target, trials, storage, seed.

The same settings come from the command line or from a study file (``studies/*.yaml``), which is this
model as YAML. Everything is checked before a study is opened, so bad input never touches storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from metaformer_lab.core.errors import Issue, LatencyError, StudyError
from metaformer_lab.latency.gpu import gpu_spec
from metaformer_lab.latency.target import LatencyTarget, parse_duration_ms
from metaformer_lab.spec.issues import issues_from, show
from metaformer_lab.spec.yaml_io import load_yaml_file

Objectives = Literal["score", "score,latency"]
EvaluatorName = Literal["zero-cost", "train"]


class RayConfig(BaseModel):
    """Where and how wide the Ray backend runs (``backend: ray``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="a Ray cluster to join (ray://HOST:10001 or HOST:6379, or auto); "
                                                  "default: a local Ray with this machine's CPUs")
    workers: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="trials at once (default: as many as the cluster's CPUs allow)")
    cpus_per_trial: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0, le=64)] = Field(
        0.0, description="GPUs per trial; with any, trials train on CUDA (latency still follows `device`)")
    max_failures: Annotated[int, Field(ge=0, le=100)] = Field(
        1, description="times a trial whose worker died is run again before it counts as failed")


class SearchConfig(BaseModel):
    """The settings of one search (a study file has these keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: str = Field("tiny", description="a space file or a shipped space name")
    dataset: str = Field("digits", description="digits | cifar10:PATH | imagefolder:PATH | synthetic[:N]")
    evaluator: EvaluatorName = "train"
    evaluator_options: dict[str, Any] = Field(
        default_factory=dict, description="e.g. {epochs: 5} for train, {proxy: grad_norm} for zero-cost")
    budget: str = Field("2ms", description="latency budget with a unit: us, ms or s")
    budget_margin: str | None = Field(
        None, description="auto, or a percentage (10%): a candidate whose latency is estimated or predicted counts "
                          "as within budget only when latency x (1 + margin) is; auto: the latency source's measured "
                          "error on networks it was not fitted on")
    device: str = Field("cpu", description="cpu, cuda, or a GPU name for an estimate (h100, t4, ...)")
    threads: Annotated[int, Field(ge=1, le=256)] = 1
    deploy: bool = Field(False, description="the budget is for the deploy form (inference-only structure folded "
                                            "away), what ships; CPU and CUDA only")
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 1
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="default: float32 on the CPU; on a GPU float16, or bfloat16 where its datasheet favours it")
    profile: str | None = Field("auto", description="a profile file or shipped name; auto: one that matches; "
                                                    "null: measure every candidate")
    host_check: bool = Field(True, description="rescale a CPU profile to this host from a few measured networks "
                                               "before the search (a few seconds)")
    trials: Annotated[int, Field(ge=1, le=100_000)] = 40
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    objectives: Objectives = "score"
    sampler: Literal["tpe", "nsga2", "random"] | None = Field(None, description="default: tpe for score, nsga2 "
                                                                                 "for score,latency")
    pruner: Literal["median", "hyperband", "none"] = "median"
    storage: str | None = Field(None, description="SQLAlchemy URL; default: sqlite in the run folder")
    study_name: str | None = None
    seed: int = 0
    out: str | None = Field(None, description="run folder; default: runs/<study name>")
    finalists: Annotated[int, Field(ge=1, le=64)] = 3
    finalist_passes: Annotated[int, Field(ge=1, le=10)] = Field(
        3, description="timing passes per finalist after the search; its latency is the fastest pass's median")
    train_threads: Annotated[int, Field(ge=1, le=256)] | None = Field(
        None, description="torch threads while training (default: all cores); latency keeps `threads`")
    heartbeat_s: Annotated[int, Field(ge=1, le=3600)] = 10
    max_memory: str | None = Field(None, description="memory the process may hold while it evaluates, e.g. 2GB "
                                                     "(what it holds already counts): a candidate whose estimated "
                                                     "step does not fit is micro-batched, else recorded "
                                                     "out_of_memory; default: a share of what is free")
    score_references: bool = Field(False, description="also score the space's references far over the budget, "
                                                      "after the searched trials (default: placed from their "
                                                      "latency alone)")
    backend: Literal["optuna", "ray"] = Field("optuna", description="optuna: trials in this process (several "
                                                                    "processes can share a study through --storage); "
                                                                    "ray: trials spread over a Ray cluster")
    ray: RayConfig = Field(default_factory=RayConfig)
    _dtype_defaulted: bool = PrivateAttr(False)
    _budget_ms: float | None = PrivateAttr(None)

    @property
    def dtype_note(self) -> str:
        """The dtype latency is for, and whether it was chosen for the user (said first in a search's output)."""
        if not self._dtype_defaulted:
            return f"latency at {self.dtype}"
        if self.device == "cpu":
            return f"latency at {self.dtype} (the CPU default; --dtype to change)"
        return (f"latency at {self.dtype}, the default for a GPU (what it is deployed at); --dtype float32 "
                "for full precision")

    @property
    def budget_ms(self) -> float:
        """The budget in milliseconds, parsed once (by :func:`check`, where a bad unit is reported)."""
        if self._budget_ms is None:
            self._budget_ms = parse_duration_ms(self.budget, path="budget")
        return self._budget_ms

    @property
    def margin_fraction(self) -> float | None:
        """A fixed ``budget_margin`` as a fraction (0.1 for 10%); None when unset or ``auto``."""
        if self.budget_margin is None or self.budget_margin == "auto":
            return None
        text = self.budget_margin.strip().removesuffix("%").strip()
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"'{self.budget_margin}' is neither auto nor a percentage such as 10%") from None
        if not 0 <= value < 100:
            raise ValueError(f"'{self.budget_margin}' is not a percentage from 0 to below 100")
        return value / 100

    @property
    def max_memory_bytes(self) -> int | None:
        """``max_memory`` in bytes (None: a share of what is free when an evaluation starts)."""
        from metaformer_lab.core.sizes import parse_bytes

        return None if self.max_memory is None else parse_bytes(self.max_memory)

    @property
    def gpu_name(self) -> str | None:
        """The GPU the latency is estimated for, when ``device`` names one (not cpu or cuda)."""
        return None if self.device == "cpu" or self.device.startswith("cuda") else self.device

    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        space = Path(self.space).stem if self.space.endswith((".yaml", ".yml")) else self.space
        return f"{space}-{self.budget.replace(' ', '')}-{self.device}" + ("-deploy" if self.deploy else "")

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def latency_target(self, input_size: tuple[int, int]) -> LatencyTarget:
        """What every candidate's latency is for (at the space's input size)."""
        return LatencyTarget(device=self.device, dtype=str(self.dtype or default_dtype(self)),
                             batch_size=self.batch_size, threads=self.threads, input_size=input_size,
                             deploy=self.deploy)

    def identity(self) -> dict[str, Any]:
        """The settings a resumed study must share with the one it continues."""
        return {"space": self.space, "budget_ms": self.budget_ms, "budget_margin": self.budget_margin,
                "device": self.device, "threads": self.threads,
                "batch_size": self.batch_size, "dtype": self.dtype, "objectives": self.objectives,
                "evaluator": self.evaluator, "dataset": self.dataset,
                **({"deploy": True} if self.deploy else {})}  # studies made before the option resume as they were


def check(config: SearchConfig) -> SearchConfig:
    """Cross-field checks with one issue per problem (budget unit, device name)."""
    issues: list[Issue] = []
    try:
        _ = config.budget_ms
    except LatencyError as err:
        issues += [Issue("--budget", i.message) for i in err.issues]
    if config.gpu_name is not None and config.deploy:
        issues.append(Issue("--deploy", f"GPU estimates are of the training form; measure the deploy form on the "
                                        f"GPU itself (--device cuda), not as '{config.device}'"))
    if config.gpu_name is not None:
        try:
            gpu_spec(config.gpu_name)
        except LatencyError as err:
            message = err.issues[0].message.replace("; known: ", "; one of cpu, cuda, ")
            issues.append(Issue("--device", message))
    try:
        _ = config.margin_fraction
    except ValueError as err:
        issues.append(Issue("--budget-margin", str(err)))
    if config.max_memory is not None:
        try:
            if config.max_memory_bytes <= 0:  # type: ignore[operator]
                issues.append(Issue("--max-memory", f"'{config.max_memory}' is not positive"))
        except ValueError as err:
            issues.append(Issue("--max-memory", str(err)))
    if config.backend != "ray":
        default = RayConfig()
        issues += [Issue(f"--{name.replace('_', '-')}", "needs --backend ray (the Optuna backend runs its trials "
                                                         "in this process)")
                   for name in RayConfig.model_fields if getattr(config.ray, name) != getattr(default, name)]
    if issues:
        raise StudyError(issues)
    if config.dtype is None:
        config = config.model_copy(update={"dtype": default_dtype(config)})
        config._dtype_defaulted = True
    return config


def default_dtype(config: SearchConfig) -> str:
    """The dtype a search measures at when none is given: float32 on the CPU; on a GPU the one people deploy
    at, float16, or bfloat16 where the GPU's datasheet gives it the higher tensor-core rate."""
    if config.device == "cpu":
        return "float32"
    if config.gpu_name is not None:
        return gpu_spec(config.gpu_name).default_dtype
    return "float16"


def make_config(**values: Any) -> SearchConfig:
    """A checked config from keyword values (None means: the default)."""
    data = {k: v for k, v in values.items() if v is not None}
    try:
        return check(SearchConfig.model_validate(data))
    except ValidationError as err:
        raise StudyError(issues_from(err, data, SearchConfig)) from None


def load_study_file(path: str | os.PathLike[str], **overrides: Any) -> SearchConfig:
    """A study file's settings, with command-line ``overrides`` (None: not given) on top."""
    from metaformer_lab.core.errors import SpecError

    try:
        data = load_yaml_file(Path(path))
    except SpecError as err:
        raise StudyError(err.issues) from None
    if not isinstance(data, dict):
        raise StudyError.single(os.fspath(path), f"the top level must be a mapping, got {show(data)}")
    data.pop("description", None)
    result = data.pop("result", None)  # a checked-in study may carry its result summary
    del result
    merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("ray", "evaluator_options"):  # one --workers or --epochs keeps the file's other settings there
        if isinstance(data.get(key), dict) and isinstance(overrides.get(key), dict):
            merged[key] = {**data[key], **overrides[key]}
    try:
        return check(SearchConfig.model_validate(merged))
    except ValidationError as err:
        raise StudyError([Issue(f"{path}:{i.path}" if i.path else str(path), i.message)
                          for i in issues_from(err, merged, SearchConfig)]) from None
