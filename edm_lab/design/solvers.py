"""ODE solvers of the sampler (Section 3, Algorithm 1 and the generalised 2nd-order step).

A solver advances x from t to t_next given the ODE's derivative dx/dt = f(x, t).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

Derivative = Callable[[Tensor, Tensor], Tensor]


def euler_step(f: Derivative, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """x_next = x + h f(x, t)."""
    return x + (t_next - t) * f(x, t)


class Euler:
    """First order: one denoiser evaluation per step."""

    def step(self, f: Derivative, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        return euler_step(f, x, t, t_next)

    def __repr__(self) -> str:
        return "Euler()"


class SecondOrder:
    """Generalised 2nd-order explicit Runge-Kutta step; alpha = 1 is Heun's method.

    x' = x + alpha h d, t' = t + alpha h, x_next = x + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d').
    """

    def __init__(self, alpha: float = 1.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"solver.alpha must lie in (0, 1], got {alpha}")
        self.alpha = alpha

    def step(self, f: Derivative, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        alpha, h = self.alpha, t_next - t
        d_cur = f(x, t)
        x_prime, t_prime = x + alpha * h * d_cur, t + alpha * h
        d_prime = f(x_prime, t_prime)
        return x + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

    def __repr__(self) -> str:
        return f"SecondOrder(alpha={self.alpha:g})"

