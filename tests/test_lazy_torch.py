"""Op files read without torch (``core.lazy_torch``), and the modules made once torch arrives are plain torch.

The checks that matter run in a fresh interpreter that imports the op library before torch, the way ``validate``
and ``space size`` do: this test process imported torch long ago, so here the op files hold the real names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metaformer_lab.api import build
from metaformer_lab.core import lazy_torch
from metaformer_lab.spec.load import read_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("tiny_*.yaml"))

TORCH_LAST = """
import io, json, sys, types
import metaformer_lab.ops, metaformer_lab.graph.cost, metaformer_lab.space, metaformer_lab.core.sizes
from metaformer_lab.core import lazy_torch
from metaformer_lab.ops import folds, pooling
report = {"torch_before": "torch" in sys.modules,
          "recorded_before": repr(pooling.PoolMinusInput),
          "kept_isinstance_before": isinstance(object(), folds._LAYERS)}
from metaformer_lab.api import build, deploy
from metaformer_lab.spec.load import read_spec
import torch
torch.set_num_threads(1)
outputs = {}
for path in json.loads(sys.argv[1]):
    spec = read_spec(path)
    torch.manual_seed(0)
    net = build(spec).eval()
    size = spec.input.size
    x = torch.randn(2, spec.input.channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)(x)
        traced = torch.fx.symbolic_trace(net)(x) if path.endswith("tiny_caformer.yaml") else y
        folded = deploy(net)(x)
    outputs[path] = {"y": y.flatten().tolist(), "pickled": torch.equal(again, y), "fx": torch.equal(traced, y),
                     "deploy": (folded - y).abs().max().item()}
left = sorted(f"{module.__name__}.{name}" for module in list(sys.modules.values())
              if type(module) is types.ModuleType and module.__name__.startswith("metaformer_lab")
              for name, value in vars(module).items() if isinstance(value, lazy_torch._Lazy))
report.update(outputs=outputs, stand_ins_left=left, pool_class=repr(pooling.PoolMinusInput),
              kept_isinstance=isinstance(torch.nn.Linear(2, 2), folds._LAYERS))
print(json.dumps(report))
"""


@pytest.mark.slow  # builds every example twice; the fast tier keeps the class checks below and test_startup's
def test_the_op_library_reads_without_torch_and_builds_the_same_networks_once_it_arrives() -> None:
    paths = [str(p) for p in EXAMPLES]
    done = subprocess.run([sys.executable, "-c", TORCH_LAST, json.dumps(paths)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch_before"] is False
    assert "not made until torch is imported" in report["recorded_before"]
    assert report["kept_isinstance_before"] is False
    assert report["stand_ins_left"] == []  # every module global is the real module or class now
    assert report["pool_class"] == "<class 'metaformer_lab.ops.pooling.PoolMinusInput'>"
    assert report["kept_isinstance"] is True  # a stand-in kept in a tuple answers through the real class
    assert len(report["outputs"]) == len(EXAMPLES) > 20
    torch.set_num_threads(1)
    for path, got in report["outputs"].items():
        spec = read_spec(path)
        torch.manual_seed(0)
        net = build(spec).eval()
        x = torch.randn(2, spec.input.channels, spec.input.size, spec.input.size,
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = net(x).flatten()
        assert torch.equal(torch.tensor(got["y"]), expected), path  # same init, same forward
        assert got["pickled"] and got["fx"], path
        assert got["deploy"] < 1e-4, path


def test_where_torch_is_imported_first_the_names_are_torchs_own() -> None:
    assert lazy_torch.nn is nn and lazy_torch.torch is torch and lazy_torch.Tensor is torch.Tensor
    assert lazy_torch.F is torch.nn.functional
    from metaformer_lab.ops.pooling import PoolMinusInput

    assert isinstance(PoolMinusInput, type) and issubclass(PoolMinusInput, nn.Module)


CLASSES = """
import sys
from metaformer_lab.core.lazy_torch import nn, torch
class Base(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width
class Scaled(Base):
    '''A subclass of a recorded class.'''
    def __init__(self, width):
        super().__init__(width)
        self.linear = nn.Linear(width, width)
class Norm(nn.LayerNorm):
    pass
recorded = [type(c).__name__ for c in (Base, Scaled, Norm)]
assert "torch" not in sys.modules
assert Scaled.__doc__ == "A subclass of a recorded class." and Scaled.__name__ == "Scaled"
module = Scaled(4)  # the first use makes the classes
assert "torch" in sys.modules
import __main__
assert __main__.Scaled is type(module) and issubclass(__main__.Scaled, __main__.Base)
assert isinstance(module, nn.Module) and isinstance(module, Base) and module.width == 4
assert isinstance(__main__.Norm(4), torch.nn.LayerNorm)
late = type("Late", (nn.Module,), {})  # a class made after torch arrived is an ordinary class
print(recorded, type(late).__name__)
"""


def test_a_class_on_a_stand_in_base_is_recorded_and_made_on_first_use() -> None:
    done = subprocess.run([sys.executable, "-c", CLASSES], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["['_RecordedClass',", "'_RecordedClass',", "'_RecordedClass']", "type"]
