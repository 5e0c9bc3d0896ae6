"""The samplers that came after the paper (DPM-Solver++, UniPC, iPNDM, DEIS, LMS, Euler ancestral): their cost, the
per-seed protocol, composition with every schedule, scaling and discretization, the stochastic ones' distribution,
churn and bad parameters refused, and DPM-Solver++(2M) against the paper's update written out here.
Their orders of convergence: tests/test_convergence_order.py."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra.utils import instantiate

from edm_lab.data.datasets import digits
from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.churn import Churn
from edm_lab.design.sampler import PerSampleNoise, sample, time_steps
from edm_lab.design.solvers import (DEIS, IPNDM, LMS, Ancestral, DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP2S,
                                    EulerAncestral, UniPC)
from edm_lab.evaluate.sampling import sample_seeds
from edm_lab.nets.ideal import ideal_denoiser
from edm_lab.tasks import schema
from tests.test_configs import compose_cfg
from tests.test_convergence_order import LATENTS, MEAN, STD, AnisotropicGaussian, exact, last_step, problem
from tests.test_stochastic_samplers import ORIGINAL_AXES, GaussianDenoiser, moments_error

OPTIONS = ["euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "unipc",
           "unipc_bh1", "ipndm", "deis", "lms"]
DETERMINISTIC = {"ddim": EulerAncestral(eta=0.0), "dpmpp_2m": DPMSolverPP(order=2), "dpmpp_3m": DPMSolverPP(order=3),
                 "dpmpp_2s": DPMSolverPP2S(), "unipc_3_bh1": UniPC(order=3, variant="bh1"),
                 "unipc_2_bh2": UniPC(order=2, variant="bh2"), "ipndm": IPNDM(), "deis": DEIS(), "lms": LMS()}
STOCHASTIC = {"euler_ancestral": EulerAncestral(), "euler_ancestral_eta0.5": EulerAncestral(eta=0.5),
              "dpmpp_2s_ancestral": DPMSolverPP2S(eta=1.0), "dpmpp_2m_sde": DPMSolverPP2MSDE(),
              "dpmpp_2m_sde_eta0.5": DPMSolverPP2MSDE(eta=0.5)}


@functools.lru_cache(maxsize=1)
def digits_denoiser():
    return ideal_denoiser(digits(limit=128))


# ------------------------------------------------------------------------------------------------
# Cost and schema


@pytest.mark.parametrize("option", OPTIONS)
def test_nfe_is_counted_and_matches_the_schema(tmp_path, option):
    cfg = compose_cfg(tmp_path, f"solver={option}", "nfe.steps=[7]")
    schema.check(cfg)
    solver = instantiate(cfg.solver)
    kind = schema.SOLVERS[cfg.solver._target_]
    for steps in (1, 2, 5, 7, 16):
        result = sample(GaussianDenoiser(), torch.randn(3, 2), steps, solver=solver)
        assert result.nfe == kind.evaluations(steps, cfg.solver) and result.nfe_per_sample is None
        assert torch.isfinite(result.x).all()
    assert kind.evaluations(9, cfg.solver) == (17 if option.startswith("dpmpp_2s") else 9)
    assert kind.adds_noise(cfg.solver) == solver.stochastic == schema.stochastic(cfg)
    assert not kind.churn and not kind.adaptive


@pytest.mark.parametrize("option,eta,noisy", [("euler_ancestral", 0.0, False), ("euler_ancestral", 0.3, True),
                                              ("dpmpp_2s", 0.5, True), ("dpmpp_2s_ancestral", 0.0, False),
                                              ("dpmpp_2m_sde", 0.0, False), ("dpmpp_2m_sde", 2.0, True)])
def test_eta_decides_whether_the_solver_is_stochastic(tmp_path, option, eta, noisy):
    """eta = 0 is an ODE solver: the job then measures its error against the ODE's solution (schema.stochastic)."""
    cfg = compose_cfg(tmp_path, f"solver={option}", f"solver.eta={eta}")
    schema.check(cfg)
    assert schema.stochastic(cfg) == instantiate(cfg.solver).stochastic == noisy


def test_churn_is_refused(tmp_path):
    churn = Churn(S_churn=10)
    for solver in [*DETERMINISTIC.values(), *STOCHASTIC.values()]:
        with pytest.raises(ValueError, match="churn=none"):
            sample(GaussianDenoiser(), torch.randn(2, 1), 4, solver=solver, churn=churn)
    for option, kind in (("dpmpp_2m", "an exponential-integrator or multistep"), ("unipc", "an exponential-integrator "
                         "or multistep"), ("lms", "an exponential-integrator or multistep"),
                         ("euler_ancestral", "a stochastic"), ("dpmpp_2m_sde", "a stochastic")):
        with pytest.raises(schema.ConfigError, match=rf"^churn.S_churn=40.0: expected 0 with {kind} solver.*; "
                                                     "churn is Algorithm 2's, for the paper's Runge-Kutta ODE "
                                                     r"solvers \(euler, heun, midpoint, ralston\): use churn=none$"):
            schema.check(compose_cfg(tmp_path, f"solver={option}", "churn=imagenet"))
    with pytest.raises(schema.ConfigError, match="expected 0 with an exponential-integrator or multistep solver"):
        schema.check(compose_cfg(tmp_path, "solver=euler_ancestral", "solver.eta=0", "churn=imagenet"))
    schema.check(compose_cfg(tmp_path, "solver=heun", "churn=imagenet"))  # the paper's solvers keep it


