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
- The samplers that came after the paper: `EulerAncestral`, `DPMSolverPP` (2M, 3M), `DPMSolverPP2S`,
  `DPMSolverPP2MSDE`, `UniPC`, `IPNDM`, `DEIS`, `LMS`. They work on x^ = x / s(t) against sigma_i = sigma(t_i):
  the probability-flow ODE in those variables, dx^/dsigma = (x^ - D(x^; sigma)) / sigma, is the same for every
  schedule and scaling (Section 3), so they compose with every schedule, scaling and discretization, and return
  x at t_N = 0. Their last step, to sigma = 0, is first order, from the evaluation at sigma_{N-1} that the loop
  makes anyway, and never divides by sigma_N = 0 or takes log(0): the ODE solvers take the Euler step in t of the
  paper's solvers and of the reference solution (with sigma(t) = t, s = 1: x^_N = D(x^_{N-1}; sigma_{N-1})), those
  that add noise end on x^_N = D, as `Ancestral`. Churn does not apply to them (their history and stages sit on
  the discretization's own levels).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from edm_lab.design.schedules import VP_BETA_D, VP_BETA_MIN

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


# ------------------------------------------------------------------------------------------------
# The samplers that came after the paper. All step x^ = x / s(t) between sigma_i = sigma(t_i); lambda = -log sigma.


class _Ancestral:
    """The ancestral samplers: each step splits sigma_{i+1} into sigma_down, reached by the method's deterministic
    `move`, and sigma_up of fresh noise (`_ancestral_split`); `eta` in [0, 1] is the share of noise drawn afresh
    (0: deterministic). The last step adds no noise."""

    def __init__(self, eta: float) -> None:
        if not (math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"solver.eta must lie in [0, 1], got {eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def move(self, p: Problem, x_hat: Tensor, denoised: Tensor, t_cur: Tensor, sigma: float,
             sigma_down: float) -> Tensor:
        """x^ at sigma_down from x^ at sigma, given D there."""
        raise NotImplementedError

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        _refuse_churn(p, self)
        sigma = p.sigma_host
        x_hat = x / p.s(p.t_steps[0])
        for i, t_cur, t_next in p.steps():
            denoised = _denoise(p, x_hat, t_cur)
            if i == p.num_steps - 1:
                x = _last_step(p, self, x_hat, denoised, t_cur, t_next)
                continue
            sigma_down, sigma_up = _ancestral_split(sigma[i], sigma[i + 1], self.eta)
            x_hat = self.move(p, x_hat, denoised, t_cur, sigma[i], sigma_down)
            if self.stochastic:
                x_hat = x_hat + sigma_up * p.randn_like(x_hat)
        return x


class EulerAncestral(_Ancestral):
    """The Euler ancestral sampler of Crowson's k-diffusion library (`sample_euler_ancestral`).

    Each step splits sigma_{i+1} into the level an Euler step in sigma reaches and fresh noise:
        sigma_up = min(sigma_{i+1}, eta sigma_{i+1} sqrt(1 - sigma_{i+1}^2 / sigma_i^2)),
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2),
        x^ <- D + (sigma_down / sigma_i)(x^ - D) + sigma_up z,   D = D(x^; sigma_i).
    eta = 1 is the DDPM posterior step (`Ancestral`); eta = 0 adds no noise (DDIM, Euler in sigma).
    One evaluation per step; the last step adds no noise.
    """

    def __init__(self, eta: float = 1.0) -> None:
        super().__init__(eta)

    def move(self, p, x_hat, denoised, t_cur, sigma, sigma_down):
        return denoised + sigma_down / sigma * (x_hat - denoised)

    def __repr__(self) -> str:
        return f"EulerAncestral(eta={self.eta:g})"


class DPMSolverPP:
    """DPM-Solver++ multistep in data-prediction form (Lu et al. 2022, "DPM-Solver++"): 2M (order 2), 3M (order 3).

    On x^ the ODE is dx^/dlambda = D - x^, so x^(lambda_i + h) = e^{-h} x^_i + int_0^h e^{-(h - tau)} D dtau with
    h = lambda_{i+1} - lambda_i; D is extrapolated from the last evaluations D_i, D_{i-1}, D_{i-2}:
        order 1 (DDIM):  x^_{i+1} = e^{-h} x^_i + (1 - e^{-h}) D_i
        2M (Algorithm 2): + (1 - e^{-h}) / (2 r0) (D_i - D_{i-1}),          r0 = h_{i-1} / h
        3M: + h phi_2(-h) d1 + h phi_3(-h) d2, with the quadratic through the three points,
            d1_0 = (D_i - D_{i-1}) / r0, d1_1 = (D_{i-1} - D_{i-2}) / r1, r1 = h_{i-2} / h,
            d2 = 2 (d1_0 - d1_1) / (r0 + r1) (~ h^2 D''), d1 = d1_0 + r0 d2 / 2 (~ h D'),
            h phi_2(-h) = (e^{-h} - 1 + h) / h, h phi_3(-h) = (h^2/2 - h + 1 - e^{-h}) / h^2.
    Warm start: step i takes order min(order, i + 1). `lower_order_final` (the authors' advice for fewer than 15
    steps): step i takes at most order N - i, so the step onto sigma_{N-1} is at most 2nd order. The last step,
    to sigma = 0, is first order (`_last_step`). N steps cost N evaluations.
    """

    stochastic = False
    LOWER_ORDER_FINAL_BELOW = 15

    def __init__(self, order: int = 2, lower_order_final: bool = True) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"solver.order must be 1, 2 or 3, got {order}")
        self.order, self.lower_order_final = order, bool(lower_order_final)

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        _refuse_churn(p, self)
        n, lam = p.num_steps, _lambdas(p)
        x_hat, history = x / p.s(p.t_steps[0]), []  # history: D at the last levels, newest last
        for i, t_cur, t_next in p.steps():
            denoised = _denoise(p, x_hat, t_cur)
            history = (history + [denoised])[-self.order:]
            if i == n - 1:
                x = _last_step(p, self, x_hat, denoised, t_cur, t_next)
                continue
            order = _step_order(self.order, i, n, self.lower_order_final)
            h = lam[i + 1] - lam[i]
            x_hat = math.exp(-h) * x_hat - math.expm1(-h) * denoised
            if order == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                x_hat = x_hat - math.expm1(-h) / (2 * r0) * (denoised - history[-2])
            elif order == 3:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0 = (denoised - history[-2]) / r0
                d1_1 = (history[-2] - history[-3]) / r1
                d2 = 2 / (r0 + r1) * (d1_0 - d1_1)
                d1 = d1_0 + r0 / 2 * d2
                x_hat = x_hat + h * _phi(2, -h) * d1 + h * _phi(3, -h) * d2
        return x

    def __repr__(self) -> str:
        return f"DPMSolverPP(order={self.order}, lower_order_final={self.lower_order_final})"


