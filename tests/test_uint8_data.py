"""uint8-backed image data: `image_folder` keeps its pixels as uint8 and converts per item / batch.

Everything read through the uint8 path (items, batches, training views and loaders, reference
statistics, the fingerprint) must equal the float32 path bit for bit; the float32 copy is built only
when `.samples` is read.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from edm_lab.data import datasets as datasets_module
from edm_lab.data.datamodule import ImageDataModule, TrainingView
from edm_lab.data.datasets import ArrayDataset, digits, toy2d, uint8_to_float
from edm_lab.data.image_folder import image_folder
from edm_lab.evaluate.features import FrechetDistance, raw_features
from edm_lab.evaluate.reference import cached_data_statistics
from tests.test_datasets import as_model_input, save_png

N, SIZE, CLASSES = 11, 8, 4


def _write_dataset(root: Path, channels: int, as_zip: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """N random images (NHWC uint8, the full 0..255 range) with labels, as a folder or a stored zip."""
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, size=(N, SIZE, SIZE, channels), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = (np.arange(N) * 3) % CLASSES
    folder = root / f"ds{channels}"
    names = [f"00000/img{i:08d}.png" for i in range(N)]
    for name, image in zip(names, images):
        save_png(folder / name, image[:, :, 0] if channels == 1 else image)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))
    if not as_zip:
        return folder, images, labels
    path = root / f"ds{channels}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                z.write(file, file.relative_to(folder).as_posix())
    return path, images, labels


def _old_float_path(images: np.ndarray) -> torch.Tensor:
    """What image_folder returned before: the whole set as float32, x / 127.5 - 1 computed in place."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(torch.float32).div_(127.5).sub_(1)


