"""A spec that validates but would not fit in memory is refused before any tensor exists, by the commands
that build it, with one line naming the part that dominates."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import EXAMPLES
from typer.testing import CliRunner

import metaformer_lab as ml
from metaformer_lab.cli import app
from metaformer_lab.graph.cost import count_params, memory_need

runner = CliRunner()
BOMB = """name: bomb
input: {channels: 3, size: 64}
num_classes: 10
stem: {type: patchify, patch: 4}
stages:
  - {depth: 2, dim: 32, block: {token_mixer: {type: pooling}}}
  - {depth: 256, dim: 2048, downsample: {type: conv, kernel: 2, stride: 2}, block: {token_mixer: {type: pooling}}}
"""


@pytest.fixture
def bomb(tmp_path: Path) -> str:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    return str(path)


def _refused(args: list[str], env: dict[str, str] | None = None) -> str:
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = result.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize("command", [["build"], ["export", "--format", "onnx", "--out", "{tmp}/x.onnx"],
                                     ["latency", "--threads", "1"]], ids=["build", "export", "latency"])
def test_a_memory_bomb_is_refused_naming_its_stage(command: list[str], bomb: str, tmp_path: Path) -> None:
    args = [command[0], bomb, *[a.format(tmp=tmp_path) for a in command[1:]]]
    line = _refused(args)
    assert line.startswith("stages[1]: the network needs about ") and "of parameters" in line
    assert "half of the memory available now; --max-memory or MFL_MAX_MEMORY sets it" in line


def test_the_limit_is_settable_by_option_and_environment() -> None:
    line = _refused(["build", "tiny_caformer", "--max-memory", "1MB"])
    assert "more than the 1.00 MB allowed (--max-memory 1MB)" in line
    assert "allowed (--max-memory 1MB)" in _refused(["build", "tiny_caformer"], env={"MFL_MAX_MEMORY": "1MB"})
    assert runner.invoke(app, ["build", "tiny_caformer", "--max-memory", "1GB"]).exit_code == 0
    assert _refused(["build", "tiny_caformer", "--max-memory", "ten"]).startswith("--max-memory: ")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_estimate_counts_the_parameters_the_module_has(path: Path) -> None:
    graph = ml.to_graph(path)
    need = memory_need(graph)
    assert need.params_bytes == 4 * count_params(ml.build(graph))
    assert need.total_bytes > need.params_bytes and set(need.by_part) >= {"stem", "stages[0]", "head"}


EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_caformer.yaml")


def test_validate_warns_about_a_memory_bomb_and_still_exits_0(bomb: str) -> None:
    result = CliRunner().invoke(app, ["validate", bomb])
    assert result.exit_code == 0 and ": valid (bomb" in result.stdout
    assert result.stderr.startswith("warning: stages[1]: the network needs about") and "refuse it" in result.stderr
    quiet = CliRunner().invoke(app, ["validate", EXAMPLE])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    # the cheap trigger never hides a real excess: a tiny limit makes the example too large as well
    small = CliRunner().invoke(app, ["validate", EXAMPLE,
                                                     "--max-memory", "1KB"])
    assert small.exit_code == 0 and small.stderr.startswith("warning: ")


def test_the_cheap_trigger_stays_small_for_ordinary_networks() -> None:
    from metaformer_lab.graph.cost import dense_scale_bytes

    graph = ml.to_graph("caformer_s18")
    assert 0 < dense_scale_bytes(graph) < memory_need(graph).params_bytes
