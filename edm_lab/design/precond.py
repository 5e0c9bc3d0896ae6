"""Network preconditioning (Table 1, Section 5): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

Each preconditioner wraps an inner network F (`model`, any module called as
F(x, c_noise, class_labels=..., **kwargs)) and declares the noise range it supports and its
rounding of sigma. Arithmetic is float32 like the reference, so that parameter names
(`model.*`, `u`) and numerics match its networks. `model` may be omitted when only the
noise-level interface (sigma_min, sigma_max, round_sigma, coefficients) is wanted.

Like the reference preconditioners, the forward pass normalises class labels for the network
(None when unconditional, a zero one-hot row when none are given), can run the inner network
in fp16/bf16 on CUDA (`precision`, overridable per call with `force_fp32`) and always returns
float32. `img_resolution`, `img_channels` and `label_dim` are read off the inner network.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from edm_lab.design.discretizations import iddpm_noise_levels
from edm_lab.design.schedules import VP_BETA_D, VP_BETA_MIN

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model_attr(model: object, *names: str) -> Any:
    """The first of `names` that the inner network defines, else None."""
    for name in names:
        value = getattr(model, name, None)
        if value is not None:
            return value
    return None


class Precond(nn.Module):
    """Base: the forward pass shared by every preconditioner.

    `img_channels` given explicitly keeps only the network's first img_channels outputs (an
    iDDPM/ADM network also predicts a variance); otherwise it is the network's input channels.
    `label_dim` defaults to the network's; left unknown (a network without the attribute),
    class labels pass through untouched. `precision` ('fp32' | 'fp16' | 'bf16') is the dtype
    the inner network runs in on CUDA; elsewhere, or with `force_fp32=True`, it runs in float32.
    """

    sigma_min: float
    sigma_max: float

    def __init__(self, model: nn.Module | None = None, img_channels: int | None = None, precision: str = "fp32",
                 label_dim: int | None = None) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precond.precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.img_channels = img_channels if img_channels is not None else _model_attr(model, "img_channels",
                                                                                      "in_channels")
        self.img_resolution = _model_attr(model, "img_resolution")
        label_dim = label_dim if label_dim is not None else _model_attr(model, "label_dim")
        self.label_dim = int(label_dim or 0)  # 0 = unconditional (or unknown)
        self._labels_known = label_dim is not None
        self.precision = precision

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at `sigma`."""
        raise NotImplementedError

    def round_sigma(self, sigma: Tensor) -> Tensor:
        """Continuous preconditioners take sigma as it is."""
        return torch.as_tensor(sigma)

    def model_dtype(self, x: Tensor, force_fp32: bool = False) -> torch.dtype:
        """The dtype the inner network runs in for input `x` (reduced precision only on CUDA)."""
        if force_fp32 or x.device.type != "cuda":
            return torch.float32
        return PRECISIONS[self.precision]

    def prepare_labels(self, class_labels: Tensor | None, device: torch.device) -> Tensor | None:
        """Class labels as the network expects them: float32 [N, label_dim], zeros [1, label_dim] if none."""
        if not self._labels_known:  # an inner model of unknown conditioning: leave the labels alone
            return class_labels
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, force_fp32: bool = False,
                **model_kwargs) -> Tensor:
        """D(x; sigma) in float32; `model_kwargs` (e.g. augment_labels) go to the inner network."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no inner network: pass model=...")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        class_labels = self.prepare_labels(class_labels, x.device)
        dtype = self.model_dtype(x, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = (c_in * x).to(dtype)
        memory_format = getattr(self, "memory_format", torch.contiguous_format)  # NHWC: edm_lab.nets.fast
        if memory_format is not torch.contiguous_format and x_in.ndim == 4:
            x_in = x_in.contiguous(memory_format=memory_format)
        F_x = self.model(x_in, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if self.img_channels is not None:
            F_x = F_x[:, :self.img_channels]  # ADM-style nets also predict a variance: drop it
        return c_skip * x + c_out * F_x.to(torch.float32)


class VPPrecond(Precond):
    """c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma)."""

    def __init__(self, model: nn.Module | None = None, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN,
                 M: int = 1000, epsilon_t: float = 1e-5, img_channels: int | None = None, precision: str = "fp32",
                 label_dim: int | None = None) -> None:
        super().__init__(model, img_channels, precision, label_dim)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t) -> Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma) -> Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    """c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def __init__(self, model: nn.Module | None = None, sigma_min: float = 0.02, sigma_max: float = 100.0,
                 img_channels: int | None = None, precision: str = "fp32", label_dim: int | None = None) -> None:
        super().__init__(model, img_channels, precision, label_dim)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class IDDPMPrecond(Precond):
    """c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = M - 1 - argmin_j |u_j - sigma|."""

    def __init__(self, model: nn.Module | None = None, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                 img_channels: int | None = None, precision: str = "fp32", label_dim: int | None = None) -> None:
        super().__init__(model, img_channels, precision, label_dim)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = iddpm_noise_levels(M, C_1, C_2, dtype=torch.float32)  # float32, as the reference stores it
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def round_sigma(self, sigma, return_index: bool = False) -> Tensor:
        """The nearest table level u_j (or its index j)."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(Precond):
    """c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4."""

    def __init__(self, model: nn.Module | None = None, sigma_min: float = 0.0, sigma_max: float = math.inf,
                 sigma_data: float = 0.5, img_channels: int | None = None, precision: str = "fp32",
                 label_dim: int | None = None) -> None:
        super().__init__(model, img_channels, precision, label_dim)
        if sigma_data <= 0:
            raise ValueError(f"precond.sigma_data must be > 0, got {sigma_data}")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)