class DPMSolverPP2S(_Ancestral):
    """DPM-Solver++(2S), single-step 2nd order in data-prediction form (Lu et al. 2022, Algorithm 1, r = 1/2):
        sigma_s = sqrt(sigma_i sigma_{i+1}) (the midpoint in lambda),
        u = (sigma_s / sigma_i) x^ + (1 - sigma_s / sigma_i) D_i,
        x^_{i+1} = (sigma_{i+1} / sigma_i) x^ + (1 - sigma_{i+1} / sigma_i) D(u; sigma_s).
    With eta > 0 it is k-diffusion's `sample_dpmpp_2s_ancestral`: the step goes to sigma_down instead of
    sigma_{i+1} (midpoint sqrt(sigma_i sigma_down)), then adds sigma_up z (split as in `EulerAncestral`).
    2 evaluations per step, 1 for the last (first order): 2N - 1. The midpoint level is not one of the
    discretization's: the denoiser gets it as it is (as RK45's stages), a discrete-noise network rounds it itself.
    """

    def __init__(self, eta: float = 0.0) -> None:
        super().__init__(eta)

    def move(self, p, x_hat, denoised, t_cur, sigma, sigma_down):
        ratio = math.sqrt(sigma_down / sigma)  # sigma_s / sigma_i = e^{-h/2}
        # The midpoint's t from the device's sigma(t_i): no host value is copied to the device.
        t_mid = p.schedule.sigma_inv(p.sigma(t_cur) * ratio)
        denoised_mid = _denoise(p, ratio * x_hat + (1 - ratio) * denoised, t_mid)
        return ratio ** 2 * x_hat + (1 - ratio ** 2) * denoised_mid

    def __repr__(self) -> str:
        return f"DPMSolverPP2S(eta={self.eta:g})"


