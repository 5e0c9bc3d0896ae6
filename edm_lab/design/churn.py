"""Stochasticity ("churn", Algorithm 2 lines 4-6): raise the noise level before each step."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Churn:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma(t_i) <= S_max, else 0."""

    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.S_churn < 0:
            raise ValueError(f"churn.S_churn must be >= 0, got {self.S_churn}")
        if self.S_noise < 0:
            raise ValueError(f"churn.S_noise must be >= 0, got {self.S_noise}")
        if self.S_min > self.S_max:
            raise ValueError(f"churn.S_min ({self.S_min}) must be <= churn.S_max ({self.S_max})")

    @property
    def stochastic(self) -> bool:
        """True when some step adds fresh noise."""
        return self.S_churn > 0

    def gamma(self, sigma: float, num_steps: int) -> float:
        """How much step i raises its noise level: sigma_hat = sigma (1 + gamma)."""
        if self.S_min <= sigma <= self.S_max:
            return min(self.S_churn / num_steps, math.sqrt(2) - 1)
        return 0.0
