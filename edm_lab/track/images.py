"""Pictures of samples for the trackers: an image grid, or a scatter plot for 2-D points."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sample_grid(samples: Tensor, max_items: int = 64) -> np.ndarray:
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
