"""Each deterministic solver's order of convergence, measured against the exact solution of the probability-flow ODE.

The data: a Gaussian with a different mean and standard deviation (0.1 to 0.8) in each of 8 dimensions. Its ideal
denoiser is closed-form, D(x^; sigma) = MEAN + STD^2 / (STD^2 + sigma^2) (x^ - MEAN), and so is the ODE's solution
from sigma_0, x^(sigma) = MEAN + (x^_0 - MEAN) sqrt(STD^2 + sigma^2) / sqrt(STD^2 + sigma_0^2), for every sigma(t)
and s(t): no reference solver's error enters. With one variance for all dimensions the data-prediction methods
would see D(lambda) of a single shape; with eight, D and eps = (x^ - D) / sigma change at eight scales
(sigma ~ STD) between sigma_0 = 80 and sigma_{N-1} = 0.002, and no method is exact on any of them.

Where the error is measured: with sigma(t) = t, s = 1 every solver ends with x^_N = D(x^_{N-1}; sigma_{N-1}) (the
Euler step in t), which is exact given x^_{N-1} and, D being linear in x^ here, scales its error per dimension by
STD^2 / (STD^2 + sigma_{N-1}^2) ~ 1. The output's error is thus the error after the N - 1 ODE
steps from sigma_0 to sigma_{N-1}, where the theory applies; compared at the output, the whole trajectory is
covered with the last step handled the same way in the solver and in the exact solution.

The steps are the EDM ones (rho = 7), a smooth map of equal steps, so a method of order p has an error ~ C N^-p.
The multistep methods start with lower orders (the first step is first order). That adds a single local error
O(h^2) which, in exact asymptotics, caps the global order at 2; here it is made at sigma = 80, where D and eps
hardly change (their derivatives are ~ STD^2 / sigma^2 and STD^2 / sigma^3), and the flow shrinks it by
sqrt(STD^2 + sigma_{N-1}^2) / 80 <= 0.01 on its way: by that estimate, ~1e-3 / N^2, it is at most ~10% of the
measured error (the 4th-order methods at N = 512) and under 1% for the others. The step counts of each method are
chosen where its error is in the asymptotic regime and far above float64 rounding (>= 1e-9 here).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.churn import Churn
from edm_lab.design.sampler import Problem, sample, time_steps
from edm_lab.design.solvers import (DEIS, IPNDM, LMS, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP2S, Euler,
                                    EulerAncestral, SecondOrder, UniPC)

MEAN = torch.tensor([0.5, -0.3, 0.1, 0.0, 1.0, -1.0, 0.2, 0.7], dtype=torch.float64)
STD = torch.tensor([0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8], dtype=torch.float64)
LATENTS = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
EDM_AXES = {"schedule": S.LinearSchedule(), "scaling": S.NoScaling(), "discretization": D.EDMDiscretization()}

LOW, MID, HIGH = [16, 24, 32, 48, 64, 96, 128], [64, 96, 128, 192, 256, 384, 512], [192, 256, 384, 512]

# name: (solver, theoretical order, step counts). UniPC's UniC corrector raises UniP-p to order p + 1 (Zhao et al.
# 2023, Sec. 3); our UniC reuses the next step's evaluation, made at the predicted point: that evaluation differs
# from one at the corrected point by O(h^(p+1)) and enters the next step with a weight O(h), so the order stays p + 1.
# iPNDM's fixed coefficients hold for equal steps only: on the EDM steps, whose sizes change by O(h^2) from one
# step to the next, each step is off by O(h (h_i - h_{i-1})) = O(h^3), hence order 2 (on equal steps it is LMS,
# `test_ipndm_is_lms_on_equal_steps`).
CASES = {
    "euler": (Euler(), 1, LOW),
    "heun": (SecondOrder(1.0), 2, MID),
    "ddim": (EulerAncestral(eta=0.0), 1, LOW),
    "dpmpp_2m": (DPMSolverPP(order=2), 2, MID),
    "dpmpp_3m": (DPMSolverPP(order=3), 3, MID),
    "dpmpp_2s": (DPMSolverPP2S(), 2, LOW),
    "dpmpp_2m_sde_eta0": (DPMSolverPP2MSDE(eta=0.0), 2, MID),
    "unip_2": (UniPC(order=2, corrector=False), 2, MID),
    "unip_3": (UniPC(order=3, corrector=False), 3, MID),
    "unipc_2_bh1": (UniPC(order=2, variant="bh1"), 3, MID),
    "unipc_2_bh2": (UniPC(order=2, variant="bh2"), 3, MID),
    "unipc_3_bh1": (UniPC(order=3, variant="bh1"), 4, MID),
    "unipc_3_bh2": (UniPC(order=3, variant="bh2"), 4, MID),
    "ipndm": (IPNDM(), 2, MID),
    "deis_2": (DEIS(order=2), 2, MID),
    "deis_3": (DEIS(order=3), 3, HIGH),
    "deis_4": (DEIS(order=4), 4, HIGH),
    "lms_2": (LMS(order=2), 2, MID),
    "lms_3": (LMS(order=3), 3, HIGH),
    "lms_4": (LMS(order=4), 4, HIGH),
}


class AnisotropicGaussian:
    """The ideal denoiser of N(MEAN, diag(STD^2))."""

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return MEAN + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MEAN)


def exact(num_steps: int, axes: dict) -> torch.Tensor:
    """The exact solution at t_{N-1}, then the last step every ODE solver takes (x^_N = D with sigma(t) = t, s = 1)."""
    p = problem(num_steps, axes)
    sigma_0, sigma_end = p.sigma(p.t_steps[0]), p.sigma(p.t_steps[-2])
    x_end = MEAN + (LATENTS * sigma_0 - MEAN) * ((STD ** 2 + sigma_end ** 2) / (STD ** 2 + sigma_0 ** 2)).sqrt()
    return last_step(p, x_end)


def problem(num_steps: int, axes: dict) -> Problem:
    t_steps, schedule = time_steps(AnisotropicGaussian(), num_steps, axes["schedule"], axes["discretization"])
    return Problem(AnisotropicGaussian(), t_steps, schedule, axes["scaling"].bind(schedule), Churn())


def last_step(p: Problem, x_hat: torch.Tensor) -> torch.Tensor:
    """The Euler step in t from x^ at t_{N-1} to t_N = 0 (Algorithm 1's, the reference solution's), x at t_N."""
    t_end = p.t_steps[-2]
    x = x_hat * p.s(t_end)
    return x + (p.t_steps[-1] - t_end) * p.dx_dt(x, t_end)


def rms_error(solver, num_steps: int, axes: dict = EDM_AXES) -> float:
    result = sample(AnisotropicGaussian(), LATENTS, num_steps, solver=solver, **axes)
    return float((result.x - exact(num_steps, axes)).square().mean().sqrt())


def measured_order(steps: list[int], errors: list[float]) -> float:
    """Minus the least-squares slope of log(error) against log(N)."""
    slope, _ = np.polyfit(np.log(steps), np.log(errors), 1)
    return -float(slope)


@pytest.mark.parametrize("name", list(CASES))
def test_measured_order_is_the_theoretical_one(name):
    solver, order, steps = CASES[name]
    errors = [rms_error(solver, n) for n in steps]
    assert min(errors) > 1e-9, errors  # far above float64 rounding (~1e-15 relative here)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert measured_order(steps, errors) == pytest.approx(order, abs=0.2), (errors, measured_order(steps, errors))


def test_ipndm_is_lms_on_equal_steps():
    """On steps of equal size in sigma (rho = 1) iPNDM's fixed coefficients are the variable-step ones of LMS(4),
    whose order 4 is measured above: the same samples to rounding."""
    axes = {**EDM_AXES, "discretization": D.EDMDiscretization(sigma_min=0.5, sigma_max=5, rho=1)}
    for n in (3, 5, 24):
        ipndm = sample(AnisotropicGaussian(), LATENTS, n, solver=IPNDM(), **axes).x
        lms = sample(AnisotropicGaussian(), LATENTS, n, solver=LMS(order=4), **axes).x
        torch.testing.assert_close(ipndm, lms, rtol=0, atol=1e-12)
    edm = [sample(AnisotropicGaussian(), LATENTS, 24, solver=s, **EDM_AXES).x for s in (IPNDM(), LMS(order=4))]
    assert float((edm[0] - edm[1]).abs().max()) > 1e-4  # on changing steps they differ


def test_the_first_order_methods_are_one_method():
    """Euler with sigma(t) = t, DDIM (DPM-Solver++ of order 1, Euler ancestral at eta = 0) and the multistep methods of
    order 1 all take x^_{i+1} = x^_i + (sigma_{i+1} - sigma_i)(x^_i - D_i) / sigma_i."""
    euler = sample(AnisotropicGaussian(), LATENTS, 12, solver=Euler()).x
    for solver in (EulerAncestral(eta=0.0), DPMSolverPP(order=1), UniPC(order=1, corrector=False), IPNDM(order=1),
                   LMS(order=1), DEIS(order=1)):
        torch.testing.assert_close(sample(AnisotropicGaussian(), LATENTS, 12, solver=solver).x, euler,
                                   rtol=0, atol=1e-12, msg=repr(solver))


def test_exponential_integrators_share_their_steps():
    """UniP with bh2 is DPM-Solver++ multistep (the same polynomial extrapolation of D in lambda; its one-term step
    is the 2M step), and the 2M SDE at eta = 0 is the ODE's 2M."""
    for n in (2, 7, 20):  # below and above 15 steps (lower-order final steps)
        for order in (2, 3):
            ours = sample(AnisotropicGaussian(), LATENTS, n, solver=DPMSolverPP(order=order)).x
            unip = sample(AnisotropicGaussian(), LATENTS, n, solver=UniPC(order=order, variant="bh2",
                                                                          corrector=False)).x
            torch.testing.assert_close(unip, ours, rtol=0, atol=1e-11)
        sde = sample(AnisotropicGaussian(), LATENTS, n, solver=DPMSolverPP2MSDE(eta=0.0)).x
        torch.testing.assert_close(sde, sample(AnisotropicGaussian(), LATENTS, n, solver=DPMSolverPP(order=2)).x,
                                   rtol=0, atol=1e-12)


def test_lower_order_final_steps_below_15():
    """Below 15 steps 3M's step onto sigma_{N-1} is the 2M step; from 15 on it is 3rd order; off, always 3rd order."""
    for n, differs in ((10, True), (14, True), (15, False), (20, False)):
        on = sample(AnisotropicGaussian(), LATENTS, n, solver=DPMSolverPP(order=3)).x
        off = sample(AnisotropicGaussian(), LATENTS, n, solver=DPMSolverPP(order=3, lower_order_final=False)).x
        assert (float((on - off).abs().max()) > 1e-9) == differs, n
    assert math.isfinite(rms_error(DPMSolverPP(order=3), 3))
