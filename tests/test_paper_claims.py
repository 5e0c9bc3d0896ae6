"""The paper's central sampling claim, measured on the ideal denoiser of the digits data set.

Measured truncation error: RMS distance of each sampler's output to a 256-step Heun solution
of the same ODE from the same latents. On this memorising denoiser the EDM sampler wins from
the paper's 35-NFE operating point upward; below ~20 NFE the original VP sampler lands more
samples on the exact solution's data point (see the issue note for the full curve).
"""
from __future__ import annotations

import pytest

from edm_lab.data import digits
from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.precond import EDMPrecond, VPPrecond
from edm_lab.design.sampler import PerSampleNoise, sample
from edm_lab.design.solvers import Euler, SecondOrder
from edm_lab.evaluate.sampling import reference_sampler, rms_error, start_sigma
from edm_lab.nets.ideal import ideal_denoiser

ORIGINAL_VP = dict(schedule=S.VPSchedule(), scaling=S.VPScaling(), discretization=D.VPDiscretization(), solver=Euler())
EDM = dict(schedule=S.LinearSchedule(), scaling=S.NoScaling(), discretization=D.EDMDiscretization(),
           solver=SecondOrder(1.0))


def sampler_error(net, latents, axes: dict, num_steps: int) -> tuple[float, int]:
    sigma0 = start_sigma(net, num_steps, axes["discretization"])
    reference = reference_sampler(sigma0, 256)(net, latents).x
    result = sample(net, latents, num_steps, **axes)
    return rms_error(result.x, reference), result.nfe


def test_heun_edm_discretization_beats_euler_vp_at_equal_nfe():
    data = digits()
    latents = PerSampleNoise(range(256)).randn((256, *data.sample_shape))
    vp_net, edm_net = ideal_denoiser(data, VPPrecond), ideal_denoiser(data, EDMPrecond)
    for heun_steps in (18, 35):  # 35 and 69 NFE
        edm_error, edm_nfe = sampler_error(edm_net, latents, EDM, heun_steps)
        vp_error, vp_nfe = sampler_error(vp_net, latents, ORIGINAL_VP, 2 * heun_steps - 1)
        assert edm_nfe == vp_nfe == 2 * heun_steps - 1
        assert edm_error < 0.85 * vp_error, (edm_nfe, edm_error, vp_error)


@pytest.mark.parametrize("steps", [6, 12])
def test_heun_beats_euler_at_equal_nfe_on_the_edm_discretization(steps):
    """Same discretization family, Heun at N steps vs Euler at 2N - 1 steps."""
    data = digits()
    latents = PerSampleNoise(range(128)).randn((128, *data.sample_shape))
    net = ideal_denoiser(data, EDMPrecond)
    heun_error, heun_nfe = sampler_error(net, latents, EDM, steps)
    euler_error, euler_nfe = sampler_error(net, latents, {**EDM, "solver": Euler()}, 2 * steps - 1)
    assert heun_nfe == euler_nfe
    assert heun_error < euler_error
