"""Datasets a candidate is scored on, loaded into memory once and never downloaded.

``load_dataset(source, ...)`` reads one of:

- ``digits``: scikit-learn's handwritten digits (1797 8x8 grayscale images shipped inside scikit-learn),
  with a fixed stratified train/val split;
- ``cifar10:PATH``: a local CIFAR-10 folder in its python pickle format (``data_batch_1`` .. ``5``,
  ``test_batch``, ``batches.meta``; PATH may also be the folder holding ``cifar-10-batches-py``);
- ``imagefolder:PATH``: one subfolder of images per class, as torchvision's ``ImageFolder`` reads them;
  ``PATH/train`` and ``PATH/val`` are used when both exist, otherwise PATH is split;
- ``synthetic`` or ``synthetic:N``: N random images with random labels (default 256), for runs that only
  measure latency.

Every source gives ``(N, C, H, W)`` images at the requested size and int64 labels, normalised with the
per-channel mean and std of the train split (synthetic images are N(0, 1) already) and kept in half precision
(:data:`STORED`; batches are taken in float32). All images are held in memory (``N * C * H * W * 2`` bytes
per split): the datasets a search trains on for a few epochs are small.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from metaformer_lab.core.errors import Issue, MetaformerLabError

SOURCE_FORMS = ("digits", "cifar10:PATH", "imagefolder:PATH", "synthetic", "synthetic:N")
"""The forms ``load_dataset`` accepts (shown in errors and ``--help``)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Image files an image folder may hold (torchvision's ``IMG_EXTENSIONS``)."""

CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

SYNTHETIC_SAMPLES = 256
_PATH = "--dataset"
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


STORED = torch.float16
"""The dtype images are kept in: normalised images need no more than half precision (a relative step of 1e-3,
far below what an 8-bit source holds), and half the memory keeps 224 px data small (1,797 digits are 0.5 GB
instead of 1.1 GB). Batches are taken in float32."""


class DatasetError(MetaformerLabError):
    """A dataset source is invalid: unknown form, missing or corrupt file, channels the data cannot give."""


@dataclass(frozen=True)
class Dataset:
    """Images and labels in memory, ready to be batched.

    Attributes:
        name: the source kind (``digits``, ``cifar10``, ``imagefolder``, ``synthetic``).
        train: ``(N, C, H, W)`` images, normalised and stored as :data:`STORED`, and int64 ``(N,)`` labels;
            take batches as float32 (``.float()``).
        val: the same for the validation split.
        num_classes: the number of classes (labels are ``0 .. num_classes - 1``).
        channels: C.
        input_size: ``(H, W)``.
        description: one line of provenance, such as ``digits: 1437 train / 360 val, ...``.
        source: the source string as given.
        class_names: one name per class.
        mean: the per-channel mean subtracted (of the train split, on the [0, 1] scale).
        std: the per-channel std divided by.
        seed: the seed of the split (and of synthetic data).
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    num_classes: int
    channels: int
    input_size: tuple[int, int]
    description: str
    source: str = ""
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    seed: int = 0

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val)

    def provenance(self) -> dict[str, Any]:
        """What a run records about its data (JSON-ready)."""
        return {
            "source": self.source, "name": self.name, "description": self.description,
            "num_train": self.num_train, "num_val": self.num_val, "num_classes": self.num_classes,
            "channels": self.channels, "input_size": list(self.input_size), "seed": self.seed,
            "mean": list(self.mean), "std": list(self.std),
        }


@dataclass
class _Raw:
    """Images as read, on the [0, 1] scale, before the split, channel conversion, resize and normalisation."""

    images: Tensor  # (N, c, h, w) float32
    labels: Tensor  # (N,) int64
    class_names: tuple[str, ...]
    native: str  # what the images are, for the description: "8x8 grayscale"
    val: tuple[Tensor, Tensor] | None = None  # a split the source fixes (CIFAR-10's test batch)
    normalise: bool = True
    presized: bool = False  # resized as read (image folders: every image has its own size)
    notes: list[str] = field(default_factory=list)


def load_dataset(source: str, *, input_size: int | Sequence[int], channels: int = 3, seed: int = 0,
                 val_fraction: float = 0.2, num_classes: int | None = None) -> Dataset:
    """The dataset ``source`` names, at ``input_size`` with ``channels`` channels (see the module docstring).

    Args:
        source: ``digits``, ``cifar10:PATH``, ``imagefolder:PATH``, ``synthetic`` or ``synthetic:N``.
        input_size: H = W, or ``(H, W)`` (a spec's ``input.size``); images are resized bilinearly, antialiased
            when shrinking.
        channels: grayscale images are replicated to any number of channels; RGB gives 3, or 1 (luma).
        seed: seeds the train/val split (the same seed gives the same split) and synthetic data.
        val_fraction: the share of each class held out, where the source has no validation split.
        num_classes: the outputs of the network the data is for: the data may not have more classes (and
            synthetic data has this many, default 10).

    Raises:
        DatasetError: naming ``--dataset`` or the file at fault.
    """
    size = _check_options(input_size, channels, val_fraction, num_classes)
    kind, _, arg = source.partition(":")
    raw = _read(kind, arg, source, size, channels, seed, num_classes or 10, val_fraction)
    if num_classes is not None and len(raw.class_names) > num_classes:
        raise DatasetError.single(_PATH, f"'{source}' has {len(raw.class_names)} classes, but the network has "
                                         f"{num_classes} outputs; set num_classes to {len(raw.class_names)}")
    splits = ((raw.images, raw.labels), raw.val) if raw.val is not None else _split(raw, val_fraction, seed)
    if len(splits[1][1]) == 0:
        raise DatasetError.single(_PATH, f"'{source}' has too few images per class to hold out a validation split")
    train, val = [(_resize(_convert_channels(x, channels, source), size), y) for x, y in splits]
    mean, std = _channel_stats(train[0]) if raw.normalise else ((0.0,) * channels, (1.0,) * channels)
    return Dataset(name=kind, train=TensorDataset(_normalised(train[0], mean, std), train[1]),
                   val=TensorDataset(_normalised(val[0], mean, std), val[1]), num_classes=len(raw.class_names),
                   channels=channels, input_size=size, description=_describe(kind, raw, len(train[1]), len(val[1]),
                                                                             size, channels),
                   source=source, class_names=raw.class_names, mean=mean, std=std, seed=seed)


def _describe(kind: str, raw: _Raw, num_train: int, num_val: int, size: tuple[int, int], channels: int) -> str:
    """``digits: 1438 train / 359 val, 8x8 grayscale resized to 32x32, 10 classes; ...``."""
    resized = "resized to" if raw.presized or tuple(raw.images.shape[-2:]) != size else "at"
    parts = [f"{kind}: {num_train} train / {num_val} val, {raw.native} {resized} {size[0]}x{size[1]}, "
             f"{len(raw.class_names)} classes"]
    have = raw.images.shape[1]
    if have != channels:
        parts.append(f"{have} channel(s) " + ("replicated to" if have == 1 else "turned into") + f" {channels}")
    return "; ".join([*parts, *raw.notes])


def _check_options(input_size: int | Sequence[int], channels: int, val_fraction: float,
                   num_classes: int | None) -> tuple[int, int]:
    if not isinstance(input_size, int) and len(input_size) != 2:
        raise DatasetError.single("input_size", "must be one size or two, (height, width)")
    size = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    issues = []
    if min(size) < 1:
        issues.append(Issue("input_size", f"{size[0]}x{size[1]} is not a positive size"))
    if channels < 1:
        issues.append(Issue("channels", f"{channels} is not a positive number of channels"))
    if not 0.0 < val_fraction < 1.0:
        issues.append(Issue("val_fraction", f"{val_fraction:g} must lie strictly between 0 and 1"))
    if num_classes is not None and num_classes < 1:
        issues.append(Issue("num_classes", f"{num_classes} is not a positive number of classes"))
    if issues:
        raise DatasetError(issues)
    return size


def _read(kind: str, arg: str, source: str, size: tuple[int, int], channels: int, seed: int,
          num_classes: int, val_fraction: float) -> _Raw:
    """The images of one source, by its kind (the part before the colon)."""
    if kind == "digits" and not arg:
        return _read_digits()
    if kind == "synthetic":
        return _read_synthetic(arg, source, size, channels, seed, num_classes, val_fraction)
    if kind in ("cifar10", "imagefolder") and not arg:
        raise DatasetError.single(_PATH, f"'{source}' needs a folder; write {kind}:PATH")
    if kind == "cifar10":
        return _read_cifar10(Path(arg).expanduser())
    if kind == "imagefolder":
        return _read_imagefolder(Path(arg).expanduser(), size)
    forms = [f.partition(":")[0] for f in SOURCE_FORMS]
    close = difflib.get_close_matches(kind, forms, n=1)
    hint = f"did you mean '{SOURCE_FORMS[forms.index(close[0])]}'?" if close else "use " + ", ".join(SOURCE_FORMS)
    raise DatasetError.single(_PATH, f"unknown dataset '{source}' ({hint})")


# --- sources -------------------------------------------------------------------------------------

def _read_digits() -> _Raw:
    from sklearn.datasets import load_digits  # lazily: scikit-learn is slow to import

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 8, 8) in 0..16 -> (N, 1, 8, 8)
    names = tuple(str(n) for n in digits.target_names)
    return _Raw(images, torch.from_numpy(digits.target).long(), names, "8x8 grayscale")


def _read_synthetic(arg: str, source: str, size: tuple[int, int], channels: int, seed: int, num_classes: int,
                    val_fraction: float) -> _Raw:
    """N random images split at random (not stratified: the labels are random too)."""
    if arg and not (arg.isdigit() and int(arg) >= 2):
        raise DatasetError.single(_PATH, f"'{source}' needs a number of images of at least 2 after the colon")
    n = int(arg) if arg else SYNTHETIC_SAMPLES
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, *size, generator=gen)  # already N(0, 1): not normalised again
    labels = torch.randint(num_classes, (n,), generator=gen)
    names = tuple(str(i) for i in range(num_classes))
    return _Raw(images[n_val:], labels[n_val:], names, "random N(0, 1)", val=(images[:n_val], labels[:n_val]),
                normalise=False, notes=["random labels: for latency-only runs"])


class _Refused(pickle.UnpicklingError):
    """A pickle names a Python object outside the allow-list."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: a pickle that names any other Python object
    (which unpickling would import and call) is refused."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"it names the Python object '{module}.{name}', which is not loaded")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """One CIFAR batch file as a dict with str keys (the files were written by Python 2: bytes keys)."""
    try:
        with path.open("rb") as f:
            data = _ArrayUnpickler(f, encoding="bytes").load()
    except _Refused as err:
        raise DatasetError.single(str(path), f"not a CIFAR-10 python pickle: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeError, OverflowError):
        raise DatasetError.single(str(path), "not a CIFAR-10 python pickle (truncated or corrupt)") from None
    if not isinstance(data, dict):
        raise DatasetError.single(str(path), "not a CIFAR-10 python pickle (it holds no mapping)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in data.items()}


def _cifar_batch(path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """(N, 3, 32, 32) uint8 images and int64 labels of one batch file."""
    batch = _unpickle(path)
    images, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == 3 * 32 * 32):
        raise DatasetError.single(str(path), "not a CIFAR-10 batch: 'data' must be a uint8 array of rows of 3072 "
                                             "pixels")
    if not (isinstance(labels, (list, np.ndarray)) and len(labels) == len(images)):
        raise DatasetError.single(str(path), f"not a CIFAR-10 batch: 'labels' must list one label per image "
                                             f"({len(images)})")
    label_tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(label_tensor) and (int(label_tensor.min()) < 0 or int(label_tensor.max()) >= num_classes):
        raise DatasetError.single(str(path), f"labels must lie in 0..{num_classes - 1} (batches.meta names "
                                             f"{num_classes} classes)")
    return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), label_tensor  # rows are R, G, B planes


def _read_cifar10(folder: Path) -> _Raw:
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DatasetError.single(str(folder), "no such folder (a CIFAR-10 folder, python version)")
    rule = "missing; a CIFAR-10 folder (python version) holds data_batch_1..5, test_batch and batches.meta"
    missing = [Issue(str(folder / n), rule) for n in CIFAR10_FILES if not (folder / n).is_file()]
    if missing:
        raise DatasetError(missing)
    names = _unpickle(folder / "batches.meta").get("label_names")
    if not (isinstance(names, list) and names):
        raise DatasetError.single(str(folder / "batches.meta"), "not a CIFAR-10 meta file: no 'label_names'")
    class_names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)
    parts = [_cifar_batch(folder / f"data_batch_{i}", len(class_names)) for i in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", len(class_names))
    images = torch.cat([p[0] for p in parts]).float().div_(255.0)
    return _Raw(images, torch.cat([p[1] for p in parts]), class_names, "32x32 RGB",
                val=(test[0].float().div_(255.0), test[1]))


def _classes(root: Path, minimum: int = 2) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < minimum:
        raise DatasetError.single(str(root), f"{len(classes)} class folder(s); an image folder holds one subfolder "
                                             f"of images per class, at least {minimum}")
    return classes


def _read_images(root: Path, classes: dict[str, int], size: tuple[int, int],
                 issues: list[Issue]) -> tuple[Tensor, Tensor]:
    """Every image under ``root/<class>/`` as RGB at ``size``, labelled ``classes[<class>]``; problems go to
    ``issues``."""
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for name, index in classes.items():
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            issues.append(Issue(str(root / name), f"no images ({', '.join(IMAGE_SUFFIXES)})"))
        for file in files:
            try:
                with Image.open(file) as img:
                    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError):
                issues.append(Issue(str(file), "cannot be read as an image"))
                continue
            image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)  # (h, w, 3) -> (3, h, w)
            images.append(_resize(image.unsqueeze(0), size)[0])
            labels.append(index)
    if not images:
        return torch.zeros(0, 3, *size), torch.zeros(0, dtype=torch.long)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _read_imagefolder(root: Path, size: tuple[int, int]) -> _Raw:
    """Images are read eagerly, each resized to ``size`` as it is read (aspect ratio not kept, no crop)."""
    if not root.is_dir():
        raise DatasetError.single(str(root), "no such folder (an image folder: one subfolder of images per class)")
    issues: list[Issue] = []
    split = (root / "train").is_dir() and (root / "val").is_dir()
    classes = {name: i for i, name in enumerate(_classes(root / "train" if split else root))}
    train = _read_images(root / "train" if split else root, classes, size, issues)
    val = None
    if split:
        val_classes = _classes(root / "val", minimum=1)
        issues += [Issue(str(root / "val" / c), "a class that train/ does not have") for c in val_classes
                   if c not in classes]
        val = _read_images(root / "val", {c: classes[c] for c in val_classes if c in classes}, size, issues)
    if issues:
        raise DatasetError(issues)
    return _Raw(train[0], train[1], tuple(classes), "RGB images", val=val, presized=True,
                notes=["train/ and val/ as given" if split else "split from one folder"])


# --- split, channels, size, normalisation -------------------------------------------------------

def _split(raw: _Raw, val_fraction: float, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A stratified split: ``round(n_c * val_fraction)`` images of each class c held out (at least one, and
    never the class's last one), chosen by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = raw.labels.numpy()
    held: list[np.ndarray] = []
    for c in range(len(raw.class_names)):
        members = np.flatnonzero(labels == c)
        k = min(max(round(len(members) * val_fraction), 1), len(members) - 1) if len(members) > 1 else 0
        held.append(rng.permutation(members)[:k])
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[np.concatenate(held) if held else []] = True
    train_idx = torch.from_numpy(np.flatnonzero(~val_mask))
    val_idx = torch.from_numpy(np.flatnonzero(val_mask))
    return (raw.images[train_idx], raw.labels[train_idx]), (raw.images[val_idx], raw.labels[val_idx])


def _convert_channels(images: Tensor, channels: int, source: str) -> Tensor:
    """Grayscale replicated to ``channels``; RGB kept, or turned into luma for one channel."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()  # (N, 1, H, W) -> (N, C, H, W)
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)  # (N, 3, H, W) -> (N, 1, H, W)
    raise DatasetError.single(_PATH, f"'{source}' has {have}-channel images, which cannot give {channels} channels; "
                                     f"use a network with 1 or {have} input channels")


_CHUNK_BYTES = 1 << 26
"""Images processed at a time while loading (64 MB of float32), so a split at 224 px never exists twice over."""


def _chunks(images: Tensor, size: tuple[int, int]) -> range:
    per_image = images.shape[1] * size[0] * size[1] * 4
    return range(0, len(images), max(1, _CHUNK_BYTES // max(per_image, 1)))


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(N, C, h, w)`` to ``size``, antialiased when shrinking; in chunks written into the
    result, to bound memory."""
    if tuple(images.shape[-2:]) == size:
        return images
    shrink = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    out = images.new_empty(len(images), images.shape[1], *size)
    step = _chunks(images, size).step
    for i in _chunks(images, size):
        out[i:i + step] = F.interpolate(images[i:i + step], size=size, mode="bilinear", align_corners=False,
                                        antialias=shrink)
    return out


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over (N, H, W), summed in float64 a chunk at a time; a constant channel gets
    std 1."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    step = _chunks(images, tuple(images.shape[-2:])).step  # type: ignore[arg-type]
    for i in range(0, len(images), step):
        part = images[i:i + step].transpose(0, 1).reshape(channels, -1).double()
        total += part.sum(dim=1)
        squares += (part * part).sum(dim=1)
    count = max(images.numel() // max(channels, 1), 1)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _normalised(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel, as :data:`STORED`, a chunk at a time."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = torch.empty(images.shape, dtype=STORED)
    step = _chunks(images, tuple(images.shape[-2:])).step  # type: ignore[arg-type]
    for i in range(0, len(images), step):
        out[i:i + step] = (images[i:i + step].float() - m) / s
    return out
