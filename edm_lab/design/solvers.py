"""The solvers of the sampler: each runs a whole trajectory t_0 > ... > t_N = 0 (Section 3, Appendix B).

Every solver is called as `solver(problem, x)` with the state x at t_0 (float64, scaled by s(t_0))
and returns the state at t_N = 0. `problem` (`edm_lab.design.sampler.Problem`) gives it the time
steps, the probability-flow ODE of the chosen sigma(t) and s(t) around the counted denoiser,
churn (Algorithm 2) and the per-seed noise source; whatever a method keeps between steps (a
corrector loop, the history of a multistep method) lives inside its `__call__`.

- ODE solvers, deterministic unless churn adds noise: `Euler`, `SecondOrder` (alpha = 1: Heun,
  Algorithm 1; the last step, to sigma = 0, is Euler).
- The black-box adaptive ODE solver of Figure 2: `RK45` (Dormand-Prince 5(4), as scipy's), with a
  tolerance instead of a step count; each sample takes its own steps and has its own NFE.
- The original stochastic samplers the paper compares against (Figure 4), with churn off:
  `EulerMaruyama` (Song et al.'s reverse SDE, their VP sampler), `PredictorCorrector` (reverse
  diffusion + Langevin corrector, their VE sampler), `Ancestral` (DDPM/iDDPM posterior sampling).
  Their last step, to sigma = 0, adds no noise (Song et al.'s "denoise" of the final mean).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
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


class RK45:
    """Dormand-Prince 5(4) with adaptive steps, as scipy's RK45 (Hairer, Norsett & Wanner, Sec. II.4-5): the
    black-box solver of Song et al.'s probability-flow sampler and of the paper's Figure 2.

    It integrates dx/dt from t_0 to t_{N-1}: only the discretization's first and last levels matter, so
    any N >= 2 gives the same samples (N = 1 integrates nothing). Each sample has its own t and step
    size; its error norm, RMS of err / (atol + rtol max(|x|, |x_new|)), is over its own elements, and a
    denoiser call evaluates the samples still integrating, each at its own t: image i depends on seed i
    alone, and each sample's NFE is counted. A step attempt costs 6 evaluations (the 7th stage, at the
    new point, is the next step's first: FSAL), plus 2 at the start (dx/dt at t_0 and scipy's initial
    step guess). Step control as scipy's: factor 0.9 err^(-1/5) within [0.2, 10], no growth right
    after a rejection.

    The last step, to t_N = 0, is Euler, as in the other ODE solvers and the reference solution: at the
    same t_{N-1} they all tend to the same samples, so `sampler_rmse` measures the integration's error
    alone. It uses the derivative at t_{N-1} that FSAL already holds (no extra evaluation). For
    sigma(t) = t, s(t) = 1 it is exactly the final denoising x = D(x; sigma_{N-1}) (Tweedie's formula,
    Song et al.'s `denoise`); other schedules take their own Euler step, as Heun's last step does.

    Defaults rtol = atol = 1e-5 are Song et al.'s (score_sde's `get_ode_sampler`), the black-box point
    the paper compares against; scipy's own 1e-3 / 1e-6 would be a much coarser point.
    """

    stochastic = False
    C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1)
    A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
    B = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)  # 5th order
    E = (-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)  # 5th minus 4th order
    SAFETY, MIN_FACTOR, MAX_FACTOR, EXPONENT = 0.9, 0.2, 10.0, -1 / 5

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (math.isfinite(tol) and tol > 0):
                raise ValueError(f"solver.{name} must be a finite number > 0, got {tol}")
        self.rtol, self.atol = rtol, atol

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        if p.churn.stochastic:
            raise ValueError("churn (Algorithm 2) raises the noise level at the discretization's steps; RK45 "
                             "takes its own steps: use churn=none")
        t, t_end = p.t_steps[0].repeat(len(x)), p.t_steps[-2]
        f = p.dx_dt(x, _per_sample(t, x), torch.ones_like(t, dtype=torch.bool))
        if t_end < p.t_steps[0]:  # N >= 2 (with N = 1, t_{N-1} is t_0: nothing to integrate)
            x, f = self._integrate(p, x, t, f, t_end)
        return x + (p.t_steps[-1] - t_end) * f

    def _integrate(self, p: Problem, x: Tensor, t: Tensor, f: Tensor, t_end: Tensor) -> tuple[Tensor, Tensor]:
        """Every sample from t (one each) to t_end with its own steps: (x, dx/dt) at t_end."""
        x, t, f = x.clone(), t.clone(), f.clone()
        h_abs = self._initial_step(p, x, t, f, t_end)
        active, rejected = torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.bool)
        while active.any():
            t_a, h_a = t[active], h_abs[active]
            min_step = 10 * (t_a - torch.nextafter(t_a, torch.full_like(t_a, -math.inf)))
            if (rejected[active] & (h_a < min_step)).any():
                raise RuntimeError(f"RK45: the step size fell below float resolution near t={float(t_a.max()):.6g}; "
                                   f"the ODE is too stiff for rtol={self.rtol:g}, atol={self.atol:g}")
            t_new = (t_a - h_a.maximum(min_step)).maximum(t_end)  # the last step lands on t_end exactly
            x_new, f_new, error = self._attempt(p, x[active], t_a, f[active], t_new, active)
            if not torch.isfinite(error).all():
                raise RuntimeError(f"RK45: a non-finite error estimate near t={float(t_a.max()):.6g} (the denoiser's "
                                   "output is not finite?)")
            accept = error < 1
            grow = self.SAFETY * error ** self.EXPONENT
            factor = torch.where(accept, grow.clamp(max=self.MAX_FACTOR), grow.clamp(min=self.MIN_FACTOR))
            factor = torch.where(accept & rejected[active], factor.clamp(max=1), factor)
            rows = active.nonzero().squeeze(1)
            h_abs[rows], rejected[rows] = (t_a - t_new) * factor, ~accept
            done = rows[accept]
            x[done], t[done], f[done] = x_new[accept], t_new[accept], f_new[accept]
            active[done] = t_new[accept] > t_end
        return x, f

    def _attempt(self, p: Problem, x: Tensor, t: Tensor, f: Tensor, t_new: Tensor,
                 active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One Dormand-Prince step of the active samples from t to t_new: (x_new, dx/dt there, error norm)."""
        h = _per_sample(t_new - t, x)
        k = [f]
        for c, a in zip(self.C[1:], self.A[1:]):
            k.append(p.dx_dt(x + h * _combine(a, k), _per_sample(t, x) + c * h, active))
        x_new = x + h * _combine(self.B, k)
        k.append(p.dx_dt(x_new, _per_sample(t_new, x), active))
        scale = self.atol + self.rtol * x.abs().maximum(x_new.abs())
        return x_new, k[-1], _rms(h * _combine(self.E, k) / scale)

    def _initial_step(self, p: Problem, x: Tensor, t: Tensor, f: Tensor, t_end: Tensor) -> Tensor:
        """scipy's `select_initial_step` per sample (Hairer et al., Sec. II.4): one evaluation."""
        interval = t - t_end
        scale = self.atol + self.rtol * x.abs()
        d0, d1 = _rms(x / scale), _rms(f / scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).minimum(interval)
        f1 = p.dx_dt(x - _per_sample(h0, x) * f, _per_sample(t - h0, x), torch.ones_like(t, dtype=torch.bool))
        d2 = _rms((f1 - f) / scale) / h0
        h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), (h0 * 1e-3).clamp(min=1e-6),
                         (0.01 / d1.maximum(d2)) ** (-self.EXPONENT))
        return (100 * h0).minimum(h1).minimum(interval)

    def __repr__(self) -> str:
        return f"RK45(rtol={self.rtol:g}, atol={self.atol:g})"


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample vector shaped to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _combine(weights: tuple[float, ...], k: list[Tensor]) -> Tensor:
    """sum_j weights_j k_j over the nonzero weights."""
    return sum(w * k_j for w, k_j in zip(weights, k) if w)


def _rms(x: Tensor) -> Tensor:
    """Per-sample root mean square (scipy's norm of the step control)."""
    return x.flatten(1).square().mean(1).sqrt()


def _norm(x: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast against x."""
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
