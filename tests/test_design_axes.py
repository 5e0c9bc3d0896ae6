"""Properties of each sampling axis beyond the goldens: derivatives, inverses, ranges, bad values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.churn import Churn
from edm_lab.design.precond import IDDPMPrecond, VPPrecond
from edm_lab.design.sampler import PerSampleNoise, sample, time_steps
from edm_lab.design.solvers import Euler, SecondOrder
from edm_lab.nets.ideal import IdealDenoiser

T = torch.linspace(0.05, 1.0, 9, dtype=torch.float64)


@pytest.mark.parametrize("schedule", [S.VPSchedule(), S.VESchedule(), S.LinearSchedule(),
                                      S.VPSchedule.from_range(0.002, 80.0)])
def test_schedule_derivative_and_inverse(schedule):
    h = 1e-6
    numeric = (schedule.sigma(T + h) - schedule.sigma(T - h)) / (2 * h)
    torch.testing.assert_close(schedule.sigma_deriv(T) * torch.ones_like(T), numeric, rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.sigma_inv(schedule.sigma(T)), T, rtol=1e-12, atol=1e-14)


def test_vp_schedule_fitted_to_range_hits_both_ends():
    fitted = S.VPSchedule().fit(0.002, 80.0)
    assert fitted.sigma(torch.tensor(1e-3, dtype=torch.float64)).item() == pytest.approx(0.002, rel=1e-12)
    assert fitted.sigma(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(80.0, rel=1e-12)


def test_vp_scaling_keeps_unit_variance_and_its_derivative():
    schedule = S.VPSchedule()
    scaling = S.VPScaling().bind(schedule)
    torch.testing.assert_close(scaling.s(T), 1 / (1 + schedule.sigma(T) ** 2).sqrt())
    h = 1e-6
    numeric = (scaling.s(T + h) - scaling.s(T - h)) / (2 * h)
    torch.testing.assert_close(scaling.s_deriv(T), numeric, rtol=1e-6, atol=1e-12)
    none = S.NoScaling().bind(schedule)
    assert torch.equal(none.s(T), torch.ones_like(T)) and torch.equal(none.s_deriv(T), torch.zeros_like(T))


@pytest.mark.parametrize("disc,lo,hi", [(D.VPDiscretization(), None, None), (D.VEDiscretization(), 0.02, 100.0),
                                        (D.IDDPMDiscretization(), 0.002, 81.0), (D.EDMDiscretization(), 0.002, 80.0)])
def test_discretization_defaults_and_endpoints(disc, lo, hi):
    sigma_min, sigma_max = disc.noise_range()
    if lo is not None:
        assert (sigma_min, sigma_max) == (lo, hi)
    else:  # VP defaults: sigma(eps_s) and sigma(1) of beta_d = 19.9, beta_min = 0.1
        assert sigma_min == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-6 + 0.1e-3) - 1))
        assert sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))
    steps = disc.sigma_steps(18, sigma_min, sigma_max)
    assert steps.shape == (18,) and steps.dtype == torch.float64
    assert bool((steps[1:] < steps[:-1]).all())
    if not isinstance(disc, D.IDDPMDiscretization):  # iDDPM picks table entries inside the range
        assert steps[0].item() == pytest.approx(sigma_max, rel=1e-12)
        assert steps[-1].item() == pytest.approx(sigma_min, rel=1e-12)


def test_noise_range_is_clamped_to_the_denoiser():
    assert D.EDMDiscretization().noise_range(0.02, 100.0) == (0.02, 80.0)
    assert D.VEDiscretization(sigma_min=0.01).noise_range(0.0, 50.0) == (0.01, 50.0)
    with pytest.raises(ValueError, match="empty"):
        D.EDMDiscretization(sigma_max=1.0).noise_range(2.0, 100.0)


def test_time_steps_round_through_the_denoiser():
    """With an iDDPM-style network every visited noise level is one of its table entries u_j."""
    precond = IDDPMPrecond()
    net = IdealDenoiser(torch.zeros(2, 1, 2, 2), noise_levels=precond)
    t_steps, schedule = time_steps(net, 10, S.LinearSchedule(), D.EDMDiscretization())
    assert t_steps[-1] == 0
    u = precond.u.to(torch.float64)
    for t in t_steps[:-1]:
        assert torch.isclose(u, t.to(torch.float32).to(torch.float64)).any()


def test_iddpm_table_is_computed_once_and_handed_out_as_copies():
    """The sampler asks for the table on every batch: memoised, yet no caller can alter another's."""
    first = D.iddpm_noise_levels()
    assert first.dtype == torch.float64 and first[-1] == 0 and bool((first[1:] < first[:-1]).all())
    expected = first.clone()
    first.zero_()
    torch.testing.assert_close(D.iddpm_noise_levels(), expected, rtol=0, atol=0)
    u = IDDPMPrecond().u.clone()
    IDDPMPrecond().u.zero_()  # e.g. load_state_dict copies into the buffer in place
    assert torch.equal(IDDPMPrecond().u, u) and bool((u[:-1] > 0).all())


