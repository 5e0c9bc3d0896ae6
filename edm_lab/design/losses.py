"""Training axes (Table 1, Section 5): the noise distribution p(sigma) and the loss weighting lambda(sigma).

The loss of one image y is lambda(sigma) * ||D(y + n; sigma) - y||^2 with n = sigma * N(0, I)
and sigma ~ p(sigma). The two axes are separate objects so that every distribution can be
crossed with every weighting (and with every preconditioner).

`loss_per_sigma` and `noise_density` measure a network against them on a fixed grid of noise
levels (the paper's Figure 5a): the objective at each sigma, and where p(sigma) puts the training.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from edm_lab.design.discretizations import iddpm_noise_levels
from edm_lab.design.schedules import VP_BETA_D, VP_BETA_MIN


class VPNoise:
    """sigma = sigma_vp(t) with t ~ U(epsilon_t, 1)."""

    def __init__(self, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, epsilon_t: float = 1e-5) -> None:
        if not 0 < epsilon_t < 1:
            raise ValueError(f"noise.epsilon_t must lie in (0, 1), got {epsilon_t}")
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def __call__(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        t = 1 + torch.rand(n, device=device, generator=generator) * (self.epsilon_t - 1)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()


class VENoise:
    """ln sigma ~ U(ln sigma_min, ln sigma_max)."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"noise.sigma_min ({sigma_min}) must be > 0 and < noise.sigma_max ({sigma_max})")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, n, device="cpu", generator=None):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(n, device=device, generator=generator)


class IDDPMNoise:
    """sigma = u_j with j ~ U{0, ..., M-1}: the iDDPM table's noise levels (u_M = 0 excluded)."""

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> None:
        # float32: the very table an iDDPM network (IDDPMPrecond.u) rounds to
        self.u = iddpm_noise_levels(M, C_1, C_2, dtype=torch.float32)[:M]

    def __call__(self, n, device="cpu", generator=None):
        j = torch.randint(len(self.u), (n,), device=device, generator=generator)
        return self.u.to(device)[j]


class EDMNoise:
    """ln sigma ~ N(P_mean, P_std^2)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2) -> None:
        if not P_std > 0:
            raise ValueError(f"noise.P_std must be > 0, got {P_std}")
        self.P_mean, self.P_std = P_mean, P_std

    def __call__(self, n, device="cpu", generator=None):
        return (torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean).exp()


NoiseDistribution = Callable[..., Tensor]


class InverseSquareWeighting:
    """lambda(sigma) = 1 / sigma^2 (VP, VE and iDDPM)."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return 1 / sigma ** 2


class EDMWeighting:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: unit effective weight with EDM's c_out."""

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"weighting.sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class UniformWeighting:
    """lambda(sigma) = 1."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)


class DenoisingLoss:
    """Per-pixel weighted denoising loss for a batch, with optional non-leaky augmentation."""

    def __init__(self, noise: NoiseDistribution, weighting: Callable[[Tensor], Tensor]) -> None:
        self.noise, self.weighting = noise, weighting

    def __call__(self, denoiser, images: Tensor, class_labels: Tensor | None = None,
                 augment_pipe: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """lambda(sigma) (D(y + n; sigma) - y)^2, shaped like the images (sum it per image)."""
        sigma = self.noise(images.shape[0], device=images.device).reshape(-1, *([1] * (images.ndim - 1)))
        weight = self.weighting(sigma)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        denoised = denoiser(y + n, sigma.flatten(), class_labels, **extra)
        return weight * (denoised - y) ** 2


def sigma_grid(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """`num` noise levels log-spaced over [sigma_min, sigma_max] (float64, increasing)."""
    if num < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"a sigma grid needs >= 2 points and 0 < sigma_min < sigma_max, got {num}, "
                         f"[{sigma_min}, {sigma_max}]")
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), num, dtype=torch.float64).exp()


def loss_per_sigma(denoiser: Callable[..., Tensor], images: Tensor, sigmas: Tensor,
                   weighting: Callable[[Tensor], Tensor], class_labels: Tensor | None = None,
                   generator: torch.Generator | None = None, batch_size: int = 512) -> Tensor:
    """The training objective at each noise level: mean over `images` and pixels of
    lambda(sigma) (D(y + sigma n; sigma) - y)^2, as float64 (len(sigmas),) on the CPU.

    No augmentation; the denoiser runs in eval mode without gradients (its mode is restored).
    The noise is one draw of images.shape per sigma, in grid order, from `generator` (on its
    device, then moved to the images'), so the result does not depend on `batch_size`, the number
    of images per denoiser call: several sigmas share a call when the images are fewer.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    n = len(images)
    if n == 0 or batch_size < 1:
        raise ValueError(f"loss_per_sigma needs images and batch_size >= 1, got {n} images, batch_size={batch_size}")
    noise_device = generator.device if generator is not None else images.device
    # Sigmas per group of (sigma, image) pairs: one when the images alone fill a call (split into calls then).
    per_call = max(1, batch_size // n)
    squared_error = torch.zeros(len(sigmas), dtype=torch.float64)
    modes = [(m, m.training) for m in denoiser.modules()] if isinstance(denoiser, torch.nn.Module) else []
    if modes:
        denoiser.eval()  # no dropout: the profile measures the network, not one dropout mask
    try:
        with torch.no_grad():
            for first in range(0, len(sigmas), per_call):
                group = sigmas[first:first + per_call]
                noise = torch.cat([torch.randn(images.shape, generator=generator, device=noise_device,
                                               dtype=images.dtype) for _ in group]).to(images.device)
                sigma = group.to(images.dtype).repeat_interleave(n).to(images.device)
                clean = images.repeat(len(group), *([1] * (images.ndim - 1)))
                noisy = clean + sigma.reshape(-1, *([1] * (images.ndim - 1))) * noise
                labels = class_labels.repeat(len(group), 1) if class_labels is not None else None
                per_image = []
                for i in range(0, len(noisy), batch_size):
                    part = slice(i, i + batch_size)
                    denoised = denoiser(noisy[part], sigma[part], labels[part] if labels is not None else None)
                    per_image.append((denoised - clean[part]).to(torch.float64).square().flatten(1).sum(1).cpu())
                squared_error[first:first + len(group)] = torch.cat(per_image).reshape(len(group), n).sum(1)
    finally:
        for module, training in modes:
            module.training = training
    pixels = images[0].numel()
    return weighting(sigmas) * squared_error / (n * pixels)


def noise_density(noise: NoiseDistribution, sigmas: Tensor, num_draws: int = 1 << 20,
                  generator: torch.Generator | None = None) -> Tensor:
    """p(ln sigma) of a noise distribution at increasing `sigmas` (float64), from a histogram of `num_draws` draws.

    Each grid point's bin reaches halfway (in ln sigma) to its neighbours, and as far beyond the
    ends; draws outside the bins are counted in the total only. Works for every distribution,
    the discrete iDDPM table included (its mass per bin over the bin's width).
    """
    log_sigma = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu().log()
    if len(log_sigma) < 2 or not bool((log_sigma.diff() > 0).all()):
        raise ValueError("noise_density needs >= 2 increasing noise levels")
    middles = (log_sigma[1:] + log_sigma[:-1]) / 2
    edges = torch.cat([2 * log_sigma[:1] - middles[:1], middles, 2 * log_sigma[-1:] - middles[-1:]])
    draws = noise(num_draws, generator=generator).to(torch.float64).cpu().log()
    counts = torch.histogram(draws, bins=edges).hist
    return counts / (num_draws * edges.diff())
