"""The ideal denoiser: the exact posterior mean, chunked without changing the result."""
from __future__ import annotations

import torch

from edm_lab.nets.ideal import IdealDenoiser


def brute_force(data: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    d2 = ((x[:, None] - data[None]) ** 2).flatten(2).sum(-1)
    w = torch.softmax(-d2 / (2 * sigma ** 2), dim=1)
    return (w @ data.flatten(1)).reshape(x.shape)


def test_matches_softmax_weighted_mean_at_all_noise_levels_and_chunk_sizes():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(37, 1, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64) * 2
    for chunk in (1, 7, 4096):
        net = IdealDenoiser(data, chunk_size=chunk)
        for sigma in (0.01, 0.3, 1.0, 80.0):
            torch.testing.assert_close(net(x, sigma), brute_force(data, x, sigma), rtol=1e-10, atol=1e-12)


def test_limits_nearest_point_and_mean():
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 0.0]], dtype=torch.float64)
    net = IdealDenoiser(data)
    x = torch.tensor([[0.9, 1.2], [3.0, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(net(x, 1e-3), data[[1, 2]])
    torch.testing.assert_close(net(x, 1e4), data.mean(0).expand(2, 2), rtol=1e-6, atol=1e-6)


def test_per_sample_sigma():
    data = torch.randn(10, 4, dtype=torch.float64)
    net = IdealDenoiser(data)
    x = torch.randn(3, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    together = net(x, sigma)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], net(x[i:i + 1], sigma[i]))