def test_single_step_sampler_returns_the_denoised_start():
    data = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    net = IdealDenoiser(data)
    latents = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    result = sample(net, latents, 1, solver=Euler())
    assert result.nfe == 1
    torch.testing.assert_close(result.x, net(latents * 80.0, torch.tensor(80.0, dtype=torch.float64)))


@pytest.mark.parametrize("make, key", [
    (lambda: D.EDMDiscretization(rho=0), "discretization.rho"),
    (lambda: D.EDMDiscretization(sigma_min=1.0, sigma_max=0.5), "discretization.sigma_min"),
    (lambda: D.VEDiscretization(sigma_min=-1.0), "discretization.sigma_min"),
    (lambda: SecondOrder(alpha=0), "solver.alpha"),
    (lambda: SecondOrder(alpha=1.5), "solver.alpha"),
    (lambda: Churn(S_churn=-1), "churn.S_churn"),
    (lambda: Churn(S_noise=-0.1), "churn.S_noise"),
    (lambda: Churn(S_min=2, S_max=1), "churn.S_min"),
])
def test_invalid_values_name_their_key(make, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make()


def test_num_steps_below_one_is_refused():
    with pytest.raises(ValueError, match="num_steps"):
        sample(IdealDenoiser(torch.zeros(2, 2)), torch.zeros(1, 2), 0)


def test_nfe_is_counted_from_denoiser_calls():
    calls = []

    class Spy(IdealDenoiser):
        def forward(self, x, sigma, class_labels=None):
            calls.append(float(sigma))
            return super().forward(x, sigma, class_labels)

    net = Spy(torch.randn(4, 3, dtype=torch.float64))
    for solver, steps, nfe in [(Euler(), 7, 7), (SecondOrder(1.0), 7, 13), (SecondOrder(0.5), 4, 7)]:
        calls.clear()
        assert sample(net, torch.randn(2, 3), steps, solver=solver).nfe == nfe == len(calls)


def test_per_sample_noise_is_independent_of_batch_size():
    """Seed i gives the same image whether sampled alone or in a batch, churn included."""
    data = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    net = IdealDenoiser(data)
    churn = Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

    def run(seeds):
        noise = PerSampleNoise(seeds)
        latents = noise.randn((len(seeds), 1, 4, 4))
        return sample(net, latents, 6, churn=churn, randn_like=noise.randn_like).x

    batch = run([3, 4, 5, 6])
    # The draws are bit-identical; the outputs differ only by batched-matmul round-off.
    assert torch.equal(PerSampleNoise([5]).randn((1, 8)), PerSampleNoise([3, 4, 5]).randn((3, 8))[2:])
    torch.testing.assert_close(run([5]), batch[2:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(run([6, 3]), batch[[3, 0]], rtol=0, atol=1e-12)


def test_vp_precond_noise_range_is_the_reference_float32_one():
    precond = VPPrecond()
    assert precond.sigma_min == pytest.approx(0.0009765625)
    assert precond.sigma_max == pytest.approx(152.16697692871094)


# ------------------------------------------------------------------------------------------------
# Time steps bit for bit as the reference ablation sampler computes them, for every step count
# ------------------------------------------------------------------------------------------------

def reference_sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float,
                          epsilon_s: float = 1e-3, rho: float = 7.0) -> torch.Tensor:
    """The levels as NVlabs/edm's ablation_sampler writes them (generate.py), expression order included."""
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    if discretization == "vp":
        vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
        orig_t_steps = 1 + step_indices / (num_steps - 1) * (epsilon_s - 1)
        return (np.e ** (0.5 * vp_beta_d * (orig_t_steps ** 2) + vp_beta_min * orig_t_steps) - 1) ** 0.5
    if discretization == "ve":
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (step_indices / (num_steps - 1)))
        return orig_t_steps.sqrt()
    if discretization == "iddpm":
        u = D.iddpm_noise_levels()  # the table itself is pinned by the precond golden ('u')
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]
    assert discretization == "edm"
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
            * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


