"""The black-box adaptive RK45 solver (the paper's Figure 2 reference point) on Gaussian data, where the exact
probability-flow ODE solution is known: x/s at sigma is MEAN + (x/s at sigma_0 - MEAN) sqrt(STD^2 + sigma^2) /
sqrt(STD^2 + sigma_0^2) whatever sigma(t) and s(t)."""
from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.churn import Churn
from edm_lab.design.sampler import Problem, sample, time_steps
from edm_lab.design.solvers import RK45, Euler
from edm_lab.evaluate.sampling import sample_seeds
from edm_lab.tasks import schema
from edm_lab.tasks.sample import AXES, run_sample
from edm_lab.track.store import ResultsStore
from tests.test_configs import compose_cfg
from tests.test_distributed_eval import CHOICES as DDP_CHOICES
from tests.test_distributed_eval import TINY as DDP_TINY
from tests.test_distributed_eval import run_ddp
from tests.test_sample_task import CHOICES, TINY
from tests.test_stochastic_samplers import MEAN, STD, GaussianDenoiser

AXES_OF = {
    "edm": {"schedule": S.LinearSchedule(), "scaling": S.NoScaling(), "discretization": D.EDMDiscretization()},
    "vp": {"schedule": S.VPSchedule(), "scaling": S.VPScaling(), "discretization": D.VPDiscretization()},
    "ve": {"schedule": S.VESchedule(), "scaling": S.NoScaling(), "discretization": D.VEDiscretization()},
}
LATENTS = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def problem(axes: dict, steps: int = 18) -> Problem:
    net = GaussianDenoiser()
    t_steps, schedule = time_steps(net, steps, axes["schedule"], axes["discretization"])
    return Problem(net, t_steps, schedule, axes["scaling"].bind(schedule), Churn())


def exact(axes: dict) -> torch.Tensor:
    """The exact solution at t_{N-1}, then the Euler step to t = 0 that every ODE solver ends with."""
    p = problem(axes)
    t_0, t_end = p.t_steps[0], p.t_steps[-2]
    sigma_0, sigma_end = p.sigma(t_0), p.sigma(t_end)
    x_end = p.s(t_end) * (MEAN + (LATENTS * sigma_0 - MEAN) * ((STD ** 2 + sigma_end ** 2) / (STD ** 2 + sigma_0 ** 2)).sqrt())
    return x_end + (p.t_steps[-1] - t_end) * p.dx_dt(x_end, t_end)


