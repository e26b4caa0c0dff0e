"""The recorded zoo listing (``zoo/listing.json``) against the catalog and the graphs it was computed from.

``zoo list`` reads the record instead of lowering 60 models; these tests keep the record honest: it names
every catalog model with its family, a sample of rows (every family once) recomputes to the same values, and
the slow run regenerates the whole file and compares it byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.zoo import catalog
from metaformer_lab.zoo.listing import LISTING_FILE, recorded_rows, size_models

RECORDED = {row.name: row for row in recorded_rows()}
SAMPLE = sorted({model.family: name for name, model in sorted(catalog().items(), reverse=True)}.values())
runner = CliRunner()


def test_the_listing_names_every_zoo_model_with_its_family() -> None:
    assert {name: row.family for name, row in RECORDED.items()} == {n: m.family for n, m in catalog().items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in SAMPLE else [pytest.mark.slow])
                                  for n in sorted(catalog())])
def test_a_recorded_row_equals_its_graphs(name: str) -> None:
    (computed,) = size_models([name])
    assert computed == RECORDED[name]


def test_recompute_shows_what_is_recorded() -> None:
    result = runner.invoke(app, ["zoo", "list", "--family", "swin", "--recompute", "--json"])
    recorded = runner.invoke(app, ["zoo", "list", "--family", "swin", "--json"])
    assert result.exit_code == recorded.exit_code == 0, result.stderr
    assert result.stdout == recorded.stdout


def test_record_writes_every_model_only(tmp_path: Path) -> None:
    result = runner.invoke(app, ["zoo", "list", "--family", "vit", "--record", str(tmp_path / "listing.json")])
    assert result.exit_code == 2 and "leave out --family" in " ".join(result.stderr.replace("│", "").split())
    assert not (tmp_path / "listing.json").exists()


@pytest.mark.slow
def test_regenerating_the_listing_gives_the_shipped_file(tmp_path: Path) -> None:
    out = tmp_path / "listing.json"
    result = runner.invoke(app, ["zoo", "list", "--record", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert out.read_text() == LISTING_FILE.read_text()
