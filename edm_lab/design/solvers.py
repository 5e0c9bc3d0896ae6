"""The solvers of the sampler: each runs a whole trajectory t_0 > ... > t_N = 0 (Section 3, Appendix B).

Every solver is called as `solver(problem, x)` with the state x at t_0 (float64, scaled by s(t_0))
and returns the state at t_N = 0. `problem` (`edm_lab.design.sampler.Problem`) gives it the time
steps, the probability-flow ODE of the chosen sigma(t) and s(t) around the counted denoiser,
churn (Algorithm 2) and the per-seed noise source; whatever a method keeps between steps (a
corrector loop, the history of a multistep method) lives inside its `__call__`.

- ODE solvers, deterministic unless churn adds noise: `Euler`, `SecondOrder` (alpha = 1: Heun,
  Algorithm 1; the last step, to sigma = 0, is Euler).
- The original stochastic samplers the paper compares against (Figure 4), with churn off:
  `EulerMaruyama` (Song et al.'s reverse SDE, their VP sampler), `PredictorCorrector` (reverse
  diffusion + Langevin corrector, their VE sampler), `Ancestral` (DDPM/iDDPM posterior sampling).
  Their last step, to sigma = 0, adds no noise (Song et al.'s "denoise" of the final mean).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from edm_lab.design.sampler import Problem


class Euler:
    """First order: x_{i+1} = x_i + (t_{i+1} - t_i) dx/dt(x_i, t_i); one denoiser evaluation per step."""

    stochastic = False

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        for i, t_cur, t_next in p.steps():
            x, t_hat = p.churn_up(x, i, t_cur)
            x = x + (t_next - t_hat) * p.dx_dt(x, t_hat)
        return x

    def __repr__(self) -> str:
        return "Euler()"


class SecondOrder:
    """Generalised 2nd-order explicit Runge-Kutta step; alpha = 1 is Heun's method (Algorithm 1).

    x' = x + alpha h d, t' = t + alpha h, x_next = x + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d').
    N steps cost 2N - 1 evaluations: the step to sigma = 0 is Euler (d' would divide by sigma = 0).
    """

    stochastic = False

    def __init__(self, alpha: float = 1.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"solver.alpha must lie in (0, 1], got {alpha}")
        self.alpha = alpha

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        alpha = self.alpha
        for i, t_cur, t_next in p.steps():
            x, t_hat = p.churn_up(x, i, t_cur)
            h = t_next - t_hat
            d_cur = p.dx_dt(x, t_hat)
            if i == p.num_steps - 1:
                x = x + h * d_cur
                continue
            x_prime, t_prime = x + alpha * h * d_cur, t_hat + alpha * h
            d_prime = p.dx_dt(x_prime, t_prime)
            x = x + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
        return x

    def __repr__(self) -> str:
        return f"SecondOrder(alpha={self.alpha:g})"


class EulerMaruyama:
    """Euler-Maruyama on the reverse-time SDE (paper Eq. 6 with s(t), beta(t) = sigma'(t)/sigma(t)):

        dx = [dx/dt of the ODE - beta(t) (s(t) D(x/s; sigma) - x)] dt + s(t) sigma(t) sqrt(2 beta(t)) dw,

    which is Song et al.'s VP (and VE) SDE for their sigma(t) and s(t). One evaluation per step.
    """

    stochastic = True

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        for i, t_cur, t_next in p.steps():
            h = t_next - t_cur  # negative: backward in time
            sigma, s = p.sigma(t_cur), p.s(t_cur)
            beta = p.sigma_deriv(t_cur) / sigma
            denoised = p.denoise(x, t_cur)
            x = x + h * (p.drift(x, t_cur, denoised) - beta * (s * denoised - x))
            if i < p.num_steps - 1:
                x = x + s * sigma * (2 * beta * -h).sqrt() * p.randn_like(x)
        return x

    def __repr__(self) -> str:
        return "EulerMaruyama()"


class PredictorCorrector:
    """Song et al.'s predictor-corrector sampler (their VE sampler), on the unscaled x^ = x / s(t):

    at each noise level, `corrector_steps` Langevin steps x^ += eps score + sqrt(2 eps) z with
    eps = 2 (snr ||z|| / ||score||)^2, then the reverse-diffusion predictor to the next level,
    x^ += (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z; score = (D(x^; sigma) - x^) / sigma^2.
    The norms are per sample (Song et al. average them over the batch, which would make an image
    depend on its batch). corrector_steps + 1 evaluations per step.
    """

    stochastic = True

    def __init__(self, snr: float = 0.16, corrector_steps: int = 1) -> None:
        if not snr > 0:
            raise ValueError(f"solver.snr must be > 0, got {snr}")
        if corrector_steps < 0:
            raise ValueError(f"solver.corrector_steps must be >= 0, got {corrector_steps}")
        self.snr, self.corrector_steps = snr, corrector_steps

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        for i, t_cur, t_next in p.steps():
            sigma, sigma_next = p.sigma(t_cur), p.sigma(t_next)
            x_hat = x / p.s(t_cur)
            for _ in range(self.corrector_steps):
                score = (p.denoise(x, t_cur) - x_hat) / sigma ** 2
                z = p.randn_like(x)
                eps = 2 * (self.snr * _norm(z) / _norm(score)) ** 2
                x_hat = x_hat + eps * score + (2 * eps).sqrt() * z
                x = x_hat * p.s(t_cur)
            variance = sigma ** 2 - sigma_next ** 2
            x_hat = x_hat + variance * (p.denoise(x, t_cur) - x_hat) / sigma ** 2
            if i < p.num_steps - 1:
                x_hat = x_hat + variance.sqrt() * p.randn_like(x)
            x = x_hat * p.s(t_next)
        return x

    def __repr__(self) -> str:
        return f"PredictorCorrector(snr={self.snr:g}, corrector_steps={self.corrector_steps})"


class Ancestral:
    """Ancestral sampling (DDPM; iDDPM with the posterior's fixed variance): each step draws x^_next from
    q(x^_next | x^, x_0 = D(x^; sigma)) = N(D + (sigma_next^2 / sigma^2)(x^ - D), sigma_next^2 (1 - sigma_next^2 / sigma^2)),
    on x^ = x / s(t). One evaluation per step.
    """

    stochastic = True

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        for i, t_cur, t_next in p.steps():
            sigma, sigma_next = p.sigma(t_cur), p.sigma(t_next)
            x_hat = x / p.s(t_cur)
            denoised = p.denoise(x, t_cur)
            ratio = sigma_next ** 2 / sigma ** 2
            x_hat = denoised + ratio * (x_hat - denoised)
            if i < p.num_steps - 1:
                x_hat = x_hat + sigma_next * (1 - ratio).sqrt() * p.randn_like(x)
            x = x_hat * p.s(t_next)
        return x

    def __repr__(self) -> str:
        return "Ancestral()"


def _norm(x: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast against x."""
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
