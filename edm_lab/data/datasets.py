"""In-memory datasets scaled to [-1, 1], the form every denoiser and metric here consumes."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class ArrayDataset(Dataset):
    """Samples (n, C, H, W) or (n, D) in [-1, 1], optional int labels (n,)."""

    name: str
    samples: Tensor
    labels: Tensor | None = None
    num_classes: int = 0
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.samples):
            raise ValueError(f"dataset {self.name}: {len(self.labels)} labels for {len(self.samples)} samples")
        digest = hashlib.sha256(self.samples.detach().cpu().contiguous().numpy().tobytes())
        if self.labels is not None:
            digest.update(self.labels.cpu().contiguous().numpy().tobytes())
        self.fingerprint = f"{self.name}-{digest.hexdigest()[:12]}"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.samples.ndim == 4

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i] if self.labels is None else (self.samples[i], self.labels[i])


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
