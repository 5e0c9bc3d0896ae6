"""One sampler for every combination of the sampling axes (Algorithm 1 + 2 of the paper).

`sample` integrates the probability-flow ODE
    dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t))
from t_0 down to t_N = 0 over the time steps of a discretization, optionally raising the noise
level before each step (churn). The state is float64; the last step is always Euler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import Tensor

from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import Discretization, EDMDiscretization
from edm_lab.design.schedules import LinearSchedule, NoScaling, Scaling, Schedule
from edm_lab.design.solvers import SecondOrder, euler_step

RandnLike = Callable[[Tensor], Tensor]


class Denoiser(Protocol):
    """D(x; sigma) with the noise range it supports and its own rounding of sigma."""

    sigma_min: float
    sigma_max: float

    def round_sigma(self, sigma: Tensor) -> Tensor: ...
    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


class CountingDenoiser:
    """Counts denoiser calls: the sampler's NFE is measured, never derived from a formula."""

    def __init__(self, net: Denoiser) -> None:
        self.net, self.calls = net, 0

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.net(x, sigma, class_labels)


@dataclass
class SampleResult:
    """Final samples (float64) and the number of denoiser evaluations each one cost."""

    x: Tensor
    nfe: int


def round_sigma(net: Denoiser, sigma: Tensor) -> Tensor:
    """The denoiser's own rounding of noise levels (identity for continuous networks)."""
    fn = getattr(net, "round_sigma", None)
    return sigma if fn is None else fn(sigma)


def noise_levels(net: Denoiser, num_steps: int, discretization: Discretization,
                 device: torch.device | str = "cpu") -> tuple[Tensor, tuple[float, float]]:
    """sigma_0 > ... > sigma_{N-1}, rounded as the denoiser rounds, and the noise range they span."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min, sigma_max = discretization.noise_range(getattr(net, "sigma_min", 0.0),
                                                      getattr(net, "sigma_max", math.inf))
    sigma_steps = discretization.sigma_steps(num_steps, sigma_min, sigma_max, dtype=torch.float64, device=device)
    return round_sigma(net, sigma_steps), (sigma_min, sigma_max)


def time_steps(net: Denoiser, num_steps: int, schedule: Schedule, discretization: Discretization,
               device: torch.device | str = "cpu") -> tuple[Tensor, Schedule]:
    """t_0 > ... > t_{N-1} > t_N = 0 and the schedule fitted to the sampler's noise range."""
    levels, (sigma_min, sigma_max) = noise_levels(net, num_steps, discretization, device)
    schedule = schedule.fit(sigma_min, sigma_max)
    t_steps = schedule.sigma_inv(levels)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])]), schedule


def sample(net: Denoiser, latents: Tensor, num_steps: int, *,
           schedule: Schedule | None = None, scaling: Scaling | None = None,
           discretization: Discretization | None = None, solver=None, churn: Churn | None = None,
           class_labels: Tensor | None = None, randn_like: RandnLike = torch.randn_like,
           progress: Callable[[Iterable], Iterable] | None = None) -> SampleResult:
    """Draw samples from standard-normal `latents` with the chosen design axes.

    Defaults are the EDM choices: sigma(t) = t, s(t) = 1, the rho = 7 discretization, Heun.
    `randn_like` supplies the churn noise (one draw per step, as in the reference, so a
    per-seed generator gives the same image whatever the batch size).
    """
    schedule = schedule or LinearSchedule()
    scaling = scaling or NoScaling()
    discretization = discretization or EDMDiscretization()
    solver = solver or SecondOrder(alpha=1.0)
    churn = churn or Churn()
    D = CountingDenoiser(net)

    t_steps, schedule = time_steps(net, num_steps, schedule, discretization, device=latents.device)
    scaling = scaling.bind(schedule)
    sigma, sigma_deriv, sigma_inv = schedule.sigma, schedule.sigma_deriv, schedule.sigma_inv
    s, s_deriv = scaling.s, scaling.s_deriv

    def dx_dt(x: Tensor, t: Tensor) -> Tensor:
        denoised = D(x / s(t), sigma(t), class_labels).to(torch.float64)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    x = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    steps = list(enumerate(zip(t_steps[:-1], t_steps[1:])))
    for i, (t_cur, t_next) in (progress(steps) if progress else steps):
        # Churn: move up to sigma_hat = sigma (1 + gamma) by adding fresh noise.
        sigma_cur = sigma(t_cur)
        gamma = churn.gamma(float(sigma_cur), num_steps)
        t_hat = sigma_inv(round_sigma(net, sigma_cur + gamma * sigma_cur))
        noise_std = (sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() * s(t_hat) * churn.S_noise
        x = s(t_hat) / s(t_cur) * x + noise_std * randn_like(x)
        # The step to sigma = 0 is Euler for every solver: a 2nd-order correction there would divide by 0.
        step = euler_step if i == num_steps - 1 else solver.step
        x = step(dx_dt, x, t_hat, t_next)
    return SampleResult(x=x, nfe=D.calls)


class PerSampleNoise:
    """Standard-normal draws from one generator per sample seed (the reference's protocol).

    Latents are drawn in float32 and churn noise in the state's dtype, exactly like the
    reference's StackedRandomGenerator, so seed i gives the same image in any batch.
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size: tuple[int, ...] | torch.Size, **kwargs) -> Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f"batch of {size[0]} does not match {len(self.generators)} seeds")
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size: tuple[int, ...], **kwargs) -> Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f"batch of {size[0]} does not match {len(self.generators)} seeds")
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])
