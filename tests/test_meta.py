"""Meta builds with free initialisation (``core.meta.on_meta``): the same modules, without the value writes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metaformer_lab as ml
from metaformer_lab.core.meta import on_meta


class _Ops(TorchDispatchMode):
    """Names of the aten ops that reach dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _described(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype, bool]]:
    persistent = set(module.state_dict())
    return {name: (t.shape, t.dtype, name in persistent)
            for name, t in [*module.named_parameters(), *module.named_buffers()]}


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "convformer_s18", "vit_tiny_patch16_224"])
def test_a_meta_build_has_the_same_parameters_and_buffers_without_the_initialisers_writes(name: str) -> None:
    with torch.device("meta"):
        plain = timm.create_model(name)
    ops = _Ops()
    with on_meta(), ops:
        free = timm.create_model(name)
    assert _described(free) == _described(plain)  # non-persistent buffers (Swin's index tables) included
    assert all(t.is_meta for t in free.state_dict().values())
    written = {n.split(".")[0] for n in ops.names}
    assert not written & {"uniform_", "normal_", "erfinv_", "clamp_"}, \
        written
    # ours too: the compiler's meta copy has timm's keys and shapes
    with on_meta():
        ours = ml.create_model(name)
    assert ours.state_dict().keys() == ml.create_model(name).state_dict().keys()


def test_only_value_writes_on_meta_tensors_are_skipped() -> None:
    with on_meta():
        t = torch.empty(2, 3)
        assert t.uniform_() is t and t.is_meta
        t.unsqueeze_(0)  # changes the shape: still runs
        assert t.shape == (1, 2, 3)
        real = torch.zeros(3, device="cpu")
        real.add_(1)  # a real tensor's write runs
    assert real.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError):  # outside the block, a meta write runs PyTorch's kernel again
        torch.empty(2, 3, device="meta").add_(torch.empty(4, device="meta"))
