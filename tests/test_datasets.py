"""Reference-format datasets: dataset_tool (CIFAR-10 tarball / image folder -> zip or folder),
image_folder (reading them back), ImageDataModule (training batches) and the Hydra data option.

Every input is built here, in the real formats: a CIFAR-10 python tarball whose batches are
Python-2-style pickles (as in the published archive), PNG folders and zips.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edm_lab.data import dataset_tool
from edm_lab.data.datamodule import ImageDataModule
from edm_lab.data.dataset_tool import archive_name, convert_dataset, load_cifar10, main
from edm_lab.data.datasets import ArrayDataset
from edm_lab.data.image_folder import image_folder
from tests.conftest import PROJECT_ROOT

CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# ---------------------------------------------------------------------------------------------
# Builders of real-format inputs.

class _Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), numpy under numpy.core: like the real archive."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        head = (pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256
                else pickle.BINSTRING + struct.pack("<i", len(data)))
        self.write(head + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar_tarball(folder: Path, num_batches: int = 2, per_batch: int = 5, seed: int = 0,
                       replace: dict[str, bytes] | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    """cifar-10-python.tar.gz with data_batch_1..num_batches, test_batch and batches.meta.

    Returns the path, the training images (N, 32, 32, 3) uint8 and labels (N,).
    """
    rng = np.random.default_rng(seed)
    path = folder / "cifar-10-python.tar.gz"
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta",
             py2_pickle({"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}))
        for b in range(1, num_batches + 1):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            data[0, 0], data[0, 1] = 0, 255  # the full range, as every real batch has
            batch_labels = [int(x) for x in (np.arange(per_batch) + b * 3) % 10]
            name = f"cifar-10-batches-py/data_batch_{b}"
            payload = py2_pickle({"batch_label": f"training batch {b} of 5", "labels": batch_labels, "data": data,
                                  "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]})
            _add(tar, name, (replace or {}).get(name, payload))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels)
        test = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        _add(tar, "cifar-10-batches-py/test_batch",
             py2_pickle({"batch_label": "testing batch 1 of 1", "labels": [0] * per_batch, "data": test,
                         "filenames": ["t.png"] * per_batch}))
        _add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    return path, np.concatenate(images), np.concatenate(labels).astype(np.int64)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)
    return path


def as_model_input(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the way the datasets must scale."""
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


