"""Datasets: shapes, the fixed stratified split, normalisation, every source and its errors."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer_lab.core.errors import MetaformerLabError
from metaformer_lab.search.datasets import Dataset, DatasetError, load_dataset


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", input_size=32)


def _issue_lines(err: DatasetError) -> list[str]:
    return [str(i) for i in err.issues]


def _assert_well_formed(err: DatasetError) -> None:
    """The error form: one line per issue, lower case, no prefix, no Python reprs."""
    assert isinstance(err, MetaformerLabError)
    for issue in err.issues:
        assert issue.path and "\n" not in issue.message
        assert issue.message[0].islower() or issue.message[0] in "'0123456789", issue.message
        assert "Error" not in issue.message and "PosixPath" not in issue.message


# --- digits -----------------------------------------------------------------------------------------

def test_digits_shapes_and_types(digits: Dataset) -> None:
    images, labels = digits.train.tensors
    assert images.dtype == torch.float16 and labels.dtype == torch.int64  # half the memory; batches in float32
    assert images.shape[1:] == (3, 32, 32) and digits.val.tensors[0].shape[1:] == (3, 32, 32)
    assert digits.num_train + digits.num_val == 1797 and digits.num_classes == 10
    assert digits.channels == 3 and digits.input_size == (32, 32) and digits.name == "digits"
    assert f"{digits.num_train} train / {digits.num_val} val" in digits.description
    assert "8x8 grayscale resized to 32x32" in digits.description
    assert digits.provenance()["num_val"] == digits.num_val


def test_digits_split_is_stratified_and_disjoint(digits: Dataset) -> None:
    train_counts = torch.bincount(digits.train.tensors[1], minlength=10)
    val_counts = torch.bincount(digits.val.tensors[1], minlength=10)
    expected = (train_counts + val_counts).double() * 0.2
    assert ((val_counts.double() - expected).abs() <= 1).all()
    train_rows = {row.numpy().tobytes() for row in digits.train.tensors[0][:, 0]}
    assert not any(row.numpy().tobytes() in train_rows for row in digits.val.tensors[0][:, 0])


def test_digits_split_is_fixed_by_the_seed(digits: Dataset) -> None:
    again = load_dataset("digits", input_size=32)
    other = load_dataset("digits", input_size=32, seed=1)
    assert torch.equal(again.val.tensors[0], digits.val.tensors[0])
    assert torch.equal(again.train.tensors[1], digits.train.tensors[1])
    assert not torch.equal(other.val.tensors[1], digits.val.tensors[1])


def test_digits_normalised_with_train_statistics(digits: Dataset) -> None:
    images = digits.train.tensors[0]
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (images.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert len(digits.mean) == 3 and 0 < digits.mean[0] < 1 and digits.std[0] > 0
    assert digits.val.tensors[0].mean().abs() < 0.1  # the val split uses the train statistics


@pytest.mark.parametrize(("size", "channels"), [(4, 1), ((16, 24), 3), (8, 2)])
def test_digits_resized_and_replicated(size: int | tuple[int, int], channels: int) -> None:
    data = load_dataset("digits", input_size=size, channels=channels)
    hw = (size, size) if isinstance(size, int) else size
    assert data.train.tensors[0].shape[1:] == (channels, *hw) and data.input_size == hw
    assert torch.isfinite(data.train.tensors[0]).all()
    if channels > 1:
        assert torch.equal(data.train.tensors[0][:, 0], data.train.tensors[0][:, -1])


# --- synthetic --------------------------------------------------------------------------------------

def test_synthetic_is_seeded_and_shaped() -> None:
    a = load_dataset("synthetic:50", input_size=(8, 12), channels=1, num_classes=3, seed=4)
    b = load_dataset("synthetic:50", input_size=(8, 12), channels=1, num_classes=3, seed=4)
    assert (a.num_train, a.num_val) == (40, 10) and a.train.tensors[0].shape == (40, 1, 8, 12)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert int(a.train.tensors[1].max()) < 3 and a.num_classes == 3
    default = load_dataset("synthetic", input_size=16)
    assert default.num_train + default.num_val == 256 and default.num_classes == 10


# --- cifar10 ----------------------------------------------------------------------------------------

def _write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch in CIFAR-10's python format: a Python 2 pickle with bytes keys."""
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"fake", b"labels": labels, b"data": images,
                     b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)


