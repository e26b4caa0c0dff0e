"""`zoo list | show | check` and `export` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.spec.load import zoo_dir

runner = CliRunner()
pytestmark = pytest.mark.zoo


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_zoo_list_json_has_the_columns() -> None:
    code, out, err = run("zoo", "list", "--family", "metaformer", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["poolformer_s12"]["params"] == 11_915_176
    assert rows["caformer_s18"]["token_mixers"] == ["sepconv", "attention"]
    assert rows["caformer_s18"]["gflops"] == pytest.approx(8.214, abs=1e-3)
    assert rows["poolformer_s12"]["status"] == "yes (Δ 0)"


def test_zoo_list_unknown_family() -> None:
    code, _, err = run("zoo", "list", "--family", "metaformr")
    assert code == 1 and err.startswith("--family: unknown family 'metaformr'")


def test_zoo_show_prints_the_yaml() -> None:
    code, out, _ = run("zoo", "show", "poolformer_s12")
    assert code == 0 and out == (zoo_dir() / "poolformer_s12.yaml").read_text()
    code, _, err = run("zoo", "show", "poolformer_s13")
    assert code == 1 and "did you mean" in err


def test_zoo_check_one_model() -> None:
    code, out, err = run("zoo", "check", "poolformer_s12", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["passed"] and row["params"] == row["timm_params"] == 11_915_176 and row["keys_loaded"] == 132


def test_zoo_check_needs_names_or_all() -> None:
    assert run("zoo", "check")[0] == 2
    code, out, err = run("zoo", "check", "nope_model", "poolformr_s12")
    assert code == 1 and out == ""
    assert err.splitlines() == ["nope_model: no zoo model of that name",
                                "poolformr_s12: no zoo model of that name (did you mean 'poolformer_s12'?)"]


def test_build_reports_timms_parameter_counts() -> None:
    for name, params in [("poolformer_s12", 11_915_176), ("swin_tiny_patch4_window7_224", 28_288_354)]:
        code, out, err = run("build", name, "--json")
        assert code == 0, err
        assert json.loads(out)["params"] == params


def _exported(tmp_path: Path, name: str, fmt: str) -> Path:
    """``export NAME --format FMT``: the file, of the size reported, whose outputs matched the model's."""
    out = tmp_path / f"m.{fmt}"
    code, stdout, err = run("export", name, "--format", fmt, "--out", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert out.stat().st_size == result["bytes"] > 0
    assert result["max_abs_diff"] <= 1e-4 and result["dynamic_batch"]
    return out


@pytest.mark.export
@pytest.mark.parametrize(("name", "fmt"), [  # the default run keeps the quickest; CI runs all three
    pytest.param("vit_tiny_patch16_224", "onnx", marks=pytest.mark.slow),
    pytest.param("swin_tiny_patch4_window7_224", "pt2", marks=pytest.mark.slow), ("vit_tiny_patch16_224", "pt2")])
def test_export_round_trip(tmp_path: Path, name: str, fmt: str) -> None:
    _exported(tmp_path, name, fmt)


@pytest.mark.export
@pytest.mark.slow
def test_exported_onnx_takes_another_batch_size(tmp_path: Path) -> None:
    """poolformer_s12's round trip, then a batch of 3 through onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    out = _exported(tmp_path, "poolformer_s12", "onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.zeros((3, 3, 224, 224), dtype=np.float32)})
    assert y.shape == (3, 1000)


@pytest.mark.parametrize("args", [["schema"], ["graph", "poolformer_s12"], ["zoo", "check", "poolformer_s12"],
                                  ["export", "poolformer_s12", "--format", "onnx"]], ids=lambda a: a[0])
def test_an_output_folder_that_does_not_exist_is_one_line(args: list[str]) -> None:
    option = "--record" if args[0] == "zoo" else "--out"
    code, _, err = run(*args, option, "/no/such/folder/out.file")
    assert code == 1 and "folder /no/such/folder does not exist" in err and "Traceback" not in err


def test_export_bad_format(tmp_path: Path) -> None:
    code, _, _ = run("export", "poolformer_s12", "--format", "tflite", "--out", str(tmp_path / "m"))
    assert code == 2
