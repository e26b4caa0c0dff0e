"""Shared test helpers (imported as ``helpers``; tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from torch import Tensor, nn

from metaformer_lab.core.registry import Case, CompositeDef, OpDef, Registry
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import REGISTRIES
from metaformer_lab.zoo.fixed_point import perturb

M = TypeVar("M", bound=nn.Module)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TINY_CAFORMER = ROOT / "examples" / "tiny_caformer.yaml"
"""The example tests that need one fixed network use (a conv stem to 32 channels at 32x32, then CAFormer stages)."""

TINY_SPEC: dict[str, Any] = {
    "name": "tiny_test_net",
    "input": {"channels": 3, "size": 32},
    "num_classes": 10,
    "stem": {"type": "conv", "kernel": 4, "stride": 4, "padding": 0},
    "stages": [
        {"depth": 1, "dim": 32, "block": "convformer"},
        {"depth": 1, "dim": 64, "downsample": {"type": "conv", "kernel": 3, "stride": 2, "padding": 1},
         "block": "poolformer"},
    ],
    "head": {"type": "pool_norm_linear", "norm": {"type": "layernorm"}},
}
"""A small network (conv stem, ConvFormer then PoolFormer stage, LayerNorm head) the evaluator tests score."""

PROFILE_CPU = "AMD EPYC"
"""The CPU model the shipped CPU profiles were made on."""
OTHER_CPU = "Intel(R) Xeon(R) Processor"
"""Another CPU model that instances of this machine kind come with."""

OTHER_CPU_FAST = pytest.mark.parametrize("host_cpu", [
    pytest.param(PROFILE_CPU, id="profile-cpu", marks=pytest.mark.slow), pytest.param(OTHER_CPU, id="other-cpu")],
    indirect=True)
"""For the ``host_cpu`` tests that cost seconds: the plain run (the fast tier) takes the general case, a profile made on
another CPU model and fitted to this host; the full suite takes both."""


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


# --- ops against the timm modules they reproduce ----------------------------------------------------

def perturbed(module: M, seed: int = 0) -> M:
    """``module`` with N(0, .02) noise on every parameter and persistent float buffer (BatchNorm statistics
    too, running_var kept positive; ``metaformer_lab.zoo.fixed_point.perturb``), so nothing sits at its init; in eval
    mode."""
    perturb(module, seed=seed)
    module.eval()  # not chained: timm's LeViT-style attention overrides train() and returns None
    return module


def port(reference: nn.Module, ours: M, renames: Iterable[tuple[str, str]] = ()) -> M:
    """Perturb ``reference`` (a timm module) and load its state_dict into ``ours`` with ``strict=True``, each key
    rewritten by every ``(regex, replacement)`` of ``renames`` in order (``re.sub``); ``ours`` in eval mode.

    A tensor whose shape differs from ours only by size-1 axes (a 1x1 conv's weight into a linear layer,
    timm's (1, 1, C) affine into a (C,) one) is reshaped to ours; any other shape difference fails the load.
    """
    renames = list(renames)
    target = ours.state_dict()
    state = {}
    for key, value in perturbed(reference).state_dict().items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if key in target and _squeezed(value.shape) == _squeezed(target[key].shape):
            value = value.reshape(target[key].shape)
        state[key] = value
    ours.load_state_dict(state, strict=True)
    ours.eval()
    return ours


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def max_diff(a: Tensor, b: Tensor) -> float:
    """The largest absolute elementwise difference."""
    return (a - b).abs().max().item()


def op_spec(registry_or_role: Registry | str, tag: str, config: dict[str, Any]) -> Any:
    """``config`` validated by the config class of op ``tag`` (its ``type`` filled in); a role is a key of
    ``REGISTRIES``."""
    return _registry(registry_or_role).get(tag).spec.model_validate({"type": tag, **config})


def build_op(registry_or_role: Registry | str, tag: str, config: dict[str, Any], x: TensorType,
             *extra: int) -> nn.Module:
    """Op ``tag`` built for input type ``x`` (``extra``: a downsampler's out dim, a head's classes), after its
    shape rule has accepted the config; in eval mode."""
    opdef = _registry(registry_or_role).get(tag)
    assert isinstance(opdef, OpDef), f"{tag} is a composite op"
    spec = op_spec(registry_or_role, tag, config)
    module = opdef.make(spec, x, *extra)
    module.eval()
    return module


def _registry(registry_or_role: Registry | str) -> Registry:
    return REGISTRIES[registry_or_role] if isinstance(registry_or_role, str) else registry_or_role


__all__ = ["EXAMPLES", "ROOT", "TINY_CAFORMER", "CompositeDef", "OpDef", "all_cases", "build_op", "case_id",
           "max_diff", "op_spec", "port", "perturbed", "random_input", "zoo_structure"]


# --- zoo models by structure ------------------------------------------------------------------------

def zoo_structure(name: str) -> str:
    """Zoo model ``name``'s structure: its spec with every number left out and its stages as a set, so models
    that differ only in depth, width, head count or stage count (``poolformer_s12`` and ``poolformer_m48``,
    ``vit_tiny_patch16_224`` and ``deit_base_patch16_224``) run the same code and share a structure."""
    import json

    from metaformer_lab.spec.load import read_spec

    spec = read_spec(name).model_dump(mode="json", exclude={"name", "description"})
    stages = sorted({json.dumps(_numbers_left_out(stage), sort_keys=True) for stage in spec.pop("stages")})
    return json.dumps([_numbers_left_out(spec), stages], sort_keys=True)


def _numbers_left_out(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _numbers_left_out(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_left_out(v) for v in value]
    return "#" if isinstance(value, int | float) and not isinstance(value, bool) else value


# --- search processes ----------------------------------------------------------------------------

def cli_command(*args: str) -> list[str]:
    """``metaformer-lab ARGS`` as a subprocess command line (this interpreter)."""
    import sys

    return [sys.executable, "-m", "metaformer_lab.cli", *args]


def wait_for(predicate: Any, timeout: float, what: str = "the condition") -> None:
    """Poll ``predicate`` every 0.2 s until it holds; AssertionError after ``timeout`` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def study_trials(url: str, name: str) -> list[Any]:
    """The study's trials (FrozenTrial), or [] while the study or its database does not exist yet.

    Nothing is written: Optuna's storage is opened only once the search process has finished creating the
    schema (the alembic stamp is its last step), since opening it earlier stamps the schema too, and two
    processes creating one PostgreSQL table at once make one of them fail."""
    import optuna
    import sqlalchemy

    if url not in _POLLING:
        if not _schema_ready(url):
            return []
        _POLLING[url] = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        return optuna.load_study(study_name=name, storage=_POLLING[url]).get_trials()
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return []  # not there yet


_POLLING: dict[str, Any] = {}


def _schema_ready(url: str) -> bool:
    """Whether Optuna's schema is complete in the database at ``url`` (a read-only look)."""
    import sqlite3

    import sqlalchemy

    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            return False
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
                return bool(db.execute("SELECT count(*) FROM alembic_version").fetchone()[0])
        except sqlite3.Error:
            return False
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            if "alembic_version" not in sqlalchemy.inspect(connection).get_table_names():
                return False
            return bool(connection.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar())
    except sqlalchemy.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()
