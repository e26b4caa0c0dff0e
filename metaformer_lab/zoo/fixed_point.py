"""The fixed-point protocol (docs/architecture.md, "Compilation"), run against the installed timm.

A zoo model is a fixed point when (a) its parameter count equals timm's, (b) timm's state_dict,
with every parameter and floating buffer perturbed by N(0, 0.02) noise (so identity-like inits hide
nothing), converts through the family's key map and loads with ``strict=True``, (c) the logits
agree within the model's tolerance (1e-5 by default) in eval mode at batch 2, and (d) our state_dict
converts back to timm's exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.graph.cost import count_params
from metaformer_lab.graph.lower import lower
from metaformer_lab.spec.load import read_spec
from metaformer_lab.zoo.interop import convert_state_dict, to_timm_state_dict
from metaformer_lab.zoo.models import get


@dataclass(frozen=True)
class CheckResult:
    name: str
    timm_model: str
    params: int
    timm_params: int
    keys_loaded: int
    max_abs_diff: float
    tolerance: float
    round_trip: bool
    seconds: float

    @property
    def passed(self) -> bool:
        return (self.params == self.timm_params and self.max_abs_diff <= self.tolerance and self.round_trip)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


def perturb(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Add N(0, std) noise to every parameter and floating buffer of the state_dict (variances stay positive).

    Non-persistent buffers (Swin's shifted-window ``attn_mask``) are left alone: they are derived from the
    config, never travel with the weights, and both sides rebuild them; noise there would make the reference
    compute a function its own state_dict does not describe.
    """
    gen = torch.Generator().manual_seed(seed)
    persistent = set(module.state_dict())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point() or name not in persistent:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                noise.abs_()
            tensor.add_(noise, alpha=std)


def check(name: str, *, batch: int = 2, seed: int = 0) -> CheckResult:
    """Run the protocol for zoo model ``name``; raises CheckpointError when the keys do not map."""
    start = time.perf_counter()
    zoo = get(name)
    spec = read_spec(name)
    torch.manual_seed(seed)
    reference = zoo.reference().eval()
    perturb(reference, seed=seed)
    ours = compile_graph(lower(spec), init=False).eval()  # every value comes from the converted state_dict
    converted = convert_state_dict(name, reference.state_dict())
    ours.load_state_dict(converted, strict=True)
    h, w = spec.input.hw
    x = torch.randn(batch, spec.input.channels, h, w, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    back = to_timm_state_dict(name, ours.state_dict())
    theirs = reference.state_dict()
    round_trip = back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    return CheckResult(name=name, timm_model=zoo.timm_name, params=count_params(ours),
                       timm_params=count_params(reference), keys_loaded=len(converted), max_abs_diff=diff,
                       tolerance=zoo.entry.tolerance, round_trip=round_trip,
                       seconds=round(time.perf_counter() - start, 2))