def errors(axes: dict, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the largest error in units of the tolerance scale atol + rtol |x|, and the NFE."""
    result = sample(GaussianDenoiser(), LATENTS, 18, solver=RK45(rtol=tol, atol=tol), **axes)
    truth = exact(axes)
    return ((result.x - truth).abs() / (tol + tol * truth.abs())).amax(1), result.nfe_per_sample


def test_sigma_t_last_step_is_the_final_denoising():
    """For sigma(t) = t, s = 1 the Euler step to 0 is D(x; sigma_{N-1}): the closed form, end to end."""
    sigma_0, sigma_end = 80.0, 0.002
    x_end = MEAN + (LATENTS * sigma_0 - MEAN) * ((STD ** 2 + sigma_end ** 2) / (STD ** 2 + sigma_0 ** 2)) ** 0.5
    denoised = MEAN + STD ** 2 / (STD ** 2 + sigma_end ** 2) * (x_end - MEAN)
    torch.testing.assert_close(exact(AXES_OF["edm"]), denoised, rtol=0, atol=1e-12)
    result = sample(GaussianDenoiser(), LATENTS, 18, solver=RK45(rtol=1e-7, atol=1e-7))
    assert float((result.x - denoised).abs().max()) < 2e-7


@pytest.mark.parametrize("axes", ["edm", "vp", "ve"])
def test_error_follows_the_tolerance_and_nfe_grows(axes):
    """The global error is of the order of the requested tolerance and shrinks with it, at a growing NFE.

    The tolerance bounds each step's estimated error, not the accumulated one: the median sample ends within
    5 tolerance scales (measured 0.15-4.3), and a few whose error estimate let a large step through end
    worse (up to 90 at 1e-5 with sigma(t) = t), the black box's known weakness.
    """
    (e3, n3), (e5, n5), (e7, n7) = (errors(AXES_OF[axes], tol) for tol in (1e-3, 1e-5, 1e-7))
    assert max(e3.median(), e5.median(), e7.median()) < 5
    absolute = [float(e.median()) * tol for e, tol in ((e3, 1e-3), (e5, 1e-5), (e7, 1e-7))]
    assert absolute[0] > 10 * absolute[1] > 100 * absolute[2], absolute
    # With sigma(t) = t^(1/2) (VE) the cost hardly moves between 1e-3 and 1e-5 (335 and 332 on average).
    assert max(n3.double().mean(), n5.double().mean()) < n7.double().mean()


def test_is_scipy_rk45_per_sample():
    """Each sample takes exactly scipy's steps on its own ODE: same NFE, same solution (then the Euler step)."""
    integrate = pytest.importorskip("scipy.integrate")
    for name in ("edm", "vp"):
        p = problem(AXES_OF[name])
        t_0, t_end = float(p.t_steps[0]), float(p.t_steps[-2])
        result = sample(GaussianDenoiser(), LATENTS[:4, :3], 18, solver=RK45(rtol=1e-4, atol=1e-4), **AXES_OF[name])
        fun = functools.partial(numpy_dx_dt, p)
        for i, latent in enumerate(LATENTS[:4, :3]):
            x_0 = (latent * p.sigma(p.t_steps[0]) * p.s(p.t_steps[0])).numpy()
            ode = integrate.solve_ivp(fun, (t_0, t_end), x_0, method="RK45", rtol=1e-4, atol=1e-4)
            y = ode.y[:, -1]
            assert int(result.nfe_per_sample[i]) == ode.nfev
            torch.testing.assert_close(result.x[i], torch.from_numpy(y - t_end * fun(t_end, y)), rtol=0, atol=1e-11)


def numpy_dx_dt(p: Problem, t: float, y):
    """dx/dt of one sample as scipy calls it."""
    return p.dx_dt(torch.from_numpy(y)[None], torch.tensor(t, dtype=torch.float64))[0].numpy()


def test_nfe_is_each_sample_s_own_count():
    """A sample on the constant trajectory x = MEAN costs far less than random ones; each sample's count is
    what it costs alone, and the batch made as many calls as its costliest sample."""
    latents = torch.cat([torch.full((1, 16), MEAN / 80, dtype=torch.float64), LATENTS[:5]])
    result = sample(GaussianDenoiser(), latents, 18, solver=RK45())
    alone = [sample(GaussianDenoiser(), x[None], 18, solver=RK45()).nfe for x in latents]
    assert result.nfe_per_sample.tolist() == alone == [56, 182, 188, 188, 188, 188]
    assert result.nfe == max(alone)
    assert sample(GaussianDenoiser(), latents, 18, solver=Euler()).nfe_per_sample is None


def test_image_i_depends_only_on_seed_i():
    sampler = functools.partial(sample, num_steps=18, solver=RK45(rtol=1e-3, atol=1e-3))
    whole = sample_seeds(GaussianDenoiser(), (2, 3), sampler, list(range(10, 18)))
    parts = [sample_seeds(GaussianDenoiser(), (2, 3), sampler, seeds) for seeds in ([10, 11, 12], [13], [14, 15, 16, 17])]
    assert torch.equal(whole.x, torch.cat([p.x for p in parts]))
    assert torch.equal(whole.nfe_per_sample, torch.cat([p.nfe_per_sample for p in parts]))
    assert not torch.equal(whole.x[0], whole.x[1]) and len(set(whole.nfe_per_sample.tolist())) > 1


class ShiftedByLabel(GaussianDenoiser):
    """Gaussian data whose mean moves with the class: a sample denoised with another's label goes astray."""

    def __call__(self, x, sigma, class_labels=None):
        shift = class_labels.argmax(1).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return super().__call__(x - shift, sigma) + shift


def test_class_labels_follow_their_samples():
    labels = torch.eye(4, dtype=torch.float64)[[0, 3, 1, 2, 3, 0]]
    solver = RK45(rtol=1e-3, atol=1e-3)
    whole = sample(ShiftedByLabel(), LATENTS[:6], 18, solver=solver, class_labels=labels)
    alone = [sample(ShiftedByLabel(), LATENTS[i:i + 1], 18, solver=solver, class_labels=labels[i:i + 1])
             for i in range(6)]
    assert torch.equal(whole.x, torch.cat([a.x for a in alone]))
    assert whole.nfe_per_sample.tolist() == [a.nfe for a in alone] and len(set(whole.nfe_per_sample.tolist())) > 1


def test_only_the_first_and_last_levels_matter():
    """N >= 2 fixes the integration range alone; N = 1 integrates nothing: one Euler step from t_0."""
    runs = {n: sample(GaussianDenoiser(), LATENTS, n, solver=RK45()) for n in (1, 2, 18, 64)}
    torch.testing.assert_close(runs[2].x, runs[18].x, rtol=0, atol=1e-12)
    torch.testing.assert_close(runs[64].x, runs[18].x, rtol=0, atol=1e-12)
    assert torch.equal(runs[2].nfe_per_sample, runs[18].nfe_per_sample)
    assert torch.equal(runs[1].x, sample(GaussianDenoiser(), LATENTS, 1, solver=Euler()).x)
    assert runs[1].nfe_per_sample.tolist() == [1] * len(LATENTS)


def test_refuses_churn_and_bad_tolerances(tmp_path):
    with pytest.raises(ValueError, match="churn"):
        sample(GaussianDenoiser(), LATENTS, 18, solver=RK45(), churn=Churn(S_churn=10))
    with pytest.raises(ValueError, match="rtol"):
        RK45(rtol=0)
    for override, message in (("solver.rtol=0", "solver.rtol=0: expected a finite number > 0"),
                              ("solver.atol=-1e-5", "solver.atol=-1e-05: expected a finite number > 0"),
                              ("solver.atol=inf", "solver.atol=inf: expected a finite number > 0")):
        with pytest.raises(schema.ConfigError, match=message):
            schema.check(compose_cfg(tmp_path, "solver=rk45", override))


def test_cost_estimate_ignores_n_and_grows_as_the_tolerance_shrinks(tmp_path):
    cfg = compose_cfg(tmp_path, "solver=rk45")
    assert (cfg.solver.rtol, cfg.solver.atol) == (1e-5, 1e-5)
    kind = schema.SOLVERS[cfg.solver._target_]
    evaluations = kind.evaluations
    assert [evaluations(n, cfg.solver) for n in (2, 18, 256)] == [1000] * 3 and kind.adaptive and not kind.stochastic
    assert [evaluations(18, {"rtol": tol, "atol": 1e-5}) for tol in (1e-3, 1e-6, 1e-7)] == [1000, 1585, 2512]
    assert evaluations(18, {"rtol": 1e-3, "atol": 1e-3}) == 1000
    # Every axis of this file stays within the estimate, sample by sample (at most 686, VE at 1e-7).
    for axes in AXES_OF.values():
        for tol in (1e-3, 1e-5, 1e-7):
            assert int(errors(axes, tol)[1].max()) <= evaluations(18, {"rtol": tol, "atol": tol})


def test_row_nfe_is_the_mean_of_the_per_sample_nfe(tmp_path):
    overrides = ["solver=rk45", "nfe.steps=[5]"]
    rows = run_sample(compose_cfg(tmp_path / "a", *TINY, *overrides), {**CHOICES, "solver": "rk45"})
    again = run_sample(compose_cfg(tmp_path / "b", *TINY, *overrides, "batch_size=5"), {**CHOICES, "solver": "rk45"})
    cfg = compose_cfg(tmp_path / "c", *TINY, *overrides)
    dataset = instantiate(cfg.data)
    net = instantiate(cfg.model)(dataset, instantiate(cfg.precond, _partial_=True))
    axes = {name: instantiate(cfg[name]) for name in AXES}
    per_sample = sample_seeds(net, dataset.sample_shape, functools.partial(sample, num_steps=5, **axes),
                              list(range(32))).nfe_per_sample
    (row,) = rows
    assert isinstance(row["nfe"], float) and row["nfe"] == float(per_sample.double().mean()) == 278.375
    assert len(set(per_sample.tolist())) > 1 and row["nfe"] == again[0]["nfe"] and row["fd_raw"] == again[0]["fd_raw"]
    assert ResultsStore(tmp_path / "a" / "results").rows()[0]["nfe"] == row["nfe"]  # read back: a float is a valid nfe
    heun = run_sample(compose_cfg(tmp_path / "d", *TINY, "nfe.steps=[5]"), CHOICES)
    assert type(heun[0]["nfe"]) is int and heun[0]["nfe"] == 9


@pytest.mark.slow  # 45 s: two gloo processes; the gather itself is tests/test_distributed_eval.py's
def test_two_ranks_gather_the_per_sample_nfe(tmp_path):
    """One batch for two ranks (rank 1 samples a duplicate that the gather drops): the row is the one process's."""
    toy = ["data=toy2d", "data.num_samples=128", "metric=raw", "solver=rk45"]
    run_ddp(tmp_path / "ddp", *toy, "batch_size=64")
    (ddp,) = ResultsStore(tmp_path / "ddp" / "results").rows()
    (one,) = run_sample(compose_cfg(tmp_path / "one", *DDP_TINY, *toy, "batch_size=24"),
                        {**DDP_CHOICES, "data": "toy2d", "metric": "raw", "solver": "rk45"})
    assert isinstance(ddp["nfe"], float) and ddp["nfe"] == one["nfe"] and ddp["fd_raw"] == one["fd_raw"]


def test_rk45_config_refuses_churn_and_step_lists(tmp_path):
    with pytest.raises(schema.ConfigError, match=r"^churn.S_churn=40.0: expected 0 with an adaptive solver"):
        schema.check(compose_cfg(tmp_path, "solver=rk45", "churn=imagenet", "nfe.steps=[18]"))
    with pytest.raises(schema.ConfigError, match=r"^nfe.steps=\[2,3,4,6,9,13,18\]: expected one step count"):
        schema.check(compose_cfg(tmp_path, "solver=rk45"))
    schema.check(compose_cfg(tmp_path, "solver=rk45", "nfe.steps=[18]"))


def test_point_nfe():
    from edm_lab.evaluate.sampling import point_nfe

    assert point_nfe(torch.tensor([9, 9, 9]), {9}, False) == 9 and type(point_nfe(torch.tensor([9]), {9}, False)) is int
    assert point_nfe(torch.tensor([100, 101, 105]), {105, 103}, True) == pytest.approx(102.0)
    with pytest.raises(RuntimeError, match="disagree"):
        point_nfe(torch.tensor([9, 7]), {9, 7}, False)


def test_training_evaluations_record_the_mean_per_sample_nfe(tmp_path):
    """The training task's evaluation of its EMA with rk45 is the sample task's measurement of the saved network."""
    from tests.test_train import TINY as TRAIN_TINY
    from tests.test_train import train

    rk45 = ["solver=rk45", "nfe.steps=[18]", "num_samples=16", "batch_size=16"]
    result, _ = train(tmp_path, "run", "task.duration_kimg=0.032", "task.snapshot_kimg=0.032", "task.eval_kimg=0.032",
                      "task.eval_steps=18", *rk45)
    row = max((r for r in ResultsStore(tmp_path / "results").rows() if r["task"] == "train"), key=lambda r: r["kimg"])
    cfg = compose_cfg(tmp_path, *[o for o in TRAIN_TINY if not o.startswith("task")], *rk45, "model=checkpoint",
                      f"model.path={result['network']}", "metric.sampler_error=false",
                      f"paths.results_dir={tmp_path}/sampled")
    (sampled,) = run_sample(cfg, {"data": "digits", "model": "checkpoint", "solver": "rk45"})
    assert isinstance(row["nfe"], float) and row["nfe"] == sampled["nfe"] and row["fd_raw"] == sampled["fd_raw"]
