"""The original stochastic samplers of Figure 4 (Euler-Maruyama, predictor-corrector, ancestral) on Gaussian
data, where the ideal denoiser and every marginal are known in closed form."""
from __future__ import annotations


import pytest
import torch
from hydra.utils import instantiate

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.churn import Churn
from edm_lab.design.sampler import PerSampleNoise, Problem, sample, time_steps
from edm_lab.design.solvers import Ancestral, Euler, EulerMaruyama, PredictorCorrector, SecondOrder
from edm_lab.evaluate.sampling import sample_seeds
from edm_lab.tasks import schema
from tests.test_configs import compose_cfg

MEAN, STD = 0.5, 0.3  # the data: N(MEAN, STD^2) in every dimension


class GaussianDenoiser:
    """The ideal denoiser of N(MEAN, STD^2): E[y | y + sigma n = x] = MEAN + STD^2 / (STD^2 + sigma^2) (x - MEAN)."""

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return MEAN + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MEAN)


# The natural axes of each original sampler (its paper's schedule, scaling and discretization), and the EDM ones.
ORIGINAL_AXES = {
    "vp": dict(schedule=S.VPSchedule(), scaling=S.VPScaling(), discretization=D.VPDiscretization()),
    "ve": dict(schedule=S.VESchedule(), scaling=S.NoScaling(), discretization=D.VEDiscretization()),
    "iddpm": dict(schedule=S.LinearSchedule(), scaling=S.NoScaling(), discretization=D.IDDPMDiscretization()),
    "edm": dict(schedule=S.LinearSchedule(), scaling=S.NoScaling(), discretization=D.EDMDiscretization()),
}
# The Langevin corrector's step follows from its snr, not from the number of steps, so its bias does not
# vanish as steps grow (test below): convergence is shown for the predictor, and the corrector's bias measured.
SOLVERS = {"euler_maruyama": EulerMaruyama(), "predictor_corrector": PredictorCorrector(corrector_steps=0),
           "ancestral": Ancestral()}


def moments_error(solver, axes: dict, steps: int, n: int = 500, dim: int = 64) -> float:
    # Many dimensions per sample, as images have: the Langevin step size is set from per-sample norms.
    latents = torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    result = sample(GaussianDenoiser(), latents, steps, solver=solver,
                    randn_like=lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype), **axes)
    x = result.x.flatten()
    return max(abs(x.mean().item() - MEAN), abs(x.std().item() - STD))


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("axes", list(ORIGINAL_AXES))
def test_converges_in_distribution_to_the_data(solver, axes):
    """Mean and standard deviation of the samples approach the data's as the steps grow (any axes)."""
    errors = [moments_error(SOLVERS[solver], ORIGINAL_AXES[axes], steps) for steps in (8, 64, 512)]
    # 32000 values: the standard errors of mean and std are ~0.0017 and ~0.0012.
    assert errors[-1] < 0.01, errors
    assert errors[-1] < errors[0], errors


def test_langevin_corrector_bias_shrinks_with_its_snr():
    """Unadjusted Langevin steps of size eps = 2 snr^2 v widen a Gaussian of variance v by 1 / (1 - snr^2) at
    their fixed point: the corrector's excess spread does not vanish with more steps, only with a smaller snr."""
    axes = ORIGINAL_AXES["ve"]
    song, song_more, small, none = (moments_error(PredictorCorrector(snr=snr, corrector_steps=c), axes, steps)
                                    for snr, c, steps in ((0.16, 1, 256), (0.16, 1, 1024), (0.05, 1, 256),
                                                          (0.16, 0, 1024)))
    assert 0.01 < song < 0.03 and 0.01 < song_more < 0.03  # std 0.3 -> ~0.314 on this Gaussian, at any N
    assert song > small > none and none < 0.003


def test_euler_maruyama_is_song_et_al_s_vp_reverse_sde_step():
    """One step equals x + [beta/2 x + beta score(x)] |dt| + sqrt(beta |dt|) z, with beta(t) = beta_d t + beta_min
    and the closed-form score of the VP marginal N(s MEAN, s^2 (STD^2 + sigma^2))."""
    axes = ORIGINAL_AXES["vp"]
    net = GaussianDenoiser()
    t_steps, schedule = time_steps(net, 10, axes["schedule"], axes["discretization"])
    t, t_next = t_steps[0], t_steps[1]
    z = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    problem = Problem(net, torch.stack([t, t_next, t_steps[-1]]), schedule, axes["scaling"].bind(schedule), Churn(),
                      randn_like=lambda _: z)
    problem.steps = lambda: [(0, t, t_next)]  # the first of two steps: one that adds noise
    ours = EulerMaruyama()(problem, x.clone())
    beta = schedule.beta_d * t + schedule.beta_min
    s, sigma = 1 / (1 + schedule.sigma(t) ** 2).sqrt(), schedule.sigma(t)
    score = -(x - s * MEAN) / (s ** 2 * (STD ** 2 + sigma ** 2))
    dt = t - t_next
    song = x + (0.5 * beta * x + beta * score) * dt + (beta * dt).sqrt() * z
    torch.testing.assert_close(ours, song, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver,per_step", [(EulerMaruyama(), 1), (Ancestral(), 1), (PredictorCorrector(), 2),
                                             (PredictorCorrector(corrector_steps=3), 4), (Euler(), 1)])
