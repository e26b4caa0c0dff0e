"""Every command's help, as a new user reads it: an example to copy, and value labels click programs use.

Walks the whole command tree (groups and hidden commands included) instead of a list, so a new command is
checked without anyone adding it here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from metaformer_lab.cli import app

runner = CliRunner()
# typer's own labels, which read as Python rather than as a command line: <bool>, <str>, <int range>,
# {SPEC} for a required argument, [[X]] for an optional one with a bracketed metavar
TYPER_LABELS = re.compile(r"<[a-z][a-z_ |\[\]]*>|\{[A-Z_]+\}|\[\[")


def _paths(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _paths(sub, (*path, name))


COMMANDS = list(_paths(typer.main.get_command(app)))


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_walk_finds_the_commands() -> None:
    assert {("validate",), ("zoo", "list"), ("latency", "spec"), ("space", "size")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "metaformer-lab")
def test_help_has_an_example_and_no_typer_labels(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "Example" in text
    assert not TYPER_LABELS.findall(text)


def test_labels_read_as_click_programs_show_them() -> None:
    rows = {line.split()[1]: line for line in _help(("build",)).splitlines() if line.startswith("│ --")}
    assert "INTEGER [1<=x<=4096]" in rows["--input-size"]
    assert rows["--json"].split()[:3] == ["│", "--json", "Print"]  # a flag: no label
    assert "DIR" in rows["--block-dir"]
    assert "SIZE" in rows["--max-memory"]
    assert "build [OPTIONS] SPEC" in _help(("build",))
    assert "check [OPTIONS] [NAMES]..." in _help(("zoo", "check"))
    assert "│ --record          FILE" in _help(("zoo", "check"))
