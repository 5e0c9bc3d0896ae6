"""In-memory datasets scaled to [-1, 1], the form every denoiser and metric here consumes (8-bit images
may be kept as uint8 and converted per batch)."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

# Elements converted per step while hashing uint8 pixels: bounds the float32 scratch to 64 MB.
_HASH_CHUNK = 1 << 24


def uint8_to_float(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1] as ``x / 127.5 - 1``: the exact float32 operations (division,
    then subtraction, each correctly rounded) the loaders have always used, so results are bit-identical."""
    return pixels.to(torch.float32).div_(127.5).sub_(1)


class ArrayDataset(Dataset):
    """Samples (n, C, H, W) or (n, D) in [-1, 1], optional int labels (n,).

    Give either float `samples` or, for 8-bit images, `raw`: uint8 pixels (n, C, H, W) in [0, 255] that
    stay uint8 in memory (a quarter of float32: ImageNet-64 is 15.7 GB instead of 63 GB) and are converted
    by ``uint8_to_float`` per item or batch (``__getitem__``, ``sample_batch``). For a raw-backed data set
    the ``samples`` property materialises the whole float32 tensor on first access and keeps it (that
    costs the float32 memory): meant for small data sets (the ideal denoiser, tests); the training view
    and the reference statistics read through ``sample_batch`` instead and never touch it.

    The fingerprint hashes the float32 samples (+ int64 labels) whichever way they are stored, so a data
    set keeps its cache key (reference statistics, extractors) when its storage changes.
    """

    def __init__(self, name: str, samples: Tensor | None = None, labels: Tensor | None = None,
                 num_classes: int = 0, *, raw: Tensor | None = None) -> None:
        if (samples is None) == (raw is None):
            raise ValueError(f"dataset {name}: give exactly one of samples (float) and raw (uint8 pixels)")
        if raw is not None and (raw.dtype != torch.uint8 or raw.ndim != 4):
            raise ValueError(f"dataset {name}: raw pixels must be uint8 (n, C, H, W), got {raw.dtype} "
                             f"{tuple(raw.shape)}")
        self.name = name
        self.raw = raw
        self._samples = samples  # float32; for a raw-backed set only once `samples` has been read
        self.labels = labels
        self.num_classes = num_classes
        if labels is not None and len(labels) != len(self):
            raise ValueError(f"dataset {name}: {len(labels)} labels for {len(self)} samples")
        self.fingerprint = f"{name}-{self._digest()}"

    def _digest(self) -> str:
        digest = hashlib.sha256()
        if self.raw is None:
            digest.update(self._samples.detach().cpu().contiguous().numpy().tobytes())
        else:
            # sha256 over consecutive chunks = sha256 of the whole float32 buffer: the same key as a
            # float-backed copy, without ever holding that copy.
            flat = self.raw.detach().cpu().contiguous().reshape(-1)  # no copy for the usual CPU tensor
            for start in range(0, len(flat), _HASH_CHUNK):
                digest.update(uint8_to_float(flat[start:start + _HASH_CHUNK]).numpy().data)
        if self.labels is not None:
            digest.update(self.labels.cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    @property
    def samples(self) -> Tensor:
        """All samples as one float32 tensor; for a raw-backed set built (n x 4 bytes per pixel) and kept."""
        if self._samples is None:
            self._samples = uint8_to_float(self.raw)
        return self._samples

    def sample_batch(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        """Float32 samples at `index` (indexing as for a tensor: an int gives one sample without a batch
        dimension), converted from the uint8 pixels when the data set keeps those."""
        if self.raw is None:
            return self._samples[index]
        return uint8_to_float(self.raw[index])

    @property
    def _storage(self) -> Tensor:
        return self._samples if self.raw is None else self.raw

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._storage.shape[1:])

    @property
    def is_image(self) -> bool:
        return self._storage.ndim == 4

    def __len__(self) -> int:
        return len(self._storage)

    def __getitem__(self, i: int):
        sample = self.sample_batch(i)
        return sample if self.labels is None else (sample, self.labels[i])

    def __repr__(self) -> str:
        storage = "uint8" if self.raw is not None else "float32"
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"storage={storage}, num_classes={self.num_classes}, fingerprint={self.fingerprint!r})")


def _to_resolution(images: Tensor, resolution: int, mode: str) -> Tensor:
    """Pad with the background value (-1) or resize bilinearly to resolution x resolution."""
    size = images.shape[-1]
    if resolution == size:
        return images
    if mode == "pad":
        if resolution < size:
            raise ValueError(f"data.resolution={resolution} is smaller than the images ({size}); use data.resize=resize")
        before = (resolution - size) // 2
        after = resolution - size - before
        return F.pad(images, (before, after, before, after), value=-1.0)
    if mode == "resize":
        return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                             antialias=resolution < size).clamp(-1, 1)
    raise ValueError(f"data.resize must be 'pad' or 'resize', got {mode!r}")


def digits(resolution: int = 8, resize: str = "pad", limit: int | None = None) -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 real images, labels 0-9), in [-1, 1]."""
    from sklearn.datasets import load_digits

    if resolution < 1 or resolution & (resolution - 1):
        raise ValueError(f"data.resolution must be a power of two, got {resolution}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ArrayDataset("digits", _to_resolution(images, resolution, resize).contiguous(), labels, num_classes=10)


def toy2d(num_samples: int = 2048, num_modes: int = 8, radius: float = 0.7, std: float = 0.08,
          seed: int = 0) -> ArrayDataset:
    """A 2-D Gaussian mixture: `num_modes` modes evenly on a circle, labels = mode index."""
    if num_samples < 2 or num_modes < 1:
        raise ValueError(f"toy2d needs num_samples >= 2 and num_modes >= 1, got {num_samples}, {num_modes}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_modes, (num_samples,), generator=gen)
    angles = 2 * math.pi * labels.to(torch.float64) / num_modes
    centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    points = centers + std * torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
    return ArrayDataset("toy2d", points.to(torch.float32), labels, num_classes=num_modes)
