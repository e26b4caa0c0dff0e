"""The command line: exit codes, exact stderr lines, no tracebacks; one real console-script run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLES, TINY_CAFORMER
from invalid_specs import INVALID
from typer.testing import CliRunner

from metaformer_lab.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_validate_accepts_every_example(path: Path) -> None:
    code, out, err = run("validate", str(path))
    assert (code, err) == (0, ""), err
    assert out.startswith(f"{path}: valid")


@pytest.mark.parametrize(("text", "path", "message"), INVALID)
def test_validate_rejects_every_invalid_spec(tmp_path: Path, text: str, path: str, message: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    code, out, err = run("validate", str(spec))
    assert code == 1
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert any(line.startswith(f"{path}: ") and message in line for line in lines), lines


def test_validate_prints_one_line_per_problem(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nnum_classes: -1\nstem: {type: patchify, patch: 4, bias: 1}\n"
                    "stages: [{depth: 0, dim: 8, block: {token_mixer: {type: pooling}}}]\n")
    code, _, err = run("validate", str(spec))
    assert code == 1
    assert err.splitlines() == [
        "num_classes: -1 must be >= 0",
        "stem.bias: expected true or false, got 1",
        "stages[0].depth: 0 must be >= 1",
    ]


def test_validate_reports_schema_and_shape_problems_at_once(tmp_path: Path) -> None:
    """A wrong field in the head and an invalid value in stage 0 hide no shape problem in stage 1."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ninput: {size: 32}\nstem: {type: patchify, patch: 4}\nstages:\n"
                    "  - {depth: 1, dim: 16, block: {token_mixer: {type: pooling, pool_size: 4}}}\n"
                    "  - {depth: 1, dim: 40, downsample: {type: conv}, layout: tokens,\n"
                    "     block: {token_mixer: {type: attention, num_heads: 3, head_dim: null}}}\n"
                    "head: {type: pool_norm_linear, dropp: 0.1}\n")
    code, out, err = run("validate", str(spec))
    assert code == 1 and "Traceback" not in out + err
    assert err.splitlines() == [
        "stages[0].block.token_mixer.pool_size: 4 must be odd",
        "head.dropp: unknown field (did you mean 'drop'?)",
        "stages[1].block.token_mixer.num_heads: 3 does not divide dim 40",
    ]


@pytest.mark.parametrize("target", ["missing.yaml", "."], ids=["missing", "directory"])
def test_validate_bad_paths(target: str) -> None:
    code, _, err = run("validate", target)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_error_exits_2() -> None:
    code, _, _ = run("build")
    assert code == 2
    code, _, _ = run("build", str(TINY_CAFORMER), "--input-size", "0")
    assert code == 2


def test_build_json(tmp_path: Path) -> None:
    code, out, err = run("build", str(TINY_CAFORMER), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"params", "flops", "output_shape", "activation_bytes", "parts"} <= set(data)
    assert data["output_shape"] == [1, 10]
    assert data["params"] > 0 and data["flops"] > 0


def test_build_input_size_and_batch() -> None:
    code, out, _ = run("build", str(TINY_CAFORMER), "--json", "--input-size", "64", "--batch-size", "2")
    assert code == 0
    data = json.loads(out)
    assert data["input_shape"] == [2, 3, 64, 64] and data["output_shape"] == [2, 10]


def test_input_size_is_what_gets_checked(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ninput: {size: 30}\nstem: {type: patchify, patch: 4}\n"
                    "stages: [{depth: 1, dim: 8, block: {token_mixer: {type: pooling}}}]\n")
    code, out, err = run("build", str(spec), "--json", "--input-size", "32")
    assert code == 0, err
    assert json.loads(out)["input_shape"] == [1, 3, 32, 32]
    code, _, err = run("build", str(spec), "--json")
    assert code == 1 and err == "stem.patch: 4 does not divide the 30x30 input\n"


def test_build_table_mentions_every_stage() -> None:
    code, out, _ = run("build", str(TINY_CAFORMER))
    assert code == 0
    for part in ("stem", "stages.0", "stages.1", "head", "params"):
        assert part in out


def test_graph_dot_and_png(tmp_path: Path) -> None:
    code, _, err = run("graph", str(TINY_CAFORMER), "--out", str(tmp_path / "g.dot"))
    assert code == 0, err
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and '"stem" -> ' in dot and "maps 32x32x32" in dot
    code, _, err = run("graph", str(TINY_CAFORMER), "--out", str(tmp_path / "g.png"))
    assert code == 0, err
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_is_json() -> None:
    code, out, _ = run("schema")
    assert code == 0
    assert json.loads(out)["title"] == "ArchSpec"


def test_console_script_end_to_end(tmp_path: Path) -> None:
    exe = shutil.which("metaformer-lab") or str(Path(sys.executable).parent / "metaformer-lab")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstem: {type: patchify}\n"
                   "stages: [{depth: 1, dim: 8, block: {token_mixer: {type: atention}}}]\n")
    proc = subprocess.run([exe, "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "stages[0].block.token_mixer.type: unknown 'atention' (did you mean 'attention'?)\n"
    proc = subprocess.run([exe, "build", str(TINY_CAFORMER), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output_shape"] == [1, 10]


def test_ops_lists_every_registered_op() -> None:
    from metaformer_lab.ops import REGISTRIES

    code, out, err = run("ops", "--json")
    assert (code, err) == (0, "")
    listed = {(row["role"], row["tag"]) for row in json.loads(out)}
    assert listed == {(role, tag) for role, registry in REGISTRIES.items() for tag in registry.tags()}


def test_ops_shows_one_op_s_fields() -> None:
    code, out, _ = run("ops", "gated", "--json")
    [row] = json.loads(out)
    assert code == 0 and row["role"] == "token_mixer"
    fields = {f["name"]: f for f in row["fields"]}
    assert fields["branches"]["type"] == "list[token_mixer]" and fields["act"]["default"] == "'identity'"
    code, out, _ = run("ops", "gated")
    assert code == 0 and "list[token_mixer]" in out and "[value, gate]" in out


def test_ops_of_one_role_and_an_unknown_name() -> None:
    code, out, _ = run("ops", "norm", "--json")
    assert code == 0 and {row["role"] for row in json.loads(out)} == {"norm"}
    code, out, err = run("ops", "gatd")
    assert code == 1 and "Traceback" not in err + out
    assert err.strip() == "ops: 'gatd' is neither a role nor an op type (did you mean 'gated'?)"


def test_version_names_the_libraries_results_depend_on() -> None:
    from importlib.metadata import version

    import metaformer_lab

    code, out, _ = run("--version")
    assert code == 0
    assert out.strip().startswith(f"metaformer-lab {metaformer_lab.__version__} (torch {version('torch')}, "
                                  f"timm {version('timm')}, optuna {version('optuna')}, python ")