class DPMSolverPP2MSDE:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's `sample_dpmpp_2m_sde`, 'midpoint' type).

    The reverse SDEs dx^ = (1 + eta)(D - x^) dlambda + sqrt(2 eta) sigma dw_lambda share the ODE's marginals
    (eta = 0 is the ODE). With D linear in lambda between the last two evaluations and H = (1 + eta) h:
        x^_{i+1} = e^{-H} x^_i + (1 - e^{-H}) D_i + (1 - e^{-H}) / (2 r0) (D_i - D_{i-1})
                   + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z,
    r0 = h_{i-1} / h (the D difference from the second step on; eta = 0 is DPM-Solver++(2M)). One evaluation per
    step; the last step adds no noise.
    """

    def __init__(self, eta: float = 1.0) -> None:
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"solver.eta must be a finite number >= 0, got {eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        _refuse_churn(p, self)
        n, lam, sigma = p.num_steps, _lambdas(p), p.sigma_host
        x_hat, previous = x / p.s(p.t_steps[0]), None
        for i, t_cur, t_next in p.steps():
            denoised = _denoise(p, x_hat, t_cur)
            if i == n - 1:
                x = _last_step(p, self, x_hat, denoised, t_cur, t_next)
                continue
            h = lam[i + 1] - lam[i]
            decay = -math.expm1(-(1 + self.eta) * h)  # 1 - e^{-H}
            x_hat = math.exp(-(1 + self.eta) * h) * x_hat + decay * denoised
            if previous is not None:
                x_hat = x_hat + decay / (2 * (lam[i] - lam[i - 1]) / h) * (denoised - previous)
            if self.stochastic:
                x_hat = x_hat + sigma[i + 1] * math.sqrt(-math.expm1(-2 * self.eta * h)) * p.randn_like(x_hat)
            previous = denoised
        return x

    def __repr__(self) -> str:
        return f"DPMSolverPP2MSDE(eta={self.eta:g})"


class UniPC:
    """UniPC (Zhao et al. 2023): the UniP-p predictor with the UniC corrector, data prediction, variants bh1/bh2.

    From x^_i and the evaluations D_i, D_{i-k} at r_k = (lambda_{i-k} - lambda_i) / h (k = 1..p-1):
        x^_{i+1} = e^{-h} x^_i + (1 - e^{-h}) D_i + sum_k c_k (D_{i-k} - D_i) / r_k,
        sum_k c_k r_k^{m-1} = m! h phi_{m+1}(-h), m = 1..p-1 (D's Taylor terms through order p-1: order p);
    phi_k(z) = sum_j z^j / (j + k)!, c_k = B(h) a_k with B(h) = h (bh1) or 1 - e^{-h} (bh2); a single term
    takes a_1 = 1/2 instead of solving (the paper's choice; the solution's limit as h -> 0), the only place where
    the variant matters.
    UniC-p: once D_{i+1} = D(x~_{i+1}; sigma_{i+1}) is evaluated at the predicted point (for the next step
    anyway: no extra evaluation), x^_{i+1} is recomputed from x^_i with the same points plus r_p = 1,
    D_{i+1} - D_i, and p conditions: order p + 1 (as the paper shows). The next step starts from the
    corrected x^_{i+1} with D_{i+1} as evaluated. Orders as `DPMSolverPP` (warm start, `lower_order_final`).
    The last step, to sigma = 0, is first order (`_last_step`) from the predicted x~_{N-1}, where D_{N-1} was
    evaluated, and has no corrector (that would take an evaluation at sigma = 0); the step onto sigma_{N-1} is
    not corrected either (with sigma(t) = t, s = 1 the last step is D_{N-1}, which no correction would change).
    N steps cost N evaluations.
    """

    stochastic = False
    VARIANTS = ("bh1", "bh2")

    def __init__(self, order: int = 2, variant: str = "bh1", corrector: bool = True,
                 lower_order_final: bool = True) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"solver.order must be 1, 2 or 3, got {order}")
        if variant not in self.VARIANTS:
            raise ValueError(f"solver.variant must be one of {', '.join(self.VARIANTS)}, got {variant!r}")
        self.order, self.variant = order, variant
        self.corrector, self.lower_order_final = bool(corrector), bool(lower_order_final)

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        _refuse_churn(p, self)
        n, lam = p.num_steps, _lambdas(p)
        x_hat = x / p.s(p.t_steps[0])
        history: list[tuple[float, Tensor]] = []  # (lambda_j, D_j), newest last
        start, used = x_hat, []  # the last predictor's starting state and the points it used
        for i, t_cur, t_next in p.steps():
            denoised = _denoise(p, x_hat, t_cur)
            if i == n - 1:  # from the point D was evaluated at (with sigma(t) = t, s = 1 x^ itself drops out)
                x = _last_step(p, self, x_hat, denoised, t_cur, t_next)
                continue
            if self.corrector and i > 0:
                x_hat = self._update(start, used, lam[i], denoised)
            history = (history + [(lam[i], denoised)])[-self.order:]
            used = history[-_step_order(self.order, i, n, self.lower_order_final):]
            start, x_hat = x_hat, self._update(x_hat, used, lam[i + 1])
        return x

    def _update(self, x_hat: Tensor, points: list[tuple[float, Tensor]], lam_next: float,
                new: Tensor | None = None) -> Tensor:
        """The step from the newest of `points` to lambda_next; with `new` (D there) the corrector's."""
        lam_0, d_0 = points[-1]
        h = lam_next - lam_0
        rs = [(lam_k - lam_0) / h for lam_k, _ in points[:-1]]
        diffs = [(d_k - d_0) / r for (_, d_k), r in zip(points[:-1], rs)]
        if new is not None:
            rs, diffs = rs + [1.0], diffs + [new - d_0]
        x_hat = math.exp(-h) * x_hat - math.expm1(-h) * d_0
        if not diffs:
            return x_hat
        if len(diffs) == 1:
            coeffs = [0.5 * (h if self.variant == "bh1" else -math.expm1(-h))]
        else:
            m = np.arange(1, len(rs) + 1)
            rhs = [math.factorial(k) * h * _phi(k + 1, -h) for k in m]
            coeffs = np.linalg.solve(np.array(rs)[None, :] ** (m[:, None] - 1), np.array(rhs)).tolist()
        return x_hat + sum(c * d for c, d in zip(coeffs, diffs))

    def __repr__(self) -> str:
        return (f"UniPC(order={self.order}, variant={self.variant!r}, corrector={self.corrector}, "
                f"lower_order_final={self.lower_order_final})")


class _EpsilonMultistep:
    """Adams-Bashforth on the derivative eps = dx^/dsigma = (x^ - D) / sigma: x^_{i+1} = x^_i + sum_j w_ij eps_{i-j},
    over the last min(order, i + 1) evaluations (a lower-order warm start). The weights w_ij come from the host
    sigmas before the loop; the last step is first order (`_last_step`). N steps cost N evaluations."""

    stochastic = False
    MAX_ORDER = 4

    def __init__(self, order: int) -> None:
        if not (isinstance(order, int) and 1 <= order <= self.MAX_ORDER):
            raise ValueError(f"solver.order must be an integer in [1, {self.MAX_ORDER}], got {order}")
        self.order = order

    def weights(self, sigma: list[float], i: int, order: int) -> list[float]:
        """w_ij, j = 0..order-1 (j = 0 the newest), of the step from sigma_i to sigma_{i+1}."""
        raise NotImplementedError

    def __call__(self, p: Problem, x: Tensor) -> Tensor:
        _refuse_churn(p, self)
        n, sigma = p.num_steps, p.sigma_host
        weights = [self.weights(sigma, i, min(self.order, i + 1)) for i in range(n - 1)]
        x_hat, eps = x / p.s(p.t_steps[0]), []  # eps: newest first
        for i, t_cur, t_next in p.steps():
            denoised = _denoise(p, x_hat, t_cur)
            if i == n - 1:
                x = _last_step(p, self, x_hat, denoised, t_cur, t_next)
                continue
            eps = [(x_hat - denoised) / sigma[i]] + eps[:self.order - 1]
            x_hat = x_hat + sum(w * e for w, e in zip(weights[i], eps))
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


class IPNDM(_EpsilonMultistep):
    """Improved PNDM (Zhang & Chen 2022, the DEIS paper; k-diffusion's `sample_ipndm`): Adams-Bashforth with the
    fixed coefficients of equal steps on eps = dx^/dsigma, a lower-order warm start, order up to 4:
        x^_{i+1} = x^_i + (sigma_{i+1} - sigma_i) (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3}) / 24
    (orders 1-3: eps_i; (3 eps_i - eps_{i-1}) / 2; (23 eps_i - 16 eps_{i-1} + 5 eps_{i-2}) / 12).
    The coefficients assume equal steps in sigma: order 4 there, where it is `LMS`. On steps whose size changes
    smoothly (every discretization here: h_i - h_{i-1} = O(h^2)) each step is off by O(h (h_i - h_{i-1})) = O(h^3):
    order 2 (measured in tests/test_convergence_order.py). `LMS` takes the steps' own coefficients.
    """

    COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))

    def __init__(self, order: int = 4) -> None:
        super().__init__(order)

    def weights(self, sigma: list[float], i: int, order: int) -> list[float]:
        return [(sigma[i + 1] - sigma[i]) * c for c in self.COEFFS[order - 1]]


