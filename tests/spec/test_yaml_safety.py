"""Hostile and malformed files: each is a SpecError with a located one-line message, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaformer_lab import SpecError, load_spec
from metaformer_lab.spec.yaml_io import MAX_BYTES, parse_yaml

BOMB = "\n".join(["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(7)
])

HOSTILE = [
    pytest.param("name: x\nname: y\n", "spec.yaml:2:1", "duplicate key 'name'", id="duplicate-key"),
    pytest.param("name: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "spec.yaml:1:7",
                 "tag '!!python/object/apply:os.system' is not allowed", id="python-tag"),
    pytest.param("name: !!python/name:os.system\n", "spec.yaml:1:7", "is not allowed", id="python-name"),
    pytest.param("name: !custom 3\n", "spec.yaml:1:7", "tag '!custom' is not allowed", id="custom-tag"),
    pytest.param(BOMB, "spec.yaml", "aliases expand the document past", id="alias-bomb"),
    pytest.param("stages: [1, 2\n", "spec.yaml:2:1", "invalid YAML", id="unclosed-list"),
    # libyaml reads valid files; a rejected one is re-read by PyYAML's own parser, which names the character
    pytest.param("a:\n\t- b\n", "spec.yaml:2:1", "invalid YAML: while scanning for the next token, found character "
                 "'\\t' that cannot start any token", id="tab-indent"),
    pytest.param("", "spec.yaml", "the document is empty", id="empty"),
    pytest.param("- name: x\n", "spec.yaml", "the top level must be a mapping, got a list", id="list-top"),
    pytest.param("just a string\n", "spec.yaml", "the top level must be a mapping, got 'just a string'",
                 id="scalar-top"),
    pytest.param("a: 1\n---\nb: 2\n", "spec.yaml:2:1", "expected a single document in the stream, but found "
                 "another document", id="two-documents"),
    pytest.param("[" * 500 + "]" * 500, "spec.yaml", "nest", id="deep-nesting"),
]


@pytest.mark.parametrize(("text", "where", "message"), HOSTILE)
def test_hostile_text(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert issue.path == where.replace("spec.yaml", str(path)), issue
    assert message in issue.message, issue


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_spec(path)
    assert not marker.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    ("name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 9)"),
    (b"a: " + b"x" * (MAX_BYTES + 10), "is larger than"),
], ids=["binary", "latin-1", "too-large"])
def test_bad_bytes(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [str(i) for i in info.value.issues] == [f"{path}: {message}"] or message in str(info.value)


def test_directory_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="no such file, and no zoo model"):
        load_spec("not_a_model_name")


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    assert parse_yaml("eps: 1e-6\nx: 2E3\n") == {"eps": 1e-6, "x": 2000.0}
