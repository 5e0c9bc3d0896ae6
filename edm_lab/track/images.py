"""Pictures of samples: a grid (or a scatter plot of 2-D points) for the trackers, PNG files for FID tools."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from edm_lab.atomic import atomic_file

GRID_ITEMS = 64  # images drawn in a tracker's grid


def grid_items(sample_shape: Sequence[int]) -> int | None:
    """How many leading samples `sample_grid` draws: GRID_ITEMS images, or every 2-D point (None)."""
    return GRID_ITEMS if len(sample_shape) == 3 else None


def to_uint8(samples: Tensor) -> Tensor:
    """Images in [-1, 1] to uint8 [0, 255] exactly as NVlabs/edm generate.py does (x * 127.5 + 128, clipped, truncated)."""
    return (samples * 127.5 + 128).clip(0, 255).to(torch.uint8)


def image_path(directory: str | Path, seed: int) -> Path:
    """`<directory>/<seed - seed % 1000:06d>/<seed:06d>.png`: the reference's `--subdirs` layout."""
    return Path(directory) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def save_images(samples: Tensor, seeds: Sequence[int], directory: str | Path) -> list[Path]:
    """One PNG per image (N, C, H, W) in [-1, 1], named by its seed; each file written atomically."""
    from PIL import Image

    if samples.ndim != 4 or samples.shape[1] not in (1, 3) or len(samples) != len(seeds):
        raise ValueError(f"need {len(seeds)} images shaped (N, 1 or 3, H, W), got {tuple(samples.shape)}")
    pixels = to_uint8(samples.detach().cpu()).permute(0, 2, 3, 1).numpy()
    paths = []
    for seed, image in zip(seeds, pixels):
        path = image_path(directory, int(seed))
        picture = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
        # A killed run leaves whole PNGs or none; no fsync per image (it made a 50k export fsync-bound).
        with atomic_file(path, durable=False) as fh:
            picture.save(fh, format="PNG")
        paths.append(path)
    return paths


def sample_grid(samples: Tensor, max_items: int = GRID_ITEMS) -> np.ndarray:
    """uint8 H x W x 3 picture of the first samples: an image grid, or a scatter of 2-D points."""
    samples = samples[:max_items] if samples.ndim == 4 else samples
    if samples.ndim == 4:
        from torchvision.utils import make_grid

        grid = make_grid(((samples.float().clamp(-1, 1) + 1) / 2), nrow=int(np.ceil(np.sqrt(len(samples)))),
                         padding=1, pad_value=1.0)
        return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return _scatter(samples)
    raise ValueError(f"cannot draw samples of shape {tuple(samples.shape)}")


def _scatter(points: Tensor) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 3), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    p = points.detach().to(torch.float64).cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.6)
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
