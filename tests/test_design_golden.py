"""The sampling design space against the reference implementation's golden vectors (float64, ~1e-10)."""
from __future__ import annotations

import pytest
import torch

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design import solvers
from edm_lab.design.churn import Churn
from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from edm_lab.design.sampler import sample
from edm_lab.nets.ideal import IdealDenoiser
from tests.conftest import load_reference

SCHEDULES = {"vp": S.VPSchedule, "ve": S.VESchedule, "linear": S.LinearSchedule}
SCALINGS = {"vp": S.VPScaling, "none": S.NoScaling}
DISCRETIZATIONS = {"vp": D.VPDiscretization, "ve": D.VEDiscretization, "iddpm": D.IDDPMDiscretization,
                   "edm": D.EDMDiscretization}


def axes_from_reference(config: dict) -> tuple[int, dict]:
    """The reference ablation sampler's keyword arguments as this project's axis objects."""
    cfg = dict(config)
    num_steps = cfg.pop("num_steps")
    disc_kwargs = {k: cfg.pop(k) for k in ("sigma_min", "sigma_max") if k in cfg}
    rho = cfg.pop("rho", 7)
    if cfg["discretization"] == "edm":
        disc_kwargs["rho"] = rho
    alpha = cfg.pop("alpha", 1)
    solver = solvers.Euler() if cfg.pop("solver") == "euler" else solvers.SecondOrder(alpha)
    axes = dict(schedule=SCHEDULES[cfg.pop("schedule")](), scaling=SCALINGS[cfg.pop("scaling")](),
                discretization=DISCRETIZATIONS[cfg.pop("discretization")](**disc_kwargs), solver=solver,
                churn=Churn(**cfg))
    return num_steps, axes


def replay(noise_per_step: torch.Tensor):
    """An injected noise source that hands out the reference's per-step draws in order."""
    draws = iter(noise_per_step)
    return lambda x: next(draws)


def expected_nfe(num_steps: int, solver) -> int:
    return num_steps if isinstance(solver, solvers.Euler) else 2 * num_steps - 1


def test_ablation_sampler_matches_reference():
    ref = load_reference("sampler_cases.pt")
    net = IdealDenoiser(ref["dataset"])
    assert len(ref["cases"]) == 24
    for case in ref["cases"]:
        num_steps, axes = axes_from_reference(case["config"])
        result = sample(net, case["latents"], num_steps, randn_like=replay(case["noise_per_step"]), **axes)
        assert result.x.dtype == torch.float64
        torch.testing.assert_close(result.x, case["output"], rtol=1e-10, atol=1e-10, msg=str(case["config"]))
        assert result.nfe == expected_nfe(num_steps, axes["solver"]), case["config"]


def test_edm_sampler_matches_reference():
    """Algorithm 2 is the general sampler with the EDM axes (deterministic and stochastic)."""
    ref = load_reference("edm_sampler_cases.pt")
    net = IdealDenoiser(ref["dataset"])
    for case in ref["cases"]:
        cfg = dict(case["config"])
        num_steps = cfg.pop("num_steps")
        result = sample(net, case["latents"], num_steps, churn=Churn(**cfg),
                        discretization=D.EDMDiscretization(sigma_min=0.002, sigma_max=80, rho=7),
                        randn_like=replay(case["noise_per_step"]))
        torch.testing.assert_close(result.x, case["output"], rtol=1e-10, atol=1e-10, msg=str(case["config"]))
        assert result.nfe == 2 * num_steps - 1


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond, "edm": EDMPrecond}


@pytest.mark.parametrize("name", ["vp", "ve", "iddpm", "edm"])
def test_preconditioner_coefficients_match_reference(name):
    case = load_reference("precond_cases.pt")["cases"][name]
    precond = PRECONDS[name]()
    sigma = case["sigma"]
    c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=torch.float32).expand_as(sigma)
                                    for c in precond.coefficients(sigma))
    # The goldens were read off float32 networks, so c_skip carries float32 round-off of that probe.
    torch.testing.assert_close(c_skip, case["c_skip"], rtol=0, atol=3e-5)
    torch.testing.assert_close(c_out, case["c_out"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_in, case["c_in"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_noise, case["c_noise"], rtol=1e-6, atol=1e-6)
    assert precond.sigma_min == case["sigma_min"]
    assert precond.sigma_max == case["sigma_max"]
    rounded = precond.round_sigma(sigma.to(case["round_sigma"].dtype))
    torch.testing.assert_close(rounded, case["round_sigma"], rtol=0, atol=0)
    if name == "iddpm":
        torch.testing.assert_close(precond.u, case["u"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vp", "ve", "iddpm", "edm"])
def test_preconditioner_forward_applies_the_coefficients(name):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around an arbitrary inner network."""
    calls = {}

    def inner(x_in, c_noise, class_labels=None):
        calls["x_in"], calls["c_noise"] = x_in, c_noise
        return torch.tanh(x_in) + c_noise.reshape(-1, 1, 1, 1)

    precond = PRECONDS[name](model=inner)
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    out = precond(x, sigma)
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(calls["x_in"], c_in * x)
    torch.testing.assert_close(calls["c_noise"], torch.as_tensor(c_noise).flatten().expand(3))
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.tanh(c_in * x) + calls["c_noise"].reshape(-1, 1, 1, 1)))


def test_precond_without_network_refuses_forward():
    with pytest.raises(RuntimeError, match="no inner network"):
        EDMPrecond()(torch.zeros(1, 1, 2, 2), torch.ones(1))
