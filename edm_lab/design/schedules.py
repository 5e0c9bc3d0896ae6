"""Noise schedule sigma(t) and scaling s(t) (EDM paper, Table 1 and Eq. 4).

Every schedule gives sigma(t), its derivative and its inverse. The VP schedule is
parameterised by (beta_d, beta_min); `fit` re-derives them from the sampler's noise range
so that sigma(eps_s) = sigma_min and sigma(1) = sigma_max, as the reference does.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_S = 1e-3


class Schedule(Protocol):
    """sigma(t) with derivative and inverse; `fit` adapts it to a noise range."""

    def sigma(self, t: Tensor) -> Tensor: ...
    def sigma_deriv(self, t: Tensor) -> Tensor: ...
    def sigma_inv(self, sigma: Tensor) -> Tensor: ...
    def fit(self, sigma_min: float, sigma_max: float) -> "Schedule": ...


class VPSchedule:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(self, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN,
                 epsilon_s: float = VP_EPSILON_S) -> None:
        if not 0 < epsilon_s < 1:
            raise ValueError(f"schedule.epsilon_s must lie in (0, 1), got {epsilon_s}")
        self.beta_d, self.beta_min, self.epsilon_s = beta_d, beta_min, epsilon_s

    @classmethod
    def from_range(cls, sigma_min: float, sigma_max: float,
                   epsilon_s: float = VP_EPSILON_S) -> "VPSchedule":
        """The VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
        beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
        return cls(beta_d, beta_min, epsilon_s)

    def fit(self, sigma_min: float, sigma_max: float) -> "VPSchedule":
        return VPSchedule.from_range(sigma_min, sigma_max, self.epsilon_s)

    def sigma(self, t):
        return (math.e ** (0.5 * self.beta_d * (t ** 2) + self.beta_min * t) - 1) ** 0.5

    def sigma_deriv(self, t):
        sigma = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2 + 1).log()).sqrt() - self.beta_min) / self.beta_d

    def __repr__(self) -> str:
        return f"VPSchedule(beta_d={self.beta_d:g}, beta_min={self.beta_min:g})"


class VESchedule:
    """sigma(t) = sqrt(t)."""

    def fit(self, sigma_min: float, sigma_max: float) -> "VESchedule":
        return self

    def sigma(self, t: Tensor) -> Tensor:
        return t.sqrt()

    def sigma_deriv(self, t: Tensor) -> Tensor:
        return 0.5 / t.sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return sigma ** 2

    def __repr__(self) -> str:
        return "VESchedule()"


class LinearSchedule:
    """sigma(t) = t: the EDM choice (also called "linear")."""

    def fit(self, sigma_min: float, sigma_max: float) -> "LinearSchedule":
        return self

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def sigma_deriv(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return sigma

    def __repr__(self) -> str:
        return "LinearSchedule()"


class Scaling(Protocol):
    """s(t) and its derivative, given the schedule it scales."""

    def s(self, t: Tensor) -> Tensor: ...
    def s_deriv(self, t: Tensor) -> Tensor: ...
    def bind(self, schedule: Schedule) -> "Scaling": ...


class VPScaling:
    """s(t) = 1 / sqrt(1 + sigma(t)^2), so that x stays at unit variance."""

    def __init__(self, schedule: Schedule | None = None) -> None:
        self.schedule = schedule

    def bind(self, schedule: Schedule) -> "VPScaling":
        return VPScaling(schedule)

    def s(self, t: Tensor) -> Tensor:
        return 1 / (1 + self.schedule.sigma(t) ** 2).sqrt()

    def s_deriv(self, t: Tensor) -> Tensor:
        return -self.schedule.sigma(t) * self.schedule.sigma_deriv(t) * (self.s(t) ** 3)

    def __repr__(self) -> str:
        return "VPScaling()"


class NoScaling:
    """s(t) = 1: the VE, iDDPM and EDM choice."""

    def bind(self, schedule: Schedule) -> "NoScaling":
        return self

    def s(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def s_deriv(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def __repr__(self) -> str:
        return "NoScaling()"
