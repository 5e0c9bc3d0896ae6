"""Build datasets in the reference implementation's format (NVlabs/edm ``dataset_tool.py``).

    python -m edm_lab.data.dataset_tool --source cifar-10-python.tar.gz --dest datasets/cifar10-32x32.zip
    python -m edm_lab.data.dataset_tool --source photos/ --dest datasets/photos-64.zip \\
        --transform center-crop --resolution 64

Sources: the CIFAR-10 python tarball (``cifar-10-python.tar.gz``: the training batches
``cifar-10-batches-py/data_batch_1..5``, labels 0-9), a folder of images (searched recursively;
labels from its dataset.json, else from the top-level sub-folder names when there are several),
or a .zip of images (labels from its dataset.json). Destination: a .zip (uncompressed; an existing
one is replaced, as the reference does, but only once the new one is complete) or a folder (which
must be absent or empty). Images are written as uncompressed PNGs named
``{idx // 1000:05d}/img{idx:08d}.png`` (idx = position in the source), plus ``dataset.json``
``{"labels": [[name, label], ...]}`` (``null`` unless every image has a label). Read the result
with ``edm_lab.data.image_folder.image_folder`` (or the reference's ImageFolderDataset).

The output appears atomically: it is built under a temporary sibling name and renamed into place
only when complete, so an interrupted or failed conversion never leaves a partial dataset at DEST.

The CIFAR-10 pickles are loaded with an unpickler that resolves only the numpy functions needed
to rebuild arrays, so a hostile tarball cannot run code.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from edm_lab.atomic import (
    TMP_PREFIX,
    TMP_SUFFIX,
    atomic_file,
    current_umask,
    fsync_dir,
)
from edm_lab.data.image_folder import (
    LABELS_FILE,
    decode_image,
    is_image_name,
    parse_labels_json,
)

TRANSFORMS = ("center-crop", "center-crop-wide")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = tuple(f"{CIFAR_DIR}/data_batch_{i}" for i in range(1, 6))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python tarball, loaded without executing anything from it.

def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 pickles (protocol < 3) store bytes as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], object]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]           # numpy.(_)core.multiarray._reconstruct
    scalar = np.int64(0).__reduce__()[0]                           # numpy.(_)core.multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]                   # numpy.(_)core.numeric._frombuffer
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spell the module differently
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds plain containers and numpy arrays, and refuses every other global."""

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are "
                                         "allowed in a CIFAR-10 batch") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id in a CIFAR-10 batch")


