"""Every registered op x its example cases: config round trip, the shape rule agrees with the real
module, train and eval forward, every trainable parameter gets a gradient."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import all_cases, case_id
from torch import nn

from metaformer_lab.core.registry import Case, CompositeDef, Resolved
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops import REGISTRIES, TOKEN_MIXERS
from metaformer_lab.spec.arch import TokenMixerSpec

CASES = all_cases()


def _validate(opdef: Any, config: dict[str, Any]) -> Any:
    if isinstance(opdef, CompositeDef):
        from pydantic import TypeAdapter

        return TypeAdapter(TokenMixerSpec).validate_python({"type": opdef.tag, **config})
    return opdef.spec.model_validate({"type": opdef.tag, **config})


def _build(role: str, opdef: Any, spec: Any, case: Case) -> tuple[nn.Module, TensorType]:
    """The op's module and its declared output type (composites built from their branches)."""
    x = case.input
    if isinstance(opdef, CompositeDef):
        children, outs = [], []
        for child, (t, dim) in zip(opdef.branches(spec), opdef.branch_inputs(spec, x), strict=True):
            child_def = TOKEN_MIXERS.of_spec(child)
            children.append(child_def.make(child, t, dim))
            outs.append(child_def.resolve(child, t, dim).out_type)
        out = opdef.join(spec, x, outs)
        return opdef.build(spec, Resolved(x, out), children), out
    resolved = opdef.resolve(spec, x, case.out_dim)
    return opdef.build(spec, resolved), resolved.out_type


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_config_round_trip(item: tuple[str, Any, Case]) -> None:
    role, opdef, case = item
    spec = _validate(opdef, case.config)
    assert _validate(opdef, spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_shape_rule_matches_module(item: tuple[str, Any, Case]) -> None:
    role, opdef, case = item
    spec = _validate(opdef, case.config)
    module, declared = _build(role, opdef, spec, case)
    x = torch.randn(case.input.shape(2))
    for train in (True, False):
        module.train(train)
        with torch.no_grad():
            y = module(x)
        assert tuple(y.shape) == declared.shape(2), f"train={train}"
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_every_parameter_gets_a_gradient(item: tuple[str, Any, Case]) -> None:
    role, opdef, case = item
    spec = _validate(opdef, case.config)
    module, _ = _build(role, opdef, spec, case)
    module.train()
    x = torch.randn(case.input.shape(2), requires_grad=True)
    module(x).square().sum().backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_every_op_has_cases() -> None:
    missing = [f"{role}:{d.tag}" for role, reg in REGISTRIES.items() for d in reg if not d.cases]
    assert not missing