def _old_fingerprint(name: str, samples: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(samples.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return f"{name}-{digest.hexdigest()[:12]}"


@pytest.fixture(params=[(1, False), (3, False), (3, True)], ids=["gray-folder", "rgb-folder", "rgb-zip"])
def pair(request, tmp_path) -> tuple[ArrayDataset, ArrayDataset]:
    """(uint8-backed dataset from image_folder, the float32-backed dataset of the same images)."""
    channels, as_zip = request.param
    path, images, labels = _write_dataset(tmp_path, channels, as_zip)
    data = image_folder(str(path))
    expected = _old_float_path(images)
    assert torch.equal(expected, as_model_input(images))  # the old in-place form = the plain formula
    return data, ArrayDataset(data.name, expected, torch.from_numpy(labels), num_classes=CLASSES)


def test_every_uint8_value_converts_like_the_float_formula():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(uint8_to_float(values), values.to(torch.float32) / 127.5 - 1)
    assert uint8_to_float(values).dtype == torch.float32


def test_uint8_storage_items_batches_and_fingerprint(pair):
    data, floats = pair
    c = floats.sample_shape[0]
    # Memory: the pixels as uint8, N*C*H*W bytes, and no float32 copy until `samples` is read.
    assert data.raw.dtype == torch.uint8 and tuple(data.raw.shape) == (N, c, SIZE, SIZE)
    assert data.raw.untyped_storage().nbytes() == N * c * SIZE * SIZE
    assert data._samples is None
    assert data.sample_shape == (c, SIZE, SIZE) and data.is_image and len(data) == N
    assert data.labels.tolist() == floats.labels.tolist() and data.num_classes == CLASSES
    # The cache key is the one the float32 data set had (existing caches stay valid).
    assert data.fingerprint == floats.fingerprint == _old_fingerprint(data.name, floats.samples, floats.labels)

    pick = torch.tensor([5, 0, 10, 5, 3])
    for index in (pick, pick.tolist(), slice(2, 9), slice(None), 7):
        got = data.sample_batch(index)
        assert got.dtype == torch.float32 and torch.equal(got, floats.samples[index])
    for i in range(N):
        image, label = data[i]
        assert torch.equal(image, floats.samples[i]) and int(label) == int(floats.labels[i])
    assert data._samples is None  # still no float32 copy

    assert torch.equal(data.samples, floats.samples)  # materialised on demand, then kept
    assert data._samples is not None and data._samples.dtype == torch.float32 and data.samples is data._samples


def test_chunked_fingerprint_matches_the_whole_buffer(pair, monkeypatch):
    data, floats = pair
    monkeypatch.setattr(datasets_module, "_HASH_CHUNK", 7)  # chunks that split pixels, rows and images
    again = ArrayDataset(data.name, None, data.labels, num_classes=data.num_classes, raw=data.raw)
    assert again.fingerprint == floats.fingerprint
    unlabeled = ArrayDataset("u", raw=data.raw)
    assert unlabeled.fingerprint == ArrayDataset("u", floats.samples).fingerprint


@pytest.mark.parametrize("xflip", [False, True])
@pytest.mark.parametrize("use_labels", [True, False])
def test_training_view_and_loader_equal_the_float_path(pair, xflip, use_labels):
    data, floats = pair
    view, reference = TrainingView(data, xflip, use_labels), TrainingView(floats, xflip, use_labels)
    assert len(view) == len(reference) == N * (2 if xflip else 1)
    for i in range(len(view)):
        (x, y), (rx, ry) = view[i], reference[i]
        assert x.dtype == torch.float32 and torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(IndexError):
        view[len(view)]

    # Whole loaders: seeded shuffle and the resumable InfiniteSampler, same batches either way.
    trainer = SimpleNamespace(global_rank=0, world_size=1, accelerator=CPUAccelerator())  # what the sampler asks
    for start in (None, lambda: 3):
        loaders = []
        for d in (data, floats):
            dm = ImageDataModule(d, batch_size=4, xflip=xflip, use_labels=use_labels, start=start, drop_last=False)
            dm.trainer = trainer
            loaders.append(dm.train_dataloader())
        for (x, y), (rx, ry), _ in zip(*loaders, range(5)):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    assert data._samples is None  # training never builds the float32 copy


def test_loader_workers_read_the_uint8_data(pair):
    data, floats = pair
    batches = [list(ImageDataModule(d, batch_size=4, xflip=True, num_workers=w).train_dataloader())
               for d, w in ((data, 2), (floats, 0))]
    assert len(batches[0]) == len(batches[1]) == (2 * N) // 4
    for (x, y), (rx, ry) in zip(*batches):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_reference_statistics_per_batch_equal_the_float_tensor(pair, tmp_path):
    """Exact: the same float values in the same batches, so torchmetrics sums in the same order."""
    data, floats = pair
    options = {"_target_": "edm_lab.evaluate.features.raw_features"}
    for batch_size in (3, 64):
        by_batch = FrechetDistance(raw_features(data), batch_size=batch_size)
        by_batch.set_reference(data)
        whole = FrechetDistance(raw_features(floats), batch_size=batch_size)
        whole.set_reference(floats.samples)
        got, want = by_batch.reference_statistics(), whole.reference_statistics()
        assert by_batch.num_reference == whole.num_reference == N
        assert all(torch.equal(got[k], want[k]) for k in want)

    cached = cached_data_statistics(FrechetDistance(raw_features(data), batch_size=4), data, data.fingerprint,
                                    options, tmp_path / "a")
    direct = cached_data_statistics(FrechetDistance(raw_features(floats), batch_size=4), floats.samples,
                                    floats.fingerprint, options, tmp_path / "b")
    assert all(torch.equal(cached[k], direct[k]) for k in direct)
    assert data._samples is None


def test_pinned_memory_follows_the_trainers_accelerator():
    data = ArrayDataset("tiny", raw=torch.zeros(8, 1, 4, 4, dtype=torch.uint8))
    dm = ImageDataModule(data, batch_size=2, num_workers=0)
    assert dm.trainer is None and not dm.train_dataloader().pin_memory  # no trainer: no pinning
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert dm.uses_pinned_memory()
    loader = dm.train_dataloader()
    assert loader.pin_memory and loader.num_workers == 0
    dm.trainer = SimpleNamespace(accelerator=CPUAccelerator())
    assert not dm.train_dataloader().pin_memory
    forced = ImageDataModule(data, batch_size=2, num_workers=2, pin_memory=True)
    loader = forced.train_dataloader()
    assert loader.pin_memory and loader.num_workers == 2 and loader.persistent_workers
    off = ImageDataModule(data, batch_size=2, pin_memory=False)
    off.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert not off.train_dataloader().pin_memory


def test_float_datasets_stay_float_and_raw_is_checked():
    for data in (digits(limit=32), toy2d(num_samples=16)):
        assert data.raw is None and data._samples is data.samples and data.samples.dtype == torch.float32
        assert torch.equal(data.sample_batch(slice(0, 5)), data.samples[:5])
    with pytest.raises(ValueError, match="exactly one of samples"):
        ArrayDataset("both", torch.zeros(2, 1, 2, 2), raw=torch.zeros(2, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly one of samples"):
        ArrayDataset("none")
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset("f", raw=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="3 labels for 2 samples"):
        ArrayDataset("l", raw=torch.zeros(2, 1, 2, 2, dtype=torch.uint8), labels=torch.zeros(3, dtype=torch.int64))
