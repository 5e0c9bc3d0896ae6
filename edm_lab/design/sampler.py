"""One sampler for every combination of the sampling axes (Algorithm 1 + 2 of the paper).

`sample` takes x from t_0 down to t_N = 0 over the time steps of a discretization with a solver
(`edm_lab.design.solvers`); the ODE solvers integrate the probability-flow ODE
    dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t)),
optionally raising the noise level before each step (churn, Algorithm 2); the adaptive `RK45` takes
its own steps, per sample, from t_0 to t_{N-1}. The state is float64.
`Problem` is what every solver is handed.
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
from edm_lab.design.solvers import SecondOrder

RandnLike = Callable[[Tensor], Tensor]


class Solver(Protocol):
    """Runs a whole trajectory: `solver(problem, x at t_0) -> x at t_N = 0` (see `edm_lab.design.solvers`)."""

    stochastic: bool

    def __call__(self, problem: "Problem", x: Tensor) -> Tensor: ...


class Denoiser(Protocol):
    """D(x; sigma) with the noise range it supports and its own rounding of sigma."""

    sigma_min: float
    sigma_max: float

    def round_sigma(self, sigma: Tensor) -> Tensor: ...
    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


class CountingDenoiser:
    """Counts denoiser calls: the sampler's NFE is measured, never derived from a formula.

    `calls` counts the network evaluations: one per call, or the denoiser's `evaluations_per_call` (a guided
    denoiser, `edm_lab.design.guidance`). A solver whose samples take their own steps passes `active`, the mask
    of the batch's samples a call evaluates; from then on `per_sample` holds each sample's own count.
    """

    def __init__(self, net: Denoiser) -> None:
        self.net, self.calls = net, 0
        self.per_sample: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None,
                 active: Tensor | None = None) -> Tensor:
        # A guided denoiser runs two networks per call (edm_lab.design.guidance): NFE counts network evaluations.
        n = getattr(self.net, "evaluations_per_call", 1)
        if active is not None and self.per_sample is None:  # the calls before evaluated every sample
            self.per_sample = torch.full(active.shape, self.calls, dtype=torch.int64, device=active.device)
        if self.per_sample is not None:
            self.per_sample += n if active is None else n * active
        self.calls += n
        return self.net(x, sigma, class_labels)


@dataclass
class SampleResult:
    """Final samples (float64) and the denoiser evaluations they cost.

    `nfe` is the number of denoiser calls, each sample's NFE when all take the same steps. A solver
    whose samples take their own steps (`RK45`) also gives each sample's own count, `nfe_per_sample`
    (int64, one per sample).
    """

    x: Tensor
    nfe: int
    nfe_per_sample: Tensor | None = None


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


@dataclass
class Problem:
    """What every solver is handed: the time steps t_0 > ... > t_N = 0, the probability-flow ODE of the
    fitted schedule and bound scaling around the counted denoiser, churn and the per-seed noise source."""

    net: Denoiser
    t_steps: Tensor
    schedule: Schedule
    scaling: Scaling
    churn: Churn
    class_labels: Tensor | None = None
    randn_like: RandnLike = torch.randn_like
    progress: Callable[[Iterable], Iterable] | None = None
    sigma_host: list[float] | None = None  # sigma(t_i) as host floats; None: read off t_steps (a device sync)

    def __post_init__(self) -> None:
        self.D = CountingDenoiser(self.net)
        if self.sigma_host is None:
            self.sigma_host = [float(v) for v in self.schedule.sigma(self.t_steps.detach().cpu())]

    @property
    def num_steps(self) -> int:
        return len(self.t_steps) - 1

    def steps(self) -> Iterable[tuple[int, Tensor, Tensor]]:
        """(i, t_i, t_{i+1}) for every step."""
        steps = [(i, t_cur, t_next) for i, (t_cur, t_next) in enumerate(zip(self.t_steps[:-1], self.t_steps[1:]))]
        return self.progress(steps) if self.progress else steps

    def sigma(self, t: Tensor) -> Tensor:
        return self.schedule.sigma(t)

    def sigma_deriv(self, t: Tensor) -> Tensor:
        return self.schedule.sigma_deriv(t)

    def s(self, t: Tensor) -> Tensor:
        return self.scaling.s(t)

    def denoise(self, x: Tensor, t: Tensor, active: Tensor | None = None) -> Tensor:
        """D(x / s(t); sigma(t)) in float64: one denoiser evaluation.

        With `active`, the mask of the batch's samples that x holds, t is theirs one each (shaped to
        broadcast against x): D gets their sigmas as a vector, and each of them is charged one evaluation.
        """
        if active is None:
            return self.D(x / self.s(t), self.sigma(t), self.class_labels).to(torch.float64)
        labels = None if self.class_labels is None else self.class_labels[active]
        return self.D(x / self.s(t), self.sigma(t).flatten(), labels, active).to(torch.float64)

    def drift(self, x: Tensor, t: Tensor, denoised: Tensor) -> Tensor:
        """dx/dt of the probability-flow ODE at (x, t), given D's output there."""
        sigma, sigma_deriv, s, s_deriv = self.sigma(t), self.sigma_deriv(t), self.s(t), self.scaling.s_deriv(t)
        return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised

    def dx_dt(self, x: Tensor, t: Tensor, active: Tensor | None = None) -> Tensor:
        """dx/dt of the probability-flow ODE: one denoiser evaluation (`active`: see `denoise`)."""
        return self.drift(x, t, self.denoise(x, t, active))

    def churn_up(self, x: Tensor, i: int, t_cur: Tensor) -> tuple[Tensor, Tensor]:
        """Algorithm 2, lines 4-6: raise the noise level to sigma_hat = sigma (1 + gamma_i) with fresh noise.

        Draws noise at every step, as the reference does (zero-scaled where gamma_i = 0), so that
        a per-seed generator gives the same image whatever the batch size.
        """
        sigma, s, churn = self.sigma, self.s, self.churn
        sigma_cur = sigma(t_cur)
        # gamma_i is decided on the host from sigma(t_i) kept there: reading it off the device would wait for
        # the GPU at every step.
        gamma = churn.gamma(self.sigma_host[i], self.num_steps)
        t_hat = self.schedule.sigma_inv(round_sigma(self.net, sigma_cur + gamma * sigma_cur))
        noise_std = (sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() * s(t_hat) * churn.S_noise
        return s(t_hat) / s(t_cur) * x + noise_std * self.randn_like(x), t_hat


def sample(net: Denoiser, latents: Tensor, num_steps: int, *,
           schedule: Schedule | None = None, scaling: Scaling | None = None,
           discretization: Discretization | None = None, solver: Solver | None = None, churn: Churn | None = None,
           class_labels: Tensor | None = None, randn_like: RandnLike = torch.randn_like,
           progress: Callable[[Iterable], Iterable] | None = None) -> SampleResult:
    """Draw samples from standard-normal `latents` with the chosen design axes.

    Defaults are the EDM choices: sigma(t) = t, s(t) = 1, the rho = 7 discretization, Heun.
    `randn_like` supplies the solver's fresh noise (churn, or a stochastic solver's steps), so a
    per-seed generator gives the same image whatever the batch size.
    """
    solver = solver or SecondOrder(alpha=1.0)
    churn = churn or Churn()
    if solver.stochastic and churn.stochastic:
        raise ValueError(f"churn (Algorithm 2) raises the noise level of the ODE solvers; {solver!r} is stochastic "
                         "itself: use churn=none")
    # The time steps are computed on the host (float64), kept there for the host-side decisions of the step
    # loop, and copied to the device once: the loop itself never waits for the device.
    t_host, schedule = time_steps(net, num_steps, schedule or LinearSchedule(), discretization or EDMDiscretization())
    sigma_host = [float(v) for v in schedule.sigma(t_host)]
    problem = Problem(net, t_host.to(latents.device), schedule, (scaling or NoScaling()).bind(schedule), churn,
                      class_labels, randn_like, progress, sigma_host)
    t_0 = problem.t_steps[0]
    x = latents.to(torch.float64) * (problem.sigma(t_0) * problem.s(t_0))
    return SampleResult(x=solver(problem, x), nfe=problem.D.calls, nfe_per_sample=problem.D.per_sample)


def stochastic(solver: Solver, churn: Churn) -> bool:
    """Whether sampling adds fresh noise (then there is no ODE solution to measure the error against)."""
    return solver.stochastic or churn.stochastic


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
