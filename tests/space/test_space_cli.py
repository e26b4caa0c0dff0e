"""`metaformer-lab space ...`: show, size, sample, contains on both shipped spaces; bad files exit 1 cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from invalid_spaces import INVALID_SPACES
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.space import load_space

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("space", ["tiny", "search_spaces/metaformer.yaml"])
def test_show(space: str) -> None:
    code, out, err = run("space", "show", space)
    assert (code, err) == (0, "")
    assert "num_stages" in out and "stages[0]" in out and "variant: one of" in out


@pytest.mark.parametrize("space", ["tiny", "metaformer"])
def test_size(space: str) -> None:
    code, out, err = run("space", "size", space, "--samples", "50", "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["points"] > 10**12 and report["drawn"] == 50
    assert 0 < report["valid"] <= 50 and report["valid_share"] == report["valid"] / 50
    code, out, _ = run("space", "size", space, "--samples", "50")
    assert code == 0 and "points (10^" in out and "valid:" in out


def test_size_is_the_same_in_one_process_and_in_several() -> None:
    reports = []
    for processes in ("1", "3"):
        code, out, err = run("space", "size", "tiny", "--samples", "120", "--seed", "2", "--processes", processes,
                             "--json")
        assert (code, err) == (0, "")
        reports.append(json.loads(out))
    assert reports[0] == reports[1]


@pytest.mark.parametrize("space", ["tiny", "metaformer"])
def test_sample_writes_specs_that_validate(tmp_path: Path, space: str) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run("space", "sample", space, "--n", "4", "--seed", "2", "--out", str(out_dir))
    assert (code, err.strip()) == (0, ""), err  # stderr carries only the (transient) progress bar
    assert "redrew" in out
    files = sorted(out_dir.glob("*.yaml"))
    assert len(files) == 4
    for f in files:
        code, _, err = run("validate", str(f))
        assert (code, err) == (0, "")


def test_sample_refuses_a_file_as_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, out, err = run("space", "sample", "tiny", "--out", str(target))
    assert code == 1 and err.strip() == f"--out: {target} exists and is not a folder"


def test_contains_prints_an_assignment_that_is_a_reference() -> None:
    code, out, err = run("space", "contains", "search_spaces/metaformer.yaml", "poolformer_s12")
    assert (code, err) == (0, "")
    entry = yaml.safe_load(out)
    assert entry == {"poolformer_s12": dict(load_space("metaformer").references["poolformer_s12"])}


def test_contains_a_spec_file_of_the_tiny_space(tmp_path: Path) -> None:
    run("space", "sample", "tiny", "--n", "1", "--seed", "5", "--out", str(tmp_path))
    (spec,) = tmp_path.glob("*.yaml")
    code, out, err = run("space", "contains", "tiny", str(spec), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["num_stages"] in (1, 2, 3)


def test_contains_says_which_choice_excludes_a_spec() -> None:
    code, out, err = run("space", "contains", "metaformer", "swin_tiny_patch4_window7_224")
    assert code == 1 and out == ""
    assert err.startswith("stem: no option of the space fits") and "Traceback" not in err


@pytest.mark.parametrize(("text", "path", "message"), INVALID_SPACES)
def test_every_invalid_space_exits_1_with_its_path(tmp_path: Path, text: str, path: str, message: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, out, err = run("space", "show", str(space))
    assert code == 1 and "Traceback" not in out + err
    assert any(line.startswith(f"{path}: ") and message in line for line in err.splitlines()), err


@pytest.mark.parametrize("target", ["missing.yaml", "nospace"])
def test_missing_spaces(target: str) -> None:
    code, _, err = run("space", "size", target)
    assert code == 1 and err.startswith(f"{target}: no such file")