DISC_BY_NAME = {"vp": D.VPDiscretization, "ve": D.VEDiscretization, "iddpm": D.IDDPMDiscretization,
                "edm": D.EDMDiscretization}
# (L-1) * (i/(N-1)) and the reference's (L-1)/(N-1) * i pick different table entries for these N <= 256
# on the default iDDPM range (L = 992 levels).
IDDPM_ORDER_SENSITIVE = [59, 99, 103, 117, 123, 167, 191, 195, 197, 205, 227, 233, 245]


@pytest.mark.parametrize("name", sorted(DISC_BY_NAME))
@pytest.mark.parametrize("noise_range", [None, (0.01, 20.0)], ids=["default-range", "narrow-range"])
def test_sigma_steps_equal_the_reference_for_every_step_count(name, noise_range):
    disc = DISC_BY_NAME[name]()
    sigma_min, sigma_max = noise_range or disc.noise_range()
    mismatched = [n for n in range(2, 1025)
                  if not torch.equal(disc.sigma_steps(n, sigma_min, sigma_max),
                                     reference_sigma_steps(name, n, sigma_min, sigma_max))]
    assert mismatched == [], f"{name}: levels differ from the reference for num_steps in {mismatched[:20]}"
    # N = 1 (the reference divides by zero there): the single step sits at the top of the range.
    single = disc.sigma_steps(1, sigma_min, sigma_max)
    assert single.shape == (1,)
    top = reference_sigma_steps(name, 2, sigma_min, sigma_max)[0]
    assert single[0].item() == top.item()


def test_iddpm_levels_use_the_reference_expression_order():
    disc = D.IDDPMDiscretization()
    sigma_min, sigma_max = disc.noise_range()
    levels = disc.sigma_steps(59, sigma_min, sigma_max)
    assert levels[29].item() == pytest.approx(1.0029657875647, rel=1e-12)  # not 0.99984 of (L-1) * (i/(N-1))
    # The other order really does differ at these step counts, so the test above can tell the two apart.
    u = D.iddpm_noise_levels()
    L = int(torch.logical_and(u >= sigma_min, u <= sigma_max).sum())
    assert L == 992
    other_order = [n for n in range(2, 257) if not torch.equal(
        ((L - 1) / (n - 1) * torch.arange(n, dtype=torch.float64)).round(),
        ((L - 1) * (torch.arange(n, dtype=torch.float64) / (n - 1))).round())]
    assert other_order == IDDPM_ORDER_SENSITIVE
    # A float32 table is indexed at the same (float64) positions.
    u32 = D.iddpm_noise_levels(dtype=torch.float32)
    u32 = u32[torch.logical_and(u32 >= sigma_min, u32 <= sigma_max)]
    positions = ((len(u32) - 1) / 58 * torch.arange(59, dtype=torch.float64)).round().to(torch.int64)
    low = disc.sigma_steps(59, sigma_min, sigma_max, dtype=torch.float32)
    assert low.dtype == torch.float32 and torch.equal(low, u32[positions])