def _fake_cifar10(root: Path, per_batch: int = 6, test: int = 5) -> Path:
    """A tiny CIFAR-10 folder: image k of a batch has label k, and is pure red for label 0, pure blue otherwise."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        labels = [k % 10 for k in range(n)]
        images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for k, label in enumerate(labels):
            images[k, 0 if label == 0 else 2] = 255
        _write_batch(folder / name, images.reshape(n, 3072), labels)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    return folder


def test_cifar10_reads_the_pickle_folder(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    data = load_dataset(f"cifar10:{folder}", input_size=32)
    assert (data.num_train, data.num_val, data.num_classes) == (30, 5, 10)
    assert data.class_names[3] == "class3" and data.train.tensors[0].shape == (30, 3, 32, 32)
    images, labels = data.train.tensors
    red, blue = images[labels == 0], images[labels != 0]
    assert (red[:, 0] > red[:, 2]).all() and (blue[:, 2] > blue[:, 0]).all()  # planes kept in R, G, B order
    assert torch.bincount(data.val.tensors[1]).tolist() == [1, 1, 1, 1, 1]
    assert load_dataset(f"cifar10:{tmp_path}", input_size=16).train.tensors[0].shape == (30, 3, 16, 16)


def test_cifar10_gray(tmp_path: Path) -> None:
    data = load_dataset(f"cifar10:{_fake_cifar10(tmp_path)}", input_size=32, channels=1)
    assert data.train.tensors[0].shape == (30, 1, 32, 32) and "turned into 1" in data.description


def test_cifar10_missing_files_are_named(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cifar10:{folder}", input_size=32)
    assert [i.path for i in info.value.issues] == [str(folder / "data_batch_3"), str(folder / "test_batch")]
    assert info.value.issues[0].message.startswith("missing; a CIFAR-10 folder")
    _assert_well_formed(info.value)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(b"not a pickle at all", "not a CIFAR-10 python pickle", id="garbage"),
    pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-9], "truncated or corrupt", id="truncated"),
    pytest.param(pickle.dumps(_Boom()), "names the Python object 'builtins.print'", id="code"),
    pytest.param(pickle.dumps([1, 2]), "holds no mapping", id="list"),
    pytest.param(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "rows of 3072",
                 id="shape"),
    pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "one label per image",
                 id="labels"),
    pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}), "0..9", id="range"),
])
def test_cifar10_corrupt_batch(tmp_path: Path, content: bytes, message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = _fake_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cifar10:{folder}", input_size=32)
    assert [i.path for i in info.value.issues] == [str(folder / "data_batch_2")]
    assert message in info.value.issues[0].message
    assert "unpickled code ran" not in capsys.readouterr().out
    _assert_well_formed(info.value)


# --- imagefolder ------------------------------------------------------------------------------------

def _write_images(folder: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    for c, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            color = (40 * c, 200 - 30 * k, 90)
            Image.new("RGB" if k % 2 == 0 else "L", (size[0] + k, size[1]), color=color if k % 2 == 0 else 60 * c) \
                .save(folder / name / f"img{k}.png")


def test_imagefolder_split(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 5, "dog": 5, "emu": 4})
    data = load_dataset(f"imagefolder:{tmp_path}", input_size=16, seed=3)
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    assert (data.num_train, data.num_val) == (11, 3)
    assert torch.bincount(data.val.tensors[1], minlength=3).tolist() == [1, 1, 1]
    assert data.train.tensors[0].shape == (11, 3, 16, 16) and "split from one folder" in data.description


def test_imagefolder_train_and_val(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    _write_images(tmp_path / "val", {"a": 1, "c": 2})
    data = load_dataset(f"imagefolder:{tmp_path}", input_size=(8, 10), channels=1)
    assert (data.num_train, data.num_val, data.num_classes) == (7, 3, 3)
    assert data.val.tensors[1].tolist() == [0, 2, 2]  # indices follow train/'s classes
    assert data.val.tensors[0].shape == (3, 1, 8, 10)


def _empty_class(root: Path) -> None:
    _write_images(root / "x", {"a": 2})
    (root / "x" / "b").mkdir()


def _corrupt_image(root: Path) -> None:
    _write_images(root / "x", {"a": 2, "b": 2})
    (root / "x" / "b" / "bad.png").write_text("no")


def _unknown_val_class(root: Path) -> None:
    _write_images(root / "x" / "train", {"a": 2, "b": 2})
    _write_images(root / "x" / "val", {"z": 1})


@pytest.mark.parametrize(("setup", "path", "message"), [
    pytest.param(lambda root: None, "missing", "no such folder", id="missing"),
    pytest.param(lambda root: (root / "x").mkdir(), "x", "0 class folder(s)", id="empty"),
    pytest.param(_empty_class, "x/b", "no images", id="empty-class"),
    pytest.param(_corrupt_image, "x/b/bad.png", "cannot be read as an image", id="corrupt-image"),
    pytest.param(_unknown_val_class, "x/val/z", "a class that train/ does not have", id="unknown-val-class"),
])
def test_imagefolder_errors(tmp_path: Path, setup: Callable[[Path], None], path: str, message: str) -> None:
    setup(tmp_path)
    target = tmp_path / ("missing" if path == "missing" else "x")
    with pytest.raises(DatasetError) as info:
        load_dataset(f"imagefolder:{target}", input_size=8)
    assert str(tmp_path / path) in [i.path for i in info.value.issues]
    assert any(message in line for line in _issue_lines(info.value))
    _assert_well_formed(info.value)


# --- bad sources and options ------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "options", "line"), [
    pytest.param("digit", {}, "--dataset: unknown dataset 'digit' (did you mean 'digits'?)", id="typo"),
    pytest.param("cifar", {}, "--dataset: unknown dataset 'cifar' (did you mean 'cifar10:PATH'?)", id="cifar"),
    pytest.param("mnist", {}, "--dataset: unknown dataset 'mnist' (use digits, cifar10:PATH, imagefolder:PATH, "
                              "synthetic, synthetic:N)", id="unknown"),
    pytest.param("cifar10", {}, "--dataset: 'cifar10' needs a folder; write cifar10:PATH", id="no-path"),
    pytest.param("synthetic:ten", {}, "--dataset: 'synthetic:ten' needs a number of images of at least 2 after "
                                      "the colon", id="synthetic-n"),
    pytest.param("digits", {"num_classes": 5}, "--dataset: 'digits' has 10 classes, but the network has 5 outputs; "
                                               "set num_classes to 10", id="classes"),
    pytest.param("digits", {"val_fraction": 1.5}, "val_fraction: 1.5 must lie strictly between 0 and 1",
                 id="fraction"),
    pytest.param("digits", {"input_size": 0}, "input_size: 0x0 is not a positive size", id="size"),
    pytest.param("digits", {"channels": 0}, "channels: 0 is not a positive number of channels", id="channels"),
])
def test_bad_source(source: str, options: dict[str, object], line: str) -> None:
    kwargs: dict[str, object] = {"input_size": 8, **options}
    with pytest.raises(DatasetError) as info:
        load_dataset(source, **kwargs)  # type: ignore[arg-type]
    assert _issue_lines(info.value) == [line]
    _assert_well_formed(info.value)


def test_rgb_cannot_give_four_channels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cifar10:{_fake_cifar10(tmp_path)}", input_size=32, channels=4)
    assert info.value.issues[0].message.startswith("'cifar10:") and "cannot give 4 channels" in str(info.value)
    _assert_well_formed(info.value)