def test_nfe_is_counted_and_matches_the_schema(tmp_path, solver, per_step):
    for steps in (1, 5, 12):
        result = sample(GaussianDenoiser(), torch.randn(3, 2), steps, solver=solver)
        assert result.nfe == per_step * steps
    assert sample(GaussianDenoiser(), torch.randn(3, 2), 5, solver=SecondOrder(0.5)).nfe == 9


@pytest.mark.parametrize("option", ["euler", "heun", "midpoint", "ralston", "euler_maruyama", "predictor_corrector",
                                    "ancestral", "rk45"])
def test_schema_cost_table_agrees_with_the_solvers(tmp_path, option):
    cfg = compose_cfg(tmp_path, f"solver={option}", "nfe.steps=[7]")
    solver = instantiate(cfg.solver)
    kind = schema.SOLVERS[cfg.solver._target_]
    result = sample(GaussianDenoiser(), torch.randn(2, 1), 7, solver=solver)
    assert kind.adaptive == (result.nfe_per_sample is not None)
    if kind.adaptive:  # the table holds a bound per sample
        assert result.nfe == int(result.nfe_per_sample.max()) <= kind.evaluations(7, cfg.solver)
    else:
        assert kind.evaluations(7, cfg.solver) == result.nfe
    assert kind.stochastic == solver.stochastic == schema.stochastic(cfg)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_image_i_depends_only_on_seed_i(solver):
    axes = {**ORIGINAL_AXES["edm"], "solver": SOLVERS[solver]}

    def sampler(net, latents, **kwargs):
        return sample(net, latents, 6, **axes, **kwargs)

    whole = sample_seeds(GaussianDenoiser(), (2, 3), sampler, list(range(10, 18))).x
    parts = torch.cat([sample_seeds(GaussianDenoiser(), (2, 3), sampler, seeds).x
                       for seeds in ([10, 11, 12], [13], [14, 15, 16, 17])])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])


def test_churn_is_refused_with_a_stochastic_solver(tmp_path):
    with pytest.raises(ValueError, match="stochastic"):
        sample(GaussianDenoiser(), torch.randn(2, 1), 4, solver=Ancestral(), churn=Churn(S_churn=10))
    with pytest.raises(schema.ConfigError, match=r"^churn.S_churn=40.0: expected 0 with a stochastic solver"):
        schema.check(compose_cfg(tmp_path, "solver=ancestral", "churn=imagenet"))


@pytest.mark.parametrize("preset,values", [("cifar10_vp", (30, 0.01, 1, 1.007)), ("cifar10_ve", (80, 0.05, 1, 1.007)),
                                           ("imagenet_adm", (80, 0.05, 50, 1.003)),
                                           ("imagenet_edm", (40, 0.05, 50, 1.003)), ("imagenet", (40, 0.05, 50, 1.003))])
def test_table5_churn_presets(tmp_path, preset, values):
    churn = instantiate(compose_cfg(tmp_path, f"churn={preset}").churn)
    assert (churn.S_churn, churn.S_min, churn.S_max, churn.S_noise) == values


@pytest.mark.parametrize("experiment,solver,nfe", [("vp_original_stochastic", "EulerMaruyama", 32),
                                                   ("ve_original_stochastic", "PredictorCorrector", 64),
                                                   ("iddpm_original_stochastic", "Ancestral", 32)])
def test_original_stochastic_presets_sample_the_data(tmp_path, experiment, solver, nfe):
    """With the ideal denoiser of 64 points, 32 steps of each original sampler land on (or next to) those points."""
    cfg = compose_cfg(tmp_path, f"experiment={experiment}", "data=toy2d", "data.num_samples=64")
    axes = {name: instantiate(cfg[name]) for name in ("schedule", "scaling", "discretization", "solver", "churn")}
    assert type(axes["solver"]).__name__ == solver
    data = instantiate(cfg.data)
    net = instantiate(cfg.model)(data, instantiate(cfg.precond, _partial_=True))
    noise = PerSampleNoise(range(64))  # latents and the samplers' own noise: the same draws in every run
    result = sample(net, noise.randn((64, 2)), 32, randn_like=noise.randn_like, **axes)
    nearest = torch.cdist(result.x, data.samples.to(torch.float64)).min(1).values
    assert result.nfe == nfe
    assert nearest.median() < 0.02 and nearest.max() < 0.1  # the modes are 0.54 apart, their std 0.08
