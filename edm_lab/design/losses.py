"""Training axes (Table 1, Section 5): the noise distribution p(sigma) and the loss weighting lambda(sigma).

The loss of one image y is lambda(sigma) * ||D(y + n; sigma) - y||^2 with n = sigma * N(0, I)
and sigma ~ p(sigma). The two axes are separate objects so that every distribution can be
crossed with every weighting (and with every preconditioner).
"""
from __future__ import annotations

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