@pytest.fixture
def cifar(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return make_cifar_tarball(src)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 -> zip / folder -> image_folder

def test_reads_py2_style_cifar_batches(cifar):
    path, images, labels = cifar
    got_images, got_labels = load_cifar10(path)
    assert got_images.shape == (10, 32, 32, 3) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("dest_name", ["cifar10-32x32.zip", "cifar10-32x32"])
def test_cifar_roundtrip_is_pixel_exact(cifar, tmp_path, dest_name):
    path, images, labels = cifar
    dest = tmp_path / "out" / dest_name
    summary = convert_dataset(str(path), str(dest))
    assert summary == {"images": 10, "resolution": 32, "channels": 3, "labels": True,
                       "num_classes": int(labels.max()) + 1, "skipped": 0, "dest": str(dest)}

    names = [archive_name(i) for i in range(10)]
    assert names[0] == "00000/img00000000.png" and archive_name(12345) == "00012/img00012345.png"
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest) as z:
            assert sorted(z.namelist()) == sorted([*names, "dataset.json"])
            assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
            meta = json.loads(z.read("dataset.json"))
            first = PIL.Image.open(io.BytesIO(z.read(names[0])))
    else:
        files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        assert files == sorted([*names, "dataset.json"])
        meta = json.loads((dest / "dataset.json").read_text())
        first = PIL.Image.open(dest / names[0])
    assert meta == {"labels": [[n, int(lab)] for n, lab in zip(names, labels)]}
    assert first.format == "PNG" and first.mode == "RGB" and first.size == (32, 32)

    data = image_folder(str(dest))
    assert isinstance(data, ArrayDataset) and data.name == "cifar10-32x32"
    assert data.samples.dtype == torch.float32 and data.sample_shape == (3, 32, 32) and data.is_image
    assert torch.equal(data.samples, as_model_input(images))
    back = ((data.samples + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, images)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert data.num_classes == int(labels.max()) + 1

    unlabeled = image_folder(str(dest), use_labels=False, name="plain")
    assert unlabeled.labels is None and unlabeled.num_classes == 0 and unlabeled.name == "plain"
    assert image_folder(str(dest), resolution=32).fingerprint == data.fingerprint


def test_max_size_picks_the_references_subset(cifar, tmp_path):
    path, images, labels = cifar
    dest = tmp_path / "ds.zip"
    convert_dataset(str(path), str(dest))
    data = image_folder(str(dest), max_size=4)
    order = np.arange(10)
    np.random.RandomState(0).shuffle(order)
    keep = np.sort(order[:4])
    assert torch.equal(data.samples, as_model_input(images[keep]))
    assert data.labels.tolist() == labels[keep].tolist()
    assert data.num_classes == int(labels.max()) + 1  # from all labels, as the reference's label_shape
    assert len(image_folder(str(dest), max_size=50)) == 10


def test_cli_writes_and_summarises(cifar, tmp_path, capsys):
    path, images, _ = cifar
    dest = tmp_path / "small.zip"
    assert main(["--source", str(path), "--dest", str(dest), "--max-images", "3", "--resolution", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 images" in out and "16x16" in out and "3 channel" in out and "labels: yes" in out
    data = image_folder(str(dest), resolution=16)
    expected = np.stack([np.asarray(PIL.Image.fromarray(im).resize((16, 16), PIL.Image.Resampling.LANCZOS))
                         for im in images[:3]])
    assert torch.equal(data.samples, as_model_input(expected))

    assert main(["--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "x.zip")]) == 1
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.zip").exists()


def test_module_entry_point(cifar, tmp_path):
    path, _, _ = cifar
    dest = tmp_path / "folder-out"
    proc = subprocess.run([sys.executable, "-m", "edm_lab.data.dataset_tool", "--source", str(path), "--dest",
                           str(dest)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "10 images" in proc.stdout and "labels: yes" in proc.stdout
    assert len(image_folder(str(dest))) == 10


# ---------------------------------------------------------------------------------------------
# Image folders: crop, resize, labels

def _lanczos(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(img).resize(size, PIL.Image.Resampling.LANCZOS))


def test_image_folder_center_crop_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(30, 41, 3), dtype=np.uint8)   # H x W: wide, odd margin
    gray = rng.integers(0, 256, size=(24, 20), dtype=np.uint8)     # tall grayscale
    src = tmp_path / "photos"
    save_png(src / "cats" / "a.png", rgb)
    save_png(src / "dogs" / "b.png", gray)
    (src / "notes.txt").write_text("not an image")

    dest = tmp_path / "photos16.zip"
    summary = convert_dataset(str(src), str(dest), resolution=16, transform="center-crop")
    assert summary["images"] == 2 and summary["channels"] == 3 and summary["labels"]

    top = (30 - 30) // 2, (41 - 30) // 2
    want_rgb = _lanczos(rgb[top[0]:top[0] + 30, top[1]:top[1] + 30], (16, 16))
    want_gray = _lanczos(np.repeat(gray[2:22, :, None], 3, axis=2), (16, 16))   # grayscale becomes RGB
    data = image_folder(str(dest))
    assert torch.equal(data.samples, as_model_input(np.stack([want_rgb, want_gray])))
    assert data.labels.tolist() == [0, 1] and data.num_classes == 2  # top-level folder names, sorted


def test_image_folder_resize_keeps_grayscale_and_json_labels(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "gray"
    imgs = [rng.integers(0, 256, size=(8, 8), dtype=np.uint8) for _ in range(3)]
    for i, img in enumerate(imgs):
        save_png(src / f"{i}.png", img)
    (src / "dataset.json").write_text(json.dumps({"labels": [["0.png", 2], ["1.png", 0], ["2.png", 5]]}))
    dest = tmp_path / "gray4"
    summary = convert_dataset(str(src), str(dest), resolution=4)
    assert summary["channels"] == 1 and summary["num_classes"] == 6
    data = image_folder(str(dest))
    assert data.sample_shape == (1, 4, 4)
    want = np.stack([_lanczos(img, (4, 4)) for img in imgs])[..., None]
    assert torch.equal(data.samples, as_model_input(want))
    assert data.labels.tolist() == [2, 0, 5] and data.num_classes == 6

    # A zip source converts again, its labels kept; without --resolution the pixels are untouched.
    again = tmp_path / "again.zip"
    convert_dataset(str(tmp_path / "gray4"), str(tmp_path / "gray4.zip"))
    convert_dataset(str(tmp_path / "gray4.zip"), str(again))
    assert image_folder(str(again)).fingerprint.split("-")[-1] == data.fingerprint.split("-")[-1]


def test_center_crop_wide_follows_the_reference(tmp_path):
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    narrow = rng.integers(0, 256, size=(20, 10, 3), dtype=np.uint8)
    src = tmp_path / "wide"
    save_png(src / "a.png", wide)
    save_png(src / "b.png", narrow)     # narrower than the output width: skipped, as the reference does
    save_png(src / "c.png", wide[::-1].copy())
    dest = tmp_path / "wide.zip"
    summary = convert_dataset(str(src), str(dest), resolution=(16, 8), transform="center-crop-wide")
    assert summary["images"] == 2 and summary["skipped"] == 1 and summary["resolution"] == 16
    with zipfile.ZipFile(dest) as z:  # the numbering keeps the source positions
        assert sorted(n for n in z.namelist() if n.endswith(".png")) == [archive_name(0), archive_name(2)]
    rows = round(16 * 20 / 40)
    top = (20 - rows) // 2
    canvas = np.zeros((16, 16, 3), dtype=np.uint8)
    canvas[4:12] = _lanczos(wide[top:top + rows], (16, 8))
    assert torch.equal(image_folder(str(dest), use_labels=False).samples[0], as_model_input(canvas[None])[0])


# ---------------------------------------------------------------------------------------------
# Safety, errors, atomicity

class _Hostile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # creates the marker file when unpickled


def test_hostile_pickle_is_refused_without_running(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Hostile(proof), protocol=2))  # the payload does run under plain pickle
    assert proof.exists()

    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    payload = pickle.dumps({b"data": _Hostile(marker), b"labels": [0]}, protocol=2)
    path, _, _ = make_cifar_tarball(src, replace={"cifar-10-batches-py/data_batch_2": payload})
    dest = tmp_path / "out.zip"
    with pytest.raises(ValueError, match=r"data_batch_2.*refusing to load global (io|builtins)\.open"):
        convert_dataset(str(path), str(dest))
    assert not marker.exists() and not dest.exists()

    for module, name in [("numpy", "load"), ("os", "system"), ("numpy.core.multiarray", "_reconstruct_x")]:
        with pytest.raises(pickle.UnpicklingError):
            dataset_tool.NumpyOnlyUnpickler(io.BytesIO(b"")).find_class(module, name)


def _corrupt_png(path: Path) -> Path:
    save_png(path, np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated inside the image data (IDAT)
    return path


def test_reader_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        image_folder(str(tmp_path / "missing-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found in .*empty"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="folder or a .zip"):
        image_folder(str(tmp_path / "x.txt"))

    bad = tmp_path / "corrupt"
    save_png(bad / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _corrupt_png(bad / "b.png")
    with pytest.raises(ValueError, match=r"corrupt/b\.png.*cannot decode"):
        image_folder(str(bad))
    with zipfile.ZipFile(tmp_path / "corrupt.zip", "w") as z:
        z.write(bad / "b.png", "00000/img00000000.png")
    with pytest.raises(ValueError, match=r"corrupt\.zip:00000/img00000000\.png"):
        image_folder(str(tmp_path / "corrupt.zip"))

    mixed = tmp_path / "mixed"
    save_png(mixed / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    save_png(mixed / "b.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mixed/b\.png.*\(1, 8, 8\) differs from \(3, 8, 8\)"):
        image_folder(str(mixed))
    save_png(tmp_path / "rect" / "a.png", np.zeros((8, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"rect/a\.png.*square"):
        image_folder(str(tmp_path / "rect"))
    with pytest.raises(ValueError, match="resolution=16"):
        image_folder(str(tmp_path / "mixed"), resolution=16)
    save_png(tmp_path / "alpha" / "a.png", np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"alpha/a\.png.*'RGBA'"):
        image_folder(str(tmp_path / "alpha"))

    labelled = tmp_path / "labelled"
    save_png(labelled / "a.png", np.zeros((4, 4), dtype=np.uint8))
    save_png(labelled / "b.png", np.zeros((4, 4), dtype=np.uint8))
    meta = labelled / "dataset.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match=r"labelled/dataset\.json is not valid JSON"):
        image_folder(str(labelled))
    assert image_folder(str(labelled), use_labels=False).labels is None  # labels unused: the file is not read
    meta.write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["c.png", 1]]}))
    with pytest.raises(ValueError, match=r"dataset\.json names 'c\.png'"):
        image_folder(str(labelled))
    meta.write_text(json.dumps({"labels": [["a.png", 0]]}))
    with pytest.raises(ValueError, match=r"dataset\.json has no label for 'b\.png'"):
        image_folder(str(labelled))
    meta.write_text(json.dumps({"labels": None}))
    assert image_folder(str(labelled)).labels is None
    meta.write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 3]]}))
    assert image_folder(str(labelled)).num_classes == 4


def test_tool_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_dataset(str(tmp_path / "nowhere"), str(tmp_path / "o.zip"))
    mixed = tmp_path / "mixed"
    save_png(mixed / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    save_png(mixed / "b.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mixed/b\.png.*width 8 vs 4"):
        convert_dataset(str(mixed), str(tmp_path / "o.zip"))
    with pytest.raises(ValueError, match="power of two"):
        convert_dataset(str(mixed), str(tmp_path / "o.zip"), resolution=12)
    with pytest.raises(ValueError, match="needs --resolution"):
        convert_dataset(str(mixed), str(tmp_path / "o.zip"), transform="center-crop")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_dataset(str(mixed), str(busy), resolution=4)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "data.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="unknown type"):
        convert_dataset(str(tmp_path / "data.bin"), str(tmp_path / "o.zip"))
    assert not (tmp_path / "o.zip").exists()


@pytest.mark.parametrize("dest_name", ["out.zip", "out"])
def test_interrupted_conversion_leaves_no_dest(cifar, tmp_path, monkeypatch, dest_name):
    path, _, _ = cifar
    parent = tmp_path / "dest-parent"
    parent.mkdir()
    dest = parent / dest_name
    real = dataset_tool._png_bytes
    calls = []

    def failing(img):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a user's Ctrl-C mid-conversion
        return real(img)

    monkeypatch.setattr(dataset_tool, "_png_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(str(path), str(dest))
    assert list(parent.iterdir()) == []  # neither DEST nor temp debris

    # A failing rerun does not touch an earlier good result either.
    monkeypatch.setattr(dataset_tool, "_png_bytes", real)
    convert_dataset(str(path), str(dest), max_images=2)
    before = image_folder(str(dest)).fingerprint
    if dest.is_dir():
        import shutil
        shutil.rmtree(dest)
        dest.mkdir()  # an empty folder is a valid destination, and stays empty after a failure
    calls.clear()
    monkeypatch.setattr(dataset_tool, "_png_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(str(path), str(dest))
    assert sorted(p.name for p in parent.iterdir()) == [dest_name]
    if dest.is_dir():
        assert list(dest.iterdir()) == []
    else:
        assert image_folder(str(dest)).fingerprint == before


def test_corrupt_source_image_fails_cleanly(tmp_path):
    src = tmp_path / "src"
    save_png(src / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _corrupt_png(src / "b.png")
    with pytest.raises(ValueError, match=r"src/b\.png"):
        convert_dataset(str(src), str(tmp_path / "out.zip"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------------------------
# ImageDataModule

def _indexed_dataset(n: int = 12, classes: int = 5, labels: bool = True) -> ArrayDataset:
    """Image i is constant i / 100 except for one marker pixel at its top-left (to see mirroring)."""
    samples = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 4, 4).clone() / 100
    samples[:, :, 0, 0] = -1
    lab = torch.arange(n) % classes if labels else None
    return ArrayDataset("indexed", samples, lab, num_classes=classes if labels else 0)


def _index_of(images: torch.Tensor) -> torch.Tensor:
    return (images[:, 0, 1, 1] * 100).round().to(torch.int64)


def test_datamodule_batches_and_one_hot_labels():
    data = _indexed_dataset()
    dm = ImageDataModule(data, batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 2, 4, 4) and images.dtype == torch.float32
    assert labels.shape == (4, 5) and labels.dtype == torch.float32 and dm.label_dim == 5
    seen = torch.cat([_index_of(b[0]) for b in batches])
    assert sorted(seen.tolist()) == list(range(12))  # one epoch covers each image once
    for images, labels in batches:
        assert torch.equal(labels.sum(1), torch.ones(4))
        assert torch.equal(labels.argmax(1), _index_of(images) % 5)

    unlabeled = ImageDataModule(_indexed_dataset(labels=False), batch_size=5, drop_last=False)
    sizes = [(tuple(x.shape), tuple(y.shape)) for x, y in unlabeled.train_dataloader()]
    assert sizes == [((5, 2, 4, 4), (5, 0)), ((5, 2, 4, 4), (5, 0)), ((2, 2, 4, 4), (2, 0))]


def test_datamodule_seeded_shuffling_is_reproducible():
    data = _indexed_dataset(n=32)

    def order(seed, epochs=2):
        loader = ImageDataModule(data, batch_size=8, seed=seed).train_dataloader()
        return [_index_of(x).tolist() for _ in range(epochs) for x, _ in loader]

    first = order(0)
    assert first == order(0)
    assert first[:4] != first[4:]      # a new permutation each epoch
    assert first != order(1)
    assert sorted(i for batch in first[:4] for i in batch) == list(range(32))


def test_datamodule_xflip_doubles_with_mirrors():
    data = _indexed_dataset(n=6)
    dm = ImageDataModule(data, batch_size=4, xflip=True, drop_last=False)
    view = dm.train_set
    assert len(view) == 12
    for i in range(6):
        x, y = view[i]
        fx, fy = view[6 + i]
        assert torch.equal(x, data.samples[i]) and torch.equal(fx, data.samples[i].flip(-1))
        assert fx[0, 0, 3] == -1 and fx[0, 0, 0] != -1 and torch.equal(y, fy)
    images = torch.cat([x for x, _ in dm.train_dataloader()])
    assert len(images) == 12 and (images[:, 0, 0, 0] == -1).sum() == 6 and (images[:, 0, 0, 3] == -1).sum() == 6
    with pytest.raises(ValueError, match="xflip needs an image dataset"):
        ImageDataModule(ArrayDataset("flat", torch.zeros(4, 2)), batch_size=2, xflip=True)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ImageDataModule(data, batch_size=7).train_dataloader()


def test_datamodule_workers_and_distributed_sampler():
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    data = _indexed_dataset(n=16)
    loader = ImageDataModule(data, batch_size=4, num_workers=2).train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    assert not ImageDataModule(data, batch_size=4).train_dataloader().persistent_workers

    # What Lightning does under DDP (use_distributed_sampler): rebuild the loader with a DistributedSampler.
    plain = ImageDataModule(data, batch_size=4).train_dataloader()
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(plain.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        rebuilt = _update_dataloader(plain, sampler)
        assert rebuilt.batch_size == 4 and rebuilt.drop_last
        shards.append(torch.cat([_index_of(x) for x, _ in rebuilt]).tolist())
    assert sorted(shards[0] + shards[1]) == list(range(16))


def test_datamodule_trains_with_lightning(tmp_path):
    import lightning

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2 * 4 * 4 + 5, 1)
            self.shapes = []

        def training_step(self, batch, _):
            images, labels = batch
            self.shapes.append((tuple(images.shape), tuple(labels.shape)))
            return self.layer(torch.cat([images.flatten(1), labels], 1)).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Tiny()
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ImageDataModule(_indexed_dataset(), batch_size=4, xflip=True))
    assert module.shapes == [((4, 2, 4, 4), (4, 5))] * 3


# ---------------------------------------------------------------------------------------------
# Hydra

def test_hydra_option_composes(cifar, tmp_path):
    from hydra.utils import instantiate

    from tests.test_configs import compose_cfg

    path, images, labels = cifar
    dest = tmp_path / "cifar10.zip"
    convert_dataset(str(path), str(dest))
    cfg = compose_cfg(tmp_path, "data=image_folder", f"data.path='{dest}'")
    assert cfg.data._target_ == "edm_lab.data.image_folder.image_folder"
    data = instantiate(cfg.data)
    assert isinstance(data, ArrayDataset)
    assert torch.equal(data.samples, as_model_input(images)) and data.labels.tolist() == labels.tolist()
    cfg = compose_cfg(tmp_path, "data=image_folder", f"data.path='{dest}'", "data.use_labels=false",
                      "data.max_size=3", "data.resolution=32")
    small = instantiate(cfg.data)
    assert len(small) == 3 and small.labels is None