@pytest.mark.parametrize("option,override,message", [
    ("dpmpp_2m", "solver.order=4", "solver.order=4: expected an integer in [1, 3]"),
    ("dpmpp_3m", "solver.order=2.5", "solver.order=2.5: expected an integer in [1, 3]"),
    ("dpmpp_2m", "solver.lower_order_final=maybe", "solver.lower_order_final=maybe: expected true or false"),
    ("unipc", "solver.variant=bh3", "solver.variant=bh3: expected one of bh1, bh2"),
    ("unipc", "solver.order=0", "solver.order=0: expected an integer in [1, 3]"),
    ("unipc_bh1", "solver.corrector=1", "solver.corrector=1: expected true or false"),
    ("euler_ancestral", "solver.eta=1.5", "solver.eta=1.5: expected a finite number in [0, 1]"),
    ("dpmpp_2s", "solver.eta=-0.1", "solver.eta=-0.1: expected a finite number in [0, 1]"),
    ("dpmpp_2m_sde", "solver.eta=nan", "solver.eta=nan: expected a finite number >= 0"),
    ("ipndm", "solver.order=5", "solver.order=5: expected an integer in [1, 4]"),
    ("deis", "solver.order=0", "solver.order=0: expected an integer in [1, 4]"),
    ("lms", "solver.order=true", "solver.order=true: expected an integer in [1, 4]"),
])
def test_bad_parameters_are_refused_naming_the_key(tmp_path, option, override, message):
    with pytest.raises(schema.ConfigError) as info:
        schema.check(compose_cfg(tmp_path, f"solver={option}", override))
    assert str(info.value) == message


@pytest.mark.parametrize("build,key", [(lambda: DPMSolverPP(order=4), "solver.order"),
                                       (lambda: UniPC(variant="bh3"), "solver.variant"),
                                       (lambda: UniPC(order=0), "solver.order"),
                                       (lambda: EulerAncestral(eta=-1), "solver.eta"),
                                       (lambda: DPMSolverPP2S(eta=2), "solver.eta"),
                                       (lambda: DPMSolverPP2MSDE(eta=math.inf), "solver.eta"),
                                       (lambda: IPNDM(order=5), "solver.order"),
                                       (lambda: DEIS(order=0), "solver.order"),
                                       (lambda: LMS(order=2.5), "solver.order")])
def test_direct_callers_are_refused_too(build, key):
    with pytest.raises(ValueError, match=key):
        build()


# ------------------------------------------------------------------------------------------------
# Against formulas written out here


def dpmpp_2m_from_the_paper(net, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)) for sigma(t) = t, s(t) = 1 (alpha_t = 1, sigma_t = t): with
    lambda = -log sigma, h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i,
        D_hat = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}   (D_hat = D_0 at the first step),
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h_i} - 1) D_hat,
    the last step, to sigma = 0, being x = D (k-diffusion's ending)."""
    previous, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = net(x, torch.tensor(sigma, dtype=torch.float64)).to(torch.float64)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        if previous is None:
            d_hat = denoised
        else:
            r = h_last / h
            d_hat = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous
        x = sigma_next / sigma * x - math.expm1(-h) * d_hat
        previous, h_last = denoised, h
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 12])
def test_dpmpp_2m_is_the_paper_s_update(steps):
    net = digits_denoiser()
    latents = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_steps, _ = time_steps(net, steps, S.LinearSchedule(), D.EDMDiscretization())
    sigmas = t_steps.tolist()
    ours = sample(net, latents, steps, solver=DPMSolverPP(order=2))
    paper = dpmpp_2m_from_the_paper(net, latents * sigmas[0], sigmas)
    torch.testing.assert_close(ours.x, paper, rtol=0, atol=1e-12)
    assert ours.nfe == steps


def test_euler_ancestral_at_eta_1_is_the_ddpm_posterior_step():
    """sigma_up^2 = sigma_next^2 (1 - sigma_next^2 / sigma^2), sigma_down = sigma_next^2 / sigma: `Ancestral`'s step."""
    for axes in ("edm", "vp", "iddpm"):
        runs = [sample(GaussianDenoiser(), LATENTS, 12, solver=solver, randn_like=PerSampleNoise(range(64)).randn_like,
                       **ORIGINAL_AXES[axes]).x for solver in (EulerAncestral(eta=1.0), Ancestral())]
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The per-seed protocol, on the digits' ideal denoiser


