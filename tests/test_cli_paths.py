"""Every path option of every command: a folder where a file goes, a file in a missing folder, a file that
cannot be written, and a missing input folder each give one ``option: message`` line, a non-zero exit and
no traceback, before any work is done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaformer_lab.cli import app

runner = CliRunner()
EXAMPLE = str(Path(__file__).parents[1] / "examples" / "tiny_caformer.yaml")
UNWRITABLE = Path("/proc/metaformer-lab-out.json")  # /proc refuses new files, even to root

# command line with the output path as its last argument, and the option that names it
OUTPUTS: dict[str, tuple[Callable[[str], list[str]], str]] = {
    "schema": (lambda p: ["schema", "--out", p], "--out"),
    "graph": (lambda p: ["graph", EXAMPLE, "--out", p], "--out"),
    "export": (lambda p: ["export", EXAMPLE, "--format", "onnx", "--out", p], "--out"),
    "zoo check": (lambda p: ["zoo", "check", "poolformer_s12", "--record", p], "--record"),
    "latency calibrate": (lambda p: ["latency", "calibrate", "--space", "tiny", "--out", p], "--out"),
    "latency calibrate --from-table": (
        lambda p: ["latency", "calibrate", "--from-table", EXAMPLE, "--device", "rtx5090", "--out", p], "--out"),
}
INPUT_FOLDERS: dict[str, Callable[[str], list[str]]] = {
    "validate": lambda d: ["validate", EXAMPLE, "--block-dir", d],
    "build": lambda d: ["build", EXAMPLE, "--block-dir", d],
    "graph": lambda d: ["graph", EXAMPLE, "--out", "x.dot", "--block-dir", d],
    "export": lambda d: ["export", EXAMPLE, "--format", "onnx", "--out", "x.onnx", "--block-dir", d],
    "latency": lambda d: ["latency", EXAMPLE, "--no-measure", "--block-dir", d],
}


def _one_line(args: list[str], option: str) -> str:
    result = runner.invoke(app, args)
    output = result.stdout + result.stderr
    assert result.exit_code == 1, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{option}: "), line
    return line


@pytest.mark.parametrize("command", OUTPUTS)
def test_a_folder_where_a_file_goes(command: str, tmp_path: Path) -> None:
    args, option = OUTPUTS[command]
    assert "is a folder" in _one_line(args(str(tmp_path)), option)


@pytest.mark.parametrize("command", OUTPUTS)
def test_a_file_in_a_missing_folder(command: str, tmp_path: Path) -> None:
    args, option = OUTPUTS[command]
    line = _one_line(args(str(tmp_path / "no" / "such" / "out.json")), option)
    assert "does not exist" in line and str(tmp_path / "no" / "such") in line


@pytest.mark.parametrize("command", OUTPUTS)
def test_a_file_that_cannot_be_written(command: str) -> None:
    args, option = OUTPUTS[command]
    assert "cannot write" in _one_line(args(str(UNWRITABLE)), option)
    assert not UNWRITABLE.exists()


@pytest.mark.parametrize("command", INPUT_FOLDERS)
def test_a_missing_input_folder(command: str, tmp_path: Path) -> None:
    assert "does not exist" in _one_line(INPUT_FOLDERS[command](str(tmp_path / "nowhere")), "--block-dir")
    assert "is not a folder" in _one_line(INPUT_FOLDERS[command](EXAMPLE), "--block-dir")


def test_a_search_run_folder_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert "exists and is not a folder" in _one_line(["search", "--out", str(tmp_path / "file")], "--out")
    assert "cannot create the run folder" in _one_line(["search", "--out", "/proc/metaformer-lab-run"], "--out")


def test_an_existing_output_file_is_kept_until_written(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    out.write_text("old")
    assert runner.invoke(app, ["schema", "--out", str(out)]).exit_code == 0
    assert out.read_text().startswith("{")