class LMS(_EpsilonMultistep):
    """Linear multistep (k-diffusion's `sample_lms`): variable-step Adams-Bashforth on eps = dx^/dsigma,
        w_ij = int_{sigma_i}^{sigma_{i+1}} prod_{k != j} (sigma - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) dsigma,
    the Lagrange polynomials through the last `order` levels, integrated numerically (Gauss-Legendre in
    log sigma, exact to rounding). Order `order` (default 4) on any steps; a lower-order warm start.
    """

    def __init__(self, order: int = 4) -> None:
        super().__init__(order)

    def weights(self, sigma: list[float], i: int, order: int) -> list[float]:
        return _lagrange_integrals(sigma, i, order, lambda s: s)


class DEIS(_EpsilonMultistep):
    """DEIS, tAB (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator").

    The exponential integrator of the VP ODE is, on x^ = x / s and sigma, x^_{i+1} = x^_i + int eps dsigma; tAB
    extrapolates eps by the polynomial in the VP time t through the last `order` evaluations:
        w_ij = int_{sigma_i}^{sigma_{i+1}} L_j(t(sigma)) dsigma,
        L_j(t) = prod_{k != j} (t - t_{i-k}) / (t_{i-j} - t_{i-k}),
    with t(sigma) the VP schedule's inverse at its standard beta_d = 19.9, beta_min = 0.1 (whatever the configured
    schedule, so that the samples do not depend on it), integrated numerically. Order `order` (1: DDIM);
    a lower-order warm start.
    """

    def __init__(self, order: int = 3) -> None:
        super().__init__(order)

    def weights(self, sigma: list[float], i: int, order: int) -> list[float]:
        return _lagrange_integrals(sigma, i, order, _vp_time)


