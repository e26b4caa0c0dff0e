"""Meta builds with free initialisation (``core.meta.on_meta``): the same modules, without the value writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metaformer_lab as ml
from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.core.meta import on_meta, uninitialised


class _Ops(TorchDispatchMode):
    """Names of the aten ops that reach dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _Written(TorchDispatchMode):
    """How many values random initialisers write."""

    def __init__(self) -> None:
        super().__init__()
        self.values = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.__name__.split(".")[0] in ("uniform_", "normal_"):
            self.values += args[0].numel()
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


def test_an_uninitialised_build_skips_only_the_initialisers_and_loads_to_the_same_network() -> None:
    """``compile_graph(init=False)``: the torch.nn.init initialisers PyTorch's modules call on their parameters
    write nothing, every other op runs (a window's relative position index, a non-persistent buffer, is computed);
    loading a state_dict makes it the network."""
    with uninitialised() as skipped:
        w = torch.nn.Parameter(torch.zeros(3))
        assert torch.nn.init.uniform_(w) is w
        torch.nn.init.kaiming_uniform_(w.view(1, 3))  # a view is a plain tensor: runs
        assert w.abs().sum() > 0
        w.data.zero_()
        torch.nn.init.normal_(w, std=2.0)
        assert w.tolist() == [0.0, 0.0, 0.0]
        t = torch.zeros(3)
        torch.nn.init.uniform_(t, 1.0, 2.0)  # not a parameter: runs
        ops = _Ops()
        with ops:
            torch.nn.Linear(4, 4)
    assert t.min() >= 1.0
    assert [c.func.__name__ for c in skipped] == ["uniform_", "normal_", "kaiming_uniform_", "uniform_"]
    assert not {n.split(".")[0] for n in ops.names} & {"uniform_", "normal_"}
    graph = ml.to_graph(Path(__file__).parents[1] / "examples" / "tiny_swin.yaml")
    full = compile_graph(graph).eval()
    written = _Written()
    with written:
        bare = compile_graph(graph, init=False).eval()
    # what is left is an op's own draw of a small table (timm's trunc_normal_ of a relative position bias)
    assert written.values < 0.05 * sum(p.numel() for p in bare.parameters())
    full_buffers, bare_buffers = dict(full.named_buffers()), dict(bare.named_buffers())
    persistent = set(full.state_dict())
    computed = [n for n in full_buffers if n not in persistent]
    assert computed and all(torch.equal(full_buffers[n], bare_buffers[n]) for n in computed)
    bare.load_state_dict(full.state_dict(), strict=True)
    x = torch.randn(graph.input_type.shape(2))
    with torch.no_grad():
        assert torch.equal(bare(x), full(x))


def test_a_build_replays_the_skipped_initialisers_timms_scheme_does_not_repeat() -> None:
    """``compile_graph(graph)``: a parameter only PyTorch's initialiser sets (the deformable downsampler's own
    weight, ``kaiming_uniform_(a=sqrt(5))``: uniform within 1/sqrt(fan_in)) gets it, after the build."""
    from metaformer_lab.ops.downsamplers import DeformConv2d

    net = compile_graph(ml.to_graph(Path(__file__).parents[1] / "examples" / "tiny_literature_hybrid.yaml"))
    convs = [m for m in net.modules() if isinstance(m, DeformConv2d)]
    assert convs
    for conv in convs:
        bound = conv.weight[0].numel() ** -0.5
        assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.5 * bound / 3 ** 0.5