def safe_load_pickle(file, where: str):
    """pickle.load(file, encoding="bytes") restricted to numpy arrays and plain Python data."""
    try:
        return NumpyOnlyUnpickler(file, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise ValueError(f"{where}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc


def _batch_entry(batch: dict, key: str, where: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{where}: no {key!r} entry in the batch")


def load_cifar10(tarball: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The training images (N, 32, 32, 3) uint8 HWC and labels (N,) int64 of a CIFAR-10 python tarball.

    Reads ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` in order (the real archive has all
    five, 50,000 images; a smaller archive must hold a prefix of them). The test batch is not used.
    """
    images, labels = [], []
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(tarball, "r:*"))
        except (tarfile.TarError, OSError) as exc:
            raise ValueError(f"{tarball} is not a readable tar archive ({exc})") from exc
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        present = [name for name in CIFAR_BATCHES if name in members]
        if not present:
            raise ValueError(f"{tarball} holds no {CIFAR_BATCHES[0]}: not a CIFAR-10 python tarball")
        if present != list(CIFAR_BATCHES[:len(present)]):
            missing = next(n for n in CIFAR_BATCHES if n not in members)
            raise ValueError(f"{tarball}: {missing} is missing but later batches are present")
        for name in present:
            where = f"{tarball}:{name}"
            with tar.extractfile(members[name]) as fh:
                batch = safe_load_pickle(fh, where)
            if not isinstance(batch, dict):
                raise ValueError(f"{where}: expected a dict, got {type(batch).__name__}")  # noqa: TRY004
            data = _batch_entry(batch, "data", where)
            batch_labels = _batch_entry(batch, "labels", where)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{where}: 'data' must be a uint8 array (N, 3072), got "
                                 f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
            batch_labels = np.asarray(batch_labels)
            if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu":
                raise ValueError(f"{where}: 'labels' must be {len(data)} integers, got {batch_labels.dtype} "
                                 f"{batch_labels.shape}")
            if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() > 9):
                raise ValueError(f"{where}: labels must lie in 0..9")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
            labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------
# Sources: each yields (source name, uint8 image HxW or HxWxC, label or None).

@dataclass
class Source:
    count: int                                    # images that will be read (after max_images)
    items: Callable[[], Iterator[tuple[str, np.ndarray, object]]]


def _limit(n: int, max_images: int | None) -> int:
    return n if max_images is None else min(n, max_images)


def _json_labels(data: bytes, where: str, names: set[str]) -> dict[str, object] | None:
    pairs = parse_labels_json(data, where)
    if pairs is None:
        return None
    table = {}
    for fname, label in pairs:
        fname = fname.replace("\\", "/")
        if fname not in names:
            raise ValueError(f"{where} names {fname!r}, which is not an image of the source")
        table[fname] = label
    return table


def open_cifar10(tarball: str, max_images: int | None = None) -> Source:
    images, labels = load_cifar10(tarball)
    count = _limit(len(images), max_images)

    def items():
        for idx in range(count):
            yield f"{tarball}[{idx}]", images[idx], int(labels[idx])
    return Source(count, items)


def open_image_folder(folder: str, max_images: int | None = None) -> Source:
    """Images under `folder` (recursive, in path order); labels from dataset.json, else top-level folders."""
    root = Path(folder)
    files = [p for p in root.rglob("*") if p.is_file() and is_image_name(p.name)]
    files.sort(key=lambda p: p.relative_to(root).parts)  # the reference sorts Path objects: part by part
    rel = {p: p.relative_to(root).as_posix() for p in files}
    meta = root / LABELS_FILE
    if meta.is_file():
        # Deviation from the reference: a dataset.json with "labels": null means "no labels" here, where
        # the reference falls back to folder names (bogus classes 00000, 00001... for its own output).
        labels = _json_labels(meta.read_bytes(), str(meta), set(rel.values())) or {}
    else:
        tops = {name: name.split("/")[0] if "/" in name else "" for name in rel.values()}
        classes = {top: i for i, top in enumerate(sorted(set(tops.values())))}
        labels = {name: classes[top] for name, top in tops.items()} if len(classes) > 1 else {}
    count = _limit(len(files), max_images)

    def items():
        for path in files[:count]:
            yield str(path), decode_image(path.read_bytes(), str(path)), labels.get(rel[path])
    return Source(count, items)


def open_image_zip(archive: str, max_images: int | None = None) -> Source:
    """Images in a .zip (in name order); labels from its dataset.json."""
    try:
        with zipfile.ZipFile(archive) as z:
            all_names = set(z.namelist())
            names = sorted(n for n in all_names if is_image_name(n) and not n.endswith("/"))
            labels = {}
            if LABELS_FILE in all_names:
                labels = _json_labels(z.read(LABELS_FILE), f"{archive}:{LABELS_FILE}", set(names)) or {}
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{archive} is not a readable zip file ({exc})") from exc
    count = _limit(len(names), max_images)

    def items():
        with zipfile.ZipFile(archive) as z:
            for name in names[:count]:
                where = f"{archive}:{name}"
                try:
                    data = z.read(name)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise ValueError(f"{where}: cannot read file ({exc})") from exc
                yield where, decode_image(data, where), labels.get(name)
    return Source(count, items)


def open_source(source: str, max_images: int | None = None) -> Source:
    """Pick the reader for `source` (folder, .zip, or CIFAR-10 tarball)."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    path = Path(source)
    if path.is_dir():
        return open_image_folder(source, max_images)
    if not path.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if path.suffix.lower() == ".zip":
        return open_image_zip(source, max_images)
    if path.name == "cifar-10-python.tar.gz" or tarfile.is_tarfile(source):
        return open_cifar10(source, max_images)
    raise ValueError(f"source {source}: unknown type (expected a folder, a .zip of images or "
                     "cifar-10-python.tar.gz)")


# ---------------------------------------------------------------------------------------------
# Crop and resize, defined as in the reference tool.

def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))


def _to_rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img


def make_transform(transform: str | None, width: int | None, height: int | None
                   ) -> Callable[[np.ndarray], np.ndarray | None]:
    """The per-image transform: None = resize to width x height (LANCZOS) when given and different;
    "center-crop" = the largest centered square, as RGB, resized to width x height;
    "center-crop-wide" = the reference's wide crop (rows cropped, resized to width x height, centered on
    a black width x width canvas; images narrower than width are skipped: the transform returns None).

    center-crop-wide keeps the reference's exact arithmetic, including its known distortion: it crops
    round(width * H / W) rows of the *source* image (NVlabs/stylegan2-ada-pytorch issue #47).
    """
    if transform is None:
        def scale(img):
            h, w = img.shape[:2]
            if width is None or (width == w and height == h):
                return img
            return _resize(img, width, height)
        return scale
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if width is None or height is None:
        raise ValueError(f"--transform={transform} needs --resolution")
    if transform == "center-crop":
        def center_crop(img):
            h, w = img.shape[:2]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            return _resize(_to_rgb(img[top:top + side, left:left + side]), width, height)
        return center_crop
    if height > width:
        raise ValueError(f"--transform=center-crop-wide needs width >= height, got {width}x{height}")

    def center_crop_wide(img):
        h, w = img.shape[:2]
        rows = round(width * h / w)
        if w < width or rows < height:
            return None
        top = (h - rows) // 2
        strip = _resize(_to_rgb(img[top:top + rows]), width, height)
        canvas = np.zeros((width, width, 3), dtype=np.uint8)
        offset = (width - height) // 2
        canvas[offset:offset + height] = strip
        return canvas
    return center_crop_wide


# ---------------------------------------------------------------------------------------------
# Atomic destinations.

@contextlib.contextmanager
def _staged_zip(dest: Path):
    """A ZipFile streamed into `atomic_file(dest)`: it replaces `dest` only once complete."""
    with atomic_file(dest) as fh, zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED) as zf:
        yield lambda name, data: zf.writestr(name, data)


@contextlib.contextmanager
def _staged_folder(dest: Path):
    """Files written into a temp folder beside `dest`, made durable, then renamed to `dest` on success.

    Nobody reads the temp folder, so its files are plain writes (a per-file atomic_write_bytes costs
    ~2.5 ms each: two minutes for CIFAR-10); one flush of everything precedes the rename.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"--dest {dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=TMP_PREFIX + dest.name + ".", suffix=TMP_SUFFIX))
    written: list[Path] = []
    folders: set[Path] = set()

    def write(name: str, data: bytes) -> None:
        path = tmp / name
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        with open(path, "wb") as fh:
            fh.write(data)
        written.append(path)

    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield write
        _flush(tmp, written)
        try:
            os.replace(tmp, dest)  # replaces an empty folder; fails if something appeared there meanwhile
        except OSError as exc:
            raise ValueError(f"cannot move the finished dataset to {dest} ({exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)


def _flush(folder: Path, files: list[Path]) -> None:
    """Make the files (and their folders) durable before the rename that publishes them."""
    if hasattr(os, "sync"):
        os.sync()  # one call instead of one fsync per file
        return
    for path in [*files, *{p.parent for p in files}, folder]:
        fsync_dir(path) if path.is_dir() else _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _png_bytes(img: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mode = "L" if img.ndim == 2 else "RGB"
    PIL.Image.fromarray(img, mode).save(buffer, format="png", compress_level=0, optimize=False)
    return buffer.getvalue()


def archive_name(idx: int) -> str:
    """The reference's name of image number idx: 00000/img00000000.png."""
    return f"{idx // 1000:05d}/img{idx:08d}.png"


# ---------------------------------------------------------------------------------------------

def convert_dataset(source: str, dest: str, resolution: int | tuple[int, int] | None = None,
                    transform: str | None = None, max_images: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert `source` into the reference format at `dest` (.zip or folder); return a summary dict.

    resolution: R (R x R) or (width, height); the output must be square with a power-of-two side.
    The summary has images, resolution, channels, labels (bool), num_classes, skipped, dest.
    """
    if not str(dest):
        raise ValueError("--dest must not be empty")
    width, height = (resolution, resolution) if isinstance(resolution, int) else (resolution or (None, None))
    transform_image = make_transform(transform, width, height)
    src = open_source(str(source), max_images)
    dest_path = Path(dest)
    to_zip = dest_path.suffix.lower() == ".zip"
    if to_zip and dest_path.is_dir():
        raise ValueError(f"--dest {dest} is a folder")
    staged = _staged_zip(dest_path) if to_zip else _staged_folder(dest_path)

    attrs = None
    labels: list = []
    skipped = 0
    with staged as write:
        for idx, (where, img, label) in enumerate(src.items()):
            out = transform_image(img)
            if out is None:
                skipped += 1
                continue
            name = archive_name(idx)
            cur = {"width": out.shape[1], "height": out.shape[0], "channels": out.shape[2] if out.ndim == 3 else 1}
            if attrs is None:
                attrs = cur
                if cur["width"] != cur["height"]:
                    raise ValueError(f"{where}: images must be square after crop and resize, got "
                                     f"{cur['width']}x{cur['height']} (use --resolution / --transform)")
                if cur["channels"] not in (1, 3):
                    raise ValueError(f"{where}: images must be RGB or grayscale, got {cur['channels']} channels")
                if cur["width"] & (cur["width"] - 1):
                    raise ValueError(f"{where}: the side after crop and resize must be a power of two, "
                                     f"got {cur['width']} (use --resolution)")
            elif cur != attrs:
                diff = ", ".join(f"{k} {attrs[k]} vs {cur[k]}" for k in attrs if attrs[k] != cur[k])
                raise ValueError(f"{where} (-> {name}): all images must have the same size and channels "
                                 f"after crop and resize ({diff}); use --resolution / --transform")
            write(name, _png_bytes(out))
            labels.append(None if label is None else [name, label])
            if progress is not None:
                progress(idx + 1, src.count)
        if attrs is None:
            raise ValueError(f"no image of {source} survived the transform" if skipped
                             else f"no image files found in {source}")
        has_labels = all(entry is not None for entry in labels)
        write(LABELS_FILE, json.dumps({"labels": labels if has_labels else None}).encode("utf-8"))

    int_labels = [e[1] for e in labels if has_labels and isinstance(e[1], int)]
    return {"images": len(labels), "resolution": attrs["width"], "channels": attrs["channels"],
            "labels": has_labels, "num_classes": max(int_labels) + 1 if int_labels else 0,
            "skipped": skipped, "dest": str(dest_path)}


def _parse_resolution(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected R or WxH, got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edm_lab.data.dataset_tool",
                                     description="Convert CIFAR-10 or an image folder/zip into the reference "
                                                 "dataset format (PNG zip or folder + dataset.json).")
    parser.add_argument("--source", required=True, help="cifar-10-python.tar.gz, an image folder, or a .zip")
    parser.add_argument("--dest", required=True, help="output .zip or (empty/absent) folder")
    parser.add_argument("--resolution", type=_parse_resolution, help="output size: R or WxH")
    parser.add_argument("--transform", choices=TRANSFORMS, help="crop before resizing (needs --resolution)")
    parser.add_argument("--max-images", type=int, help="convert only the first N source images")
    args = parser.parse_args(argv)

    def progress(done: int, total: int) -> None:
        if done == total or done % 5000 == 0:
            print(f"  {done}/{total} images", file=sys.stderr, flush=True)

    try:
        summary = convert_dataset(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                                  max_images=args.max_images, progress=progress)
    except (ValueError, OSError) as exc:
        print(f"dataset_tool: error: {exc}", file=sys.stderr)
        return 1
    labels = f"yes ({summary['num_classes']} classes)" if summary["labels"] else "no"
    skipped = f", {summary['skipped']} skipped" if summary["skipped"] else ""
    print(f"wrote {summary['images']} images{skipped} to {summary['dest']}: "
          f"{summary['resolution']}x{summary['resolution']}, {summary['channels']} channel(s), labels: {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
