"""The sampler's step loop never reads a tensor back to the host (on a GPU every such read waits for it).

Every fixed-step solver runs with churn on and off, and every stochastic one, while any conversion of a
tensor to a Python value (`item`, `tolist`, `float`, `int`, `bool`, formatting) raises. The adaptive RK45
decides per sample which steps to take, so it reads its step control back by design and is left out.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import EDMDiscretization, IDDPMDiscretization, VPDiscretization
from edm_lab.design.sampler import PerSampleNoise, sample
from edm_lab.design.schedules import LinearSchedule, VPScaling, VPSchedule
from edm_lab.design.solvers import (DEIS, IPNDM, LMS, Ancestral, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP2S, Euler,
                                    EulerAncestral, EulerMaruyama, PredictorCorrector, SecondOrder, UniPC)

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__")


class GaussianDenoiser:
    """The exact denoiser of N(0, sigma_data^2 I) data: pure tensor arithmetic."""

    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 0.5

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)


@contextlib.contextmanager
def no_host_reads() -> Iterator[list[str]]:
    """Every tensor-to-Python conversion raises inside; yields the list of those attempted."""
    attempted: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def refuse(name):
        def method(self, *args, **kwargs):
            attempted.append(name)
            raise AssertionError(f"host read of a tensor ({name}) inside the step loop")
        return method

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield attempted
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class StepLoopGuard:
    """A solver wrapper that forbids host reads while the wrapped solver runs its whole loop."""

    def __init__(self, solver) -> None:
        self.solver, self.stochastic = solver, solver.stochastic

    def __call__(self, problem, x):
        with no_host_reads():
            return self.solver(problem, x)


@pytest.mark.parametrize("solver,churn", [
    (Euler(), Churn()), (SecondOrder(1.0), Churn()), (SecondOrder(0.5), Churn()),
    (Euler(), Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
    (SecondOrder(1.0), Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
    (EulerMaruyama(), Churn()), (PredictorCorrector(), Churn()), (Ancestral(), Churn()),
    (EulerAncestral(), Churn()), (EulerAncestral(eta=0.0), Churn()), (DPMSolverPP(order=2), Churn()),
    (DPMSolverPP(order=3), Churn()), (DPMSolverPP2S(), Churn()), (DPMSolverPP2S(eta=1.0), Churn()),
    (DPMSolverPP2MSDE(), Churn()), (UniPC(order=3, variant="bh1"), Churn()), (UniPC(order=2, variant="bh2"), Churn()),
    (IPNDM(), Churn()), (DEIS(), Churn()), (LMS(), Churn()),
])
@pytest.mark.parametrize("axes", ["edm", "vp", "iddpm"])
def test_the_step_loop_reads_nothing_back(solver, churn, axes):
    schedule, scaling, discretization = {
        "edm": (LinearSchedule(), None, EDMDiscretization()),
        "vp": (VPSchedule(), VPScaling(), VPDiscretization()),
        "iddpm": (LinearSchedule(), None, IDDPMDiscretization()),
    }[axes]
    noise = PerSampleNoise(range(4))
    latents = noise.randn((4, 3, 4, 4))
    guarded = sample(GaussianDenoiser(), latents, 6, schedule=schedule, scaling=scaling, discretization=discretization,
                     solver=StepLoopGuard(solver), churn=churn, randn_like=PerSampleNoise(range(4)).randn_like)
    plain = sample(GaussianDenoiser(), latents, 6, schedule=schedule, scaling=scaling, discretization=discretization,
                   solver=solver, churn=churn, randn_like=PerSampleNoise(range(4)).randn_like)
    assert torch.equal(guarded.x, plain.x) and torch.isfinite(plain.x).all()


def test_the_guard_catches_a_host_read():
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        float(torch.ones(()))
    assert float(torch.ones(())) == 1.0  # restored