def _refuse_churn(p: Problem, solver: object) -> None:
    if p.churn.stochastic:
        raise ValueError(f"churn (Algorithm 2) raises the noise level before each step; {solver!r} steps between the "
                         "discretization's own levels (its history and stages sit there): use churn=none")


def _last_step(p: Problem, solver: object, x_hat: Tensor, denoised: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
    """The step from t_{N-1} to t_N = 0, x at t_N, from the evaluation D there (no extra one). An ODE solver takes
    the Euler step in t that ends Algorithm 1, the other ODE solvers and the reference solution, so that at the
    same x at t_{N-1} they all end on the same samples and `sampler_rmse` measures the integration's error alone;
    a solver that adds noise ends on x^ = D, as `Ancestral` (Song et al.'s "denoise"). For sigma(t) = t, s = 1 both
    are x^ = D. Neither divides by sigma_N = 0 nor takes log(0)."""
    if getattr(solver, "stochastic", False):
        return denoised * p.s(t_next)
    x = x_hat * p.s(t_cur)
    return x + (t_next - t_cur) * p.drift(x, t_cur, denoised)


def _denoise(p: Problem, x_hat: Tensor, t: Tensor) -> Tensor:
    """D(x^; sigma(t)): one evaluation (the problem's denoiser takes the scaled x = s(t) x^)."""
    return p.denoise(x_hat * p.s(t), t)


def _lambdas(p: Problem) -> list[float]:
    """lambda_i = -log sigma_i for i < N, on the host (sigma_N = 0 has none)."""
    return [-math.log(s) for s in p.sigma_host[:-1]]


def _step_order(order: int, i: int, num_steps: int, lower_order_final: bool) -> int:
    """The order of step i: the history there (i + 1 evaluations), and at most N - i below 15 steps."""
    order = min(order, i + 1)
    if lower_order_final and num_steps < DPMSolverPP.LOWER_ORDER_FINAL_BELOW:
        order = min(order, num_steps - i)
    return order


def _ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def _phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1 - u) z} u^{k-1} / (k-1)! du (phi_1(z) = (e^z - 1) / z): by its series near 0, where the
    recurrence phi_{k+1}(z) = (phi_k(z) - 1/k!) / z would cancel, else by that recurrence."""
    if abs(z) < 1:
        return sum(z ** j / math.factorial(j + k) for j in range(30))
    value = math.expm1(z) / z
    for m in range(1, k):
        value = (value - 1 / math.factorial(m)) / z
    return value


GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(32)


def _lagrange_integrals(sigma: list[float], i: int, order: int, var) -> list[float]:
    """int_{sigma_i}^{sigma_{i+1}} L_j(var(sigma)) dsigma for the Lagrange basis L_j in var through
    var(sigma_{i-j}), j < order. Gauss-Legendre in log sigma: the integrands are analytic there with their
    singularities far off the real line (VP time: Im log sigma = pi/2), so 32 nodes are exact to rounding."""
    nodes, node_weights = GAUSS_LEGENDRE
    a, b = math.log(sigma[i]), math.log(sigma[i + 1])
    s = np.exp((a + b) / 2 + (b - a) / 2 * nodes)
    dsigma = (b - a) / 2 * node_weights * s
    v, points = var(s), [var(np.float64(sigma[i - j])) for j in range(order)]
    out = []
    for j in range(order):
        basis = np.ones_like(s)
        for k in range(order):
            if k != j:
                basis *= (v - points[k]) / (points[j] - points[k])
        out.append(float((basis * dsigma).sum()))
    return out


def _vp_time(sigma):
    """t(sigma) of the VP schedule at beta_d = 19.9, beta_min = 0.1, without the cancellation at small sigma."""
    log_var = np.log1p(np.square(sigma))
    return 2 * log_var / (np.sqrt(VP_BETA_MIN ** 2 + 2 * VP_BETA_D * log_var) + VP_BETA_MIN)


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
