"""Export a compiled spec to ONNX or a torch.export program (.pt2), checked against eager outputs."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from metaformer_lab.compile.compiler import compile_graph
from metaformer_lab.compile.folding import deploy_form
from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.graph.arch import ArchGraph

ExportFormat = Literal["onnx", "pt2"]


class ExportError(MetaformerLabError):
    """The exported program failed, or its outputs differ from eager ones."""


@dataclass(frozen=True)
class ExportResult:
    format: ExportFormat
    path: str
    bytes: int
    max_abs_diff: float
    checked_with: str
    dynamic_batch: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _batch_dim(dynamic: bool) -> dict[str, dict[int, torch.export.Dim]] | None:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None


def _export_pt2(net: torch.nn.Module, x: torch.Tensor, out: Path, dynamic: bool) -> torch.Tensor:
    program = torch.export.export(net, (x,), dynamic_shapes=_batch_dim(dynamic))
    torch.export.save(program, out)
    return torch.export.load(out).module()(x)


def _export_onnx(net: torch.nn.Module, x: torch.Tensor, out: Path, dynamic: bool) -> tuple[torch.Tensor, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, verbose=False, dynamic_shapes=_batch_dim(dynamic),
                                    input_names=["x"], output_names=["logits"])
    if program is None:
        raise ExportError.single(str(out), "torch.onnx.export returned no program")
    program.save(str(out))
    if importlib.util.find_spec("onnxruntime") is None:
        import onnx

        onnx.checker.check_model(str(out))
        exported = program.exported_program
        if exported is None:
            raise ExportError.single(str(out), "the ONNX program keeps no exported program to check against")
        return exported.module()(x), "onnx.checker + the exported FX program (onnxruntime not installed)"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(y), f"onnxruntime {onnxruntime.__version__}"


def export(graph: ArchGraph, fmt: ExportFormat, out: Path, *, batch_size: int = 2, dynamic_batch: bool = True,
           atol: float = 1e-4, seed: int = 0, deploy: bool = False) -> ExportResult:
    """Export the network of ``graph`` to ``out`` and check the exported outputs against eager ones.

    ``deploy``: export the deploy form (``metaformer_lab.deploy``), checked against its own eager outputs.

    Raises:
        ExportError: the export failed or an output differs by more than ``atol``.
    """
    net = compile_graph(graph).eval()
    if deploy:
        net = deploy_form(net)
    x = torch.randn(graph.input_type.shape(batch_size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = net(x)
        try:
            if fmt == "pt2":
                got, checked = _export_pt2(net, x, out, dynamic_batch), "torch.export.load"
            else:
                got, checked = _export_onnx(net, x, out, dynamic_batch)
        except ExportError:
            raise
        except Exception as err:  # torch.export / ONNX failures, reported in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError.single(str(out), f"{fmt} export failed: {type(err).__name__}: {first}") from err
    diff = (got.float() - expected).abs().max().item()
    if not diff <= atol:
        raise ExportError.single(str(out), f"exported outputs differ from eager by {diff:.3g} (> {atol:g})")
    return ExportResult(fmt, str(out), out.stat().st_size, diff, checked, dynamic_batch)
