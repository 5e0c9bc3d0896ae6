"""The exact minimum-MSE denoiser of a finite dataset (no training needed).

For data y_1..y_n, D(x; sigma) = sum_i w_i y_i with w = softmax_i(-||x - y_i||^2 / (2 sigma^2)):
the posterior mean of y given x = y + sigma n. Evaluated in float64 with a streaming
(log-sum-exp) softmax over chunks of the data, so memory stays at batch x chunk.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


class IdealDenoiser(nn.Module):
    """D(x; sigma) of `data` (n, ...), exact up to float64 round-off.

    `noise_levels` (a preconditioner, optional) lends its supported noise range and its
    rounding of sigma, so the ideal denoiser stands in for a network trained with it.
    """

    def __init__(self, data: Tensor, noise_levels: nn.Module | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        if data.ndim < 2 or len(data) == 0:
            raise ValueError(f"ideal denoiser needs a non-empty (n, ...) dataset, got shape {tuple(data.shape)}")
        if chunk_size < 1:
            raise ValueError(f"model.chunk_size must be >= 1, got {chunk_size}")
        flat = data.reshape(len(data), -1).to(torch.float64)
        self.register_buffer("data", flat, persistent=False)
        self.register_buffer("data_sq", flat.square().sum(1), persistent=False)
        self.sample_shape = tuple(data.shape[1:])
        self.chunk_size = chunk_size
        self.noise_levels = noise_levels
        self.sigma_min = float(getattr(noise_levels, "sigma_min", 0.0))
        self.sigma_max = float(getattr(noise_levels, "sigma_max", math.inf))

    def round_sigma(self, sigma: Tensor) -> Tensor:
        if self.noise_levels is None:
            return torch.as_tensor(sigma)
        return self.noise_levels.round_sigma(sigma)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        xf = x.reshape(batch, -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        scale = -0.5 / sigma.square().reshape(-1, 1).expand(batch, 1)
        x_sq = xf.square().sum(1, keepdim=True)
        running_max = torch.full((batch, 1), -math.inf, dtype=torch.float64, device=x.device)
        weight_sum = torch.zeros(batch, 1, dtype=torch.float64, device=x.device)
        weighted = torch.zeros_like(xf)
        for start in range(0, len(self.data), self.chunk_size):
            y = self.data[start:start + self.chunk_size]
            dist_sq = (x_sq - 2 * xf @ y.T + self.data_sq[start:start + self.chunk_size]).clamp(min=0)
            logits = dist_sq * scale
            new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
            rescale = (running_max - new_max).exp()
            w = (logits - new_max).exp()
            weight_sum = weight_sum * rescale + w.sum(1, keepdim=True)
            weighted = weighted * rescale + w @ y
            running_max = new_max
        return (weighted / weight_sum).reshape(batch, *self.sample_shape)


def ideal_denoiser(dataset, precond: Callable[..., nn.Module] | None = None, chunk_size: int = 4096) -> IdealDenoiser:
    """Model factory for `model=ideal`: the data set's ideal denoiser with the noise levels of `precond`."""
    denoiser = IdealDenoiser(dataset.samples, noise_levels=precond() if precond else None, chunk_size=chunk_size)
    denoiser.provenance = {"network": "ideal", "checkpoint": None, "parameters": 0}
    return denoiser
