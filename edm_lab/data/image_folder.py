"""Datasets in the reference implementation's format: a folder or a .zip of images (+ dataset.json).

The layout is the one NVlabs/edm's ``dataset_tool.py`` writes and its ``ImageFolderDataset`` reads
(and what ``python -m edm_lab.data.dataset_tool`` writes here)::

    00000/img00000000.png
    00000/img00000001.png
    ...
    dataset.json            {"labels": [["00000/img00000000.png", 6], ...]}   or {"labels": null}

Every file whose extension PIL knows is an image; images are ordered by their relative path
(plain string order, with "/" separators, as the reference does), and labels are looked up in
``dataset.json`` by that path.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Self

import numpy as np
import PIL.Image
import torch

from edm_lab.data.datasets import ArrayDataset

LABELS_FILE = "dataset.json"
MAX_SIZE_SEED = 0  # the reference's default `random_seed`, used when it applies max_size


def is_image_name(name: str) -> bool:
    """True for a file name whose extension PIL can decode (the reference's test)."""
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one image file to uint8 HxW (grayscale) or HxWx3 (RGB); ValueError naming `where`.

    Grayscale ("L", bilevel "1") stays one channel and RGB three; palette and CMYK/YCbCr images are
    converted to RGB. Images with an alpha channel or more than 8 bits per sample are refused (the
    reference's tool accepts only RGB or grayscale).
    """
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "1":
                img = img.convert("L")
            elif mode in ("P", "CMYK", "YCbCr", "LAB", "HSV") and "transparency" not in img.info:
                img = img.convert("RGB")
            elif mode not in ("L", "RGB"):
                raise ValueError(f"image mode {mode!r} is not supported: store images as RGB or 8-bit grayscale "
                                 "(no alpha channel)")
            array = np.asarray(img, dtype=np.uint8).copy()
    except PIL.UnidentifiedImageError as exc:
        raise ValueError(f"{where}: cannot decode image (not a recognised image format, or corrupt)") from exc
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError...
        raise ValueError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return array


class _Source:
    """Read access to the files of a dataset folder or zip, by relative '/'-separated name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if not self.path.exists():
            raise FileNotFoundError(f"dataset path {self.path} does not exist")
        if self.path.is_dir():
            names = set()
            for root, _dirs, files in os.walk(self.path):
                for fname in files:
                    names.add(os.path.relpath(os.path.join(root, fname), self.path).replace(os.sep, "/"))
            self.names = names
        elif self.path.suffix.lower() == ".zip":
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ValueError(f"dataset {self.path} is not a readable zip file ({exc})") from exc
            self.names = {n for n in self._zip.namelist() if not n.endswith("/")}
        else:
            raise ValueError(f"dataset path {self.path} must be a folder or a .zip file")

    def where(self, name: str) -> str:
        return f"{self.path}/{name}" if self._zip is None else f"{self.path}:{name}"

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"{self.where(name)}: cannot read file ({exc})") from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_labels_json(data: bytes, where: str) -> list | None:
    """The `labels` entry of a dataset.json: a list of [name, label] pairs, or None."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f'{where} must be a JSON object with a "labels" entry ({{"labels": [[name, label], ...]}} '
                         "or {\"labels\": null})")
    labels = meta["labels"]
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                               for e in labels):
        raise ValueError(f'{where}: "labels" must be null or a list of [file name, label] pairs')
    return labels


def _class_labels(pairs: list, image_names: list[str], all_names: set[str], where: str) -> np.ndarray:
    """Integer class labels in the order of image_names; every pair must name an existing image."""
    table: dict[str, int] = {}
    for fname, label in pairs:
        fname = fname.replace("\\", "/")
        if fname not in all_names:
            raise ValueError(f"{where} names {fname!r}, which is not a file of the dataset")
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(  # noqa: TRY004 - a data-format error, like the others here
                f"{where}: label of {fname!r} is {label!r}; only integer class labels are supported")
        if label < 0:
            raise ValueError(f"{where}: label of {fname!r} is negative ({label})")
        table[fname] = label
    missing = [n for n in image_names if n not in table]
    if missing:
        raise ValueError(f"{where} has no label for {missing[0]!r}" + (f" (and {len(missing) - 1} more images)"
                                                                       if len(missing) > 1 else ""))
    return np.array([table[n] for n in image_names], dtype=np.int64)


def select_max_size(count: int, max_size: int | None, seed: int = MAX_SIZE_SEED) -> np.ndarray:
    """Indices kept by `max_size`: a seeded random subset in ascending order, as the reference picks it."""
    indices = np.arange(count, dtype=np.int64)
    if max_size is None or count <= max_size:
        return indices
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    np.random.RandomState(seed % (1 << 31)).shuffle(indices)
    return np.sort(indices[:max_size])


def image_folder(path: str, use_labels: bool = True, resolution: int | None = None, max_size: int | None = None,
                 name: str | None = None) -> ArrayDataset:
    """Load a dataset folder or .zip in the reference layout into memory, scaled to [-1, 1].

    Everything is decoded into one uint8 tensor (n, C, H, W) that stays uint8 (``ArrayDataset.raw``:
    CIFAR-10 0.15 GB, ImageNet-64 1.28M x 3 x 64 x 64 = 15.7 GB); items and batches are converted to
    float32 ``x / 127.5 - 1`` when read (``sample_batch``). Reading ``.samples`` materialises the
    whole float32 copy (four times that memory), which only the small-data paths do. Images are
    taken in sorted relative-path order; all must have the same square shape (grayscale = 1
    channel, RGB = 3). `use_labels` reads integer class labels from dataset.json (none if it is
    absent or holds ``"labels": null``); num_classes = max label + 1. `resolution` only checks
    that the files have it. `max_size` keeps a random subset of that many images (ascending
    order), the same subset the reference picks (seed 0). `name` defaults to the file or folder
    name without extension.
    """
    with _Source(path) as source:
        image_names = sorted(n for n in source.names if is_image_name(n))
        if not image_names:
            raise ValueError(f"no image files found in {source.path}")
        labels = None
        if use_labels and LABELS_FILE in source.names:
            where = source.where(LABELS_FILE)
            pairs = parse_labels_json(source.read(LABELS_FILE), where)
            if pairs is not None:
                labels = _class_labels(pairs, image_names, source.names, where)
        keep = select_max_size(len(image_names), max_size)

        pixels: np.ndarray | None = None  # uint8 (n, C, H, W): kept as is, a quarter of float32
        first_shape = None
        for out_idx, raw_idx in enumerate(keep.tolist()):
            fname = image_names[raw_idx]
            where = source.where(fname)
            array = decode_image(source.read(fname), where)
            image = (array[:, :, None] if array.ndim == 2 else array).transpose(2, 0, 1)  # HWC -> CHW
            shape = image.shape
            if first_shape is None:
                first_shape = shape
                if shape[1] != shape[2]:
                    raise ValueError(f"{where}: images must be square, got {shape[2]}x{shape[1]} (width x height)")
                if resolution is not None and shape[1] != resolution:
                    raise ValueError(f"{where}: images are {shape[1]}x{shape[2]}, but resolution={resolution} was "
                                     "asked for (convert with python -m edm_lab.data.dataset_tool --resolution)")
                pixels = np.empty((len(keep), *shape), dtype=np.uint8)
            elif shape != first_shape:
                raise ValueError(f"{where}: shape (C, H, W) = {shape} differs from {first_shape} of "
                                 f"{image_names[int(keep[0])]}; all images must share one shape")
            pixels[out_idx] = image

    assert pixels is not None
    kept_labels = None if labels is None else torch.from_numpy(labels[keep])
    num_classes = 0 if labels is None else int(labels.max()) + 1
    if name is None:
        name = os.path.splitext(os.path.basename(os.path.normpath(str(path))))[0]
    return ArrayDataset(name, None, kept_labels, num_classes=num_classes, raw=torch.from_numpy(pixels))
