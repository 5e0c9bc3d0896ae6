"""The learn_steps task: noise levels learned for the configured sampler, written for `discretization=optimized`.

    python run.py task=learn_steps solver=heun 'nfe.steps=[3,4]' task.gradient=smoothed   # the digits' ideal denoiser
    python run.py discretization=optimized discretization.path=<dest> solver=heun 'nfe.steps=[3,4]'

(`discretization=edm` with the same solver and steps is the rho = 7 row to compare with; a multirun over
both cannot set `discretization.path`, which only `optimized` has.)

One learned set per step count of `nfe.steps` (N >= 3), for the configured model, solver, schedule and
scaling, against the reference solution `sampler_rmse` uses (`metric.reference_*`); the file keeps each
step count's provenance and its RMS errors before (the discretization's rho) and after.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from edm_lab.design.discretizations import EDMDiscretization
from edm_lab.evaluate.learned_steps import optimize_time_steps
from edm_lab.nets.fast import FastPath, accelerate
from edm_lab.tasks import schema
from edm_lab.tasks.sample import guided, load_model, reference_tolerance

log = logging.getLogger(__name__)

TRAIN_SEEDS, HELDOUT_SEEDS = 1_000_000, 2_000_000  # far from the sampling seeds (seed=0 and up)


def run_learn_steps(cfg: DictConfig) -> Path:
    """Learn the levels for every step count of nfe.steps and write them to `task.dest`."""
    schema.check(cfg)
    disc = instantiate(cfg.discretization)
    if not isinstance(disc, EDMDiscretization):
        raise schema.ConfigError(f"task=learn_steps starts from the EDM time steps (their rho and noise range): "
                                 f"use discretization=edm, not {type(disc).__name__}")
    dataset = instantiate(cfg.data)
    precond = instantiate(cfg.precond, _partial_=True)
    net = guided(cfg, accelerate(load_model(cfg, dataset), FastPath(**cfg.fast)), dataset, precond)
    device = instantiate(cfg.trainer).strategy.root_device
    net = net.to(device).eval() if hasattr(net, "to") else net
    t, metric = cfg.task, cfg.metric
    dest = Path(str(t.dest)).expanduser()
    for num_steps in sorted({int(n) for n in cfg.nfe.steps}):
        result = optimize_time_steps(
            net, num_steps=num_steps, solver=instantiate(cfg.solver), sample_shape=dataset.sample_shape,
            train_seeds=range(TRAIN_SEEDS, TRAIN_SEEDS + int(t.train_seeds)),
            heldout_seeds=range(HELDOUT_SEEDS, HELDOUT_SEEDS + int(t.heldout_seeds)),
            schedule=instantiate(cfg.schedule), scaling=instantiate(cfg.scaling), sigma_min=disc.sigma_min,
            sigma_max=disc.sigma_max, init_rho=float(disc.rho), iterations=int(t.iterations), lr=float(t.lr),
            gradient=str(t.gradient), reference_steps=int(metric.reference_steps),
            reference_tolerance=reference_tolerance(cfg),
            batch_size=int(cfg.batch_size), noise=str(cfg.seed_noise), device=device,
            description={"data": dataset.name, "model": str(cfg.model.get("_target_"))})
        result.save(dest)
        held, train = result.errors["heldout"], result.errors["train"]
        log.info("steps=%d nfe=%d held-out rmse %.4g -> %.4g (x%.2f; train %.4g -> %.4g) levels %s", num_steps,
                 result.nfe, held["before"], held["after"], held["after"] / held["before"], train["before"],
                 train["after"], " ".join(f"{float(v):.4g}" for v in result.levels))
    print(f"learned levels: {dest}; sample with discretization=optimized discretization.path={dest}")
    return dest