@pytest.mark.parametrize("option", OPTIONS)
def test_deterministic_and_image_i_depends_only_on_seed_i(tmp_path, option):
    solver = instantiate(compose_cfg(tmp_path, f"solver={option}").solver)
    net = digits_denoiser()
    sampler = functools.partial(sample, num_steps=6, solver=solver)
    seeds = list(range(10, 18))
    state = torch.get_rng_state()
    whole = sample_seeds(net, (1, 8, 8), sampler, seeds)
    assert torch.equal(torch.get_rng_state(), state)  # fresh noise only through the per-seed source
    again = sample_seeds(net, (1, 8, 8), sampler, seeds)
    parts = torch.cat([sample_seeds(net, (1, 8, 8), sampler, part).x
                       for part in ([10, 11, 12], [13], [14, 15, 16, 17])])
    assert torch.equal(whole.x, again.x) and torch.isfinite(whole.x).all()
    # Batch size changes only how the denoiser's matrix products are blocked: rounding, at most.
    torch.testing.assert_close(parts, whole.x, rtol=0, atol=1e-12)
    assert not torch.equal(whole.x[0], whole.x[1])


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_solvers_use_their_noise(name):
    """Same latents, other noise: another sample; eta = 0 would give the ODE's."""
    solver = STOCHASTIC[name]
    runs = [sample(GaussianDenoiser(), LATENTS, 8, solver=solver,
                   randn_like=PerSampleNoise(range(first, first + 64)).randn_like).x for first in (0, 1000)]
    assert float((runs[0] - runs[1]).abs().min()) > 0


# ------------------------------------------------------------------------------------------------
# Composition with the other axes


AXES = {
    "vp": {"schedule": S.VPSchedule(), "scaling": S.VPScaling()},
    "ve": {"schedule": S.VESchedule(), "scaling": S.NoScaling()},
    "edm": {"schedule": S.LinearSchedule(), "scaling": S.NoScaling()},
}
DISCRETIZATIONS = {  # the same noise range [0.002, 80] for all three, so that the ODE's solution is the same
    "vp": D.VPDiscretization(sigma_min=0.002, sigma_max=80), "ve": D.VEDiscretization(sigma_min=0.002, sigma_max=80),
    "edm": D.EDMDiscretization(),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_the_schedule_and_scaling_do_not_change_the_samples(name):
    """On the same noise levels the solvers see only x^ = x / s and sigma: under VP and VE axes they reach the EDM
    axes' x^ at t_{N-1}, then take those axes' own Euler step in t to t = 0 (as every ODE solver here does).

    With sigma(t) = t, s = 1 that step is x^_N = D(x^_{N-1}; sigma_{N-1}), which this Gaussian's D inverts."""
    solver = DETERMINISTIC[name]
    edm_axes = {**AXES["edm"], "discretization": D.EDMDiscretization()}
    edm = sample(AnisotropicGaussian(), LATENTS, 10, solver=solver, **edm_axes)
    sigma_end = float(problem(10, edm_axes).sigma(problem(10, edm_axes).t_steps[-2]))
    x_hat_end = MEAN + (STD ** 2 + sigma_end ** 2) / STD ** 2 * (edm.x - MEAN)
    for axes in ("vp", "ve"):
        full = {**AXES[axes], "discretization": D.EDMDiscretization()}
        other = sample(AnisotropicGaussian(), LATENTS, 10, solver=solver, **full)
        expected = last_step(problem(10, full), x_hat_end)
        torch.testing.assert_close(other.x, expected, rtol=0, atol=1e-9)  # the VP schedule's round trip t <-> sigma
        assert other.nfe == edm.nfe


@pytest.mark.parametrize("name", list(DETERMINISTIC))
@pytest.mark.parametrize("axes", list(AXES))
def test_converges_to_the_ode_solution_under_every_axis(name, axes):
    """With each axis' own discretization the samples approach the exact solution, the EDM axes' answer too.

    The VP steps, equal in t, leave few steps below sigma ~ 0.1 (the last one spans lambda by 0.8 at N = 256):
    the extrapolating exponential integrators converge slowest there (3M: 0.38 at N = 64, 7e-4 at N = 1024)."""
    full = {**AXES[axes], "discretization": DISCRETIZATIONS[axes]}
    errors = []
    for steps in (64, 1024):
        result = sample(AnisotropicGaussian(), LATENTS, steps, solver=DETERMINISTIC[name], **full)
        assert torch.isfinite(result.x).all()
        errors.append(float((result.x - exact(steps, full)).abs().max()))
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 10, errors


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde"])
@pytest.mark.parametrize("axes", ["vp", "ve", "edm"])
def test_stochastic_solvers_converge_in_distribution(name, axes):
    """Mean and standard deviation of the samples approach the data's under each original sampler's axes."""
    errors = [moments_error(STOCHASTIC[name], ORIGINAL_AXES[axes], steps) for steps in (8, 64, 512)]
    # 32000 values: the standard errors of mean and std are ~0.0017 and ~0.0012.
    assert errors[-1] < 0.01 and errors[-1] < errors[0], errors
