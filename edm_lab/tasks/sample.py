"""The sampling task: one point of the design grid, evaluated at every step count of its NFE list.

Each (configuration, num_steps) becomes one result row, written atomically to the local
store once all its metrics are known, then logged to the tracker. Rows already stored are
reused unless `force` is set, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from edm_lab.atomic import cached
from edm_lab.design.sampler import sample
from edm_lab.evaluate.features import FrechetDistance
from edm_lab.evaluate.sampling import SamplingModule, generate, reference_sampler, rms_error, start_sigma
from edm_lab.track.store import ResultsStore, config_hash
from edm_lab.track.tracking import CurveTracker

log = logging.getLogger(__name__)

AXES = ("schedule", "scaling", "discretization", "solver", "churn")
# What fixes a row's numbers; logger, paths, trainer and batch size do not.
HASHED = ("data", "model", "precond", *AXES, "metric", "num_samples", "seed")
# Overrides of these keys change neither the numbers nor the label.
UNHASHED_PREFIXES = ("nfe.", "logger.", "paths.", "trainer.", "hydra.", "metric.batch_size")


class ConfigError(ValueError):
    """A config value that cannot work, found before any sampling starts."""


def validate(cfg: DictConfig) -> list[int]:
    """Check the plain numbers of the config; return the sorted, de-duplicated step list."""
    steps = cfg.nfe.steps
    if steps is None or len(steps) == 0:
        raise ConfigError("nfe.steps is empty: give at least one step count, e.g. nfe.steps=[9,18]")
    for s in steps:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ConfigError(f"nfe.steps must hold integers >= 1, got {s!r}")
    if cfg.num_samples < 2:
        raise ConfigError(f"num_samples must be >= 2 (a Frechet distance needs a covariance), got {cfg.num_samples}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.metric.reference_steps < 2:
        raise ConfigError(f"metric.reference_steps must be >= 2, got {cfg.metric.reference_steps}")
    return sorted(set(int(s) for s in steps))


def git_commit(root: Path) -> str:
    """Short commit of the code that ran, '+dirty' when it had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def axis_params(axes: Mapping[str, Any]) -> dict[str, Any]:
    """The numeric knobs of the axes, flattened into row columns."""
    disc, solver, churn = axes["discretization"], axes["solver"], axes["churn"]
    return {"rho": getattr(disc, "rho", None), "alpha": getattr(solver, "alpha", None),
            "S_churn": churn.S_churn, "S_min": churn.S_min, "S_max": churn.S_max, "S_noise": churn.S_noise}


def make_label(choices: Mapping[str, str], extra_overrides: Sequence[str],
               provenance: Mapping[str, Any] | None = None) -> str:
    """Human name of a configuration: data/model/precond, then the sampling axes and other overrides.

    A network model shows its preset, a loaded one its file: `digits/network(ddpmpp_small)/edm`, `.../checkpoint(a.safetensors)/...`.
    """
    provenance = provenance or {}
    model = choices.get("model")
    if provenance.get("checkpoint"):
        model = f"{model}({Path(str(provenance['checkpoint'])).name})"
    elif model == "network":
        model = f"network({choices.get('net') or provenance.get('network')})"
    head = f"{choices.get('data')}/{model}/{choices.get('precond')}"
    axes = " ".join(f"{a}={choices.get(a)}" for a in AXES)
    return " ".join([head, axes, *extra_overrides])


def run_sample(cfg: DictConfig, choices: Mapping[str, str], overrides: Sequence[str] = (),
               sweep: str = "local", project_root: Path | None = None) -> list[dict[str, Any]]:
    """Evaluate the configured sampler at each step count; returns the rows (stored or reused)."""
    steps_list = validate(cfg)
    axes = {name: instantiate(cfg[name]) for name in AXES}  # raises on bad values before any work
    trainer = instantiate(cfg.trainer)  # an unavailable accelerator fails here, before any output
    dataset = instantiate(cfg.data)
    net = instantiate(cfg.model)(dataset, instantiate(cfg.precond, _partial_=True))
    frechet = build_frechet(cfg, dataset)  # FID weights are checked here, before any sampling

    store = ResultsStore(cfg.paths.results_dir)
    identity = describe(cfg, choices, overrides, axes, sweep, project_root or Path.cwd(),
                        getattr(net, "provenance", {}))
    metric = str(cfg.metric.name)
    tracker = CurveTracker(instantiate(cfg.logger) if cfg.get("logger") else None, [metric, "sampler_rmse"],
                           OmegaConf.to_container(cfg, resolve=True))
    location = tracker.location
    references: dict[float, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    status = "failed"
    try:
        for num_steps in steps_list:
            row = None if cfg.force else store.get(identity["config_hash"], num_steps)
            samples = None
            if row is not None:
                log.info("steps=%d: stored row reused (force=true recomputes)", num_steps)
            else:
                samples, row = evaluate_point(cfg, trainer, net, dataset, axes, num_steps, frechet, references)
                row = {**identity, **row}
                store.write(row)  # only complete rows are ever written
                log.info("steps=%d nfe=%d %s=%.4g sampler_rmse=%s (%.1fs)", num_steps, row["nfe"], metric,
                         row[metric], _fmt(row["sampler_rmse"]), row["seconds"])
            rows.append(row)
            tracker.log_point(row, samples)
        status = "success"
    finally:
        tracker.finish(rows, status)
    print(f"results: {len(rows)} rows in {store.root} (config {identity['config_hash']})")
    if location:
        print(f"tracker run: {location}" + (" (offline: `wandb sync` uploads it)" if tracker.is_wandb else ""))
    return rows


def build_frechet(cfg: DictConfig, dataset) -> FrechetDistance:
    """The configured Frechet distance against `dataset`, its reference statistics cached per
    (data set content, extractor config) so a sweep extracts the data set's features once."""
    cache_dir = Path(cfg.paths.cache_dir)
    frechet = FrechetDistance(instantiate(cfg.metric.extractor)(dataset, cache_dir), batch_size=cfg.metric.batch_size)
    key = config_hash({"fingerprint": dataset.fingerprint,
                       "extractor": OmegaConf.to_container(cfg.metric.extractor, resolve=True)})

    def compute() -> dict[str, torch.Tensor]:
        frechet.set_reference(dataset.samples)
        return frechet.reference_statistics()

    frechet.load_reference_statistics(cached(cache_dir / "reference_stats" / f"{key}.pt", compute))
    return frechet


def describe(cfg: DictConfig, choices: Mapping[str, str], overrides: Sequence[str], axes: Mapping[str, Any],
             sweep: str, project_root: Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every row of this job shares: config hash, label, axis values, provenance.

    `provenance` (from the model factory) names the network and checkpoint behind the rows;
    a loaded checkpoint's own preconditioner replaces the `precond` choice.
    """
    choices = {**choices, **({"precond": provenance["precond"]} if provenance.get("precond") else {})}
    hashed = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
              for k in HASHED}
    hashed["metric"].pop("batch_size", None)
    hashed["provenance"] = provenance  # a checkpoint is identified by its content, not its path
    params = [o for o in overrides if "." in o.split("=")[0] and not o.startswith(UNHASHED_PREFIXES)]
    return {
        "config_hash": config_hash(hashed), "label": make_label(choices, params, provenance), "sweep": sweep,
        **{k: choices.get(k) for k in ("data", "model", "precond", *AXES, "metric")},
        **axis_params(axes),
        "num_samples": int(cfg.num_samples), "seed": int(cfg.seed), "git_commit": git_commit(project_root),
        **{k: v for k, v in provenance.items() if k != "precond"},
    }


def evaluate_point(cfg: DictConfig, trainer, net, dataset, axes: Mapping[str, Any], num_steps: int,
                   frechet: FrechetDistance, references: dict[float, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Sample at `num_steps` and measure: (samples, the row's measured columns)."""
    start = time.perf_counter()
    sampler = functools.partial(sample, num_steps=num_steps, **axes)
    samples, nfe = generate(trainer, SamplingModule(net, dataset.sample_shape, sampler), cfg.seed,
                            cfg.num_samples, cfg.batch_size)
    seconds = time.perf_counter() - start
    sigma0 = start_sigma(net, num_steps, axes["schedule"], axes["discretization"])
    error = None  # a stochastic sampler does not converge to the ODE's solution: no truncation error
    if cfg.metric.sampler_error and not axes["churn"].stochastic:
        if sigma0 not in references:
            references[sigma0] = _reference_solution(cfg, trainer, net, dataset, sigma0)
        error = rms_error(samples, references[sigma0])
    return samples, {"num_steps": num_steps, "nfe": nfe, str(cfg.metric.name): frechet(samples.float()),
                     "sampler_rmse": error, "sigma_start": sigma0, "seconds": seconds,
                     "time": dt.datetime.now().isoformat(timespec="seconds")}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _reference_solution(cfg: DictConfig, trainer, net, dataset, sigma_start: float) -> torch.Tensor:
    """The same ODE solved with many Heun steps from the same seeds, cached across jobs."""
    # The model's provenance carries a checkpoint's content hash: a file replaced at the same path
    # must not reuse the old network's solution.
    key = config_hash({"data": OmegaConf.to_container(cfg.data, resolve=True), "fingerprint": dataset.fingerprint,
                       "model": OmegaConf.to_container(cfg.model, resolve=True),
                       "provenance": getattr(net, "provenance", {}),
                       "precond": OmegaConf.to_container(cfg.precond, resolve=True),
                       "sigma_start": repr(sigma_start), "steps": cfg.metric.reference_steps,
                       "seed": cfg.seed, "num_samples": cfg.num_samples})

    def compute() -> torch.Tensor:
        log.info("reference solution: %d Heun steps from sigma=%.4g", cfg.metric.reference_steps, sigma_start)
        module = SamplingModule(net, dataset.sample_shape, reference_sampler(sigma_start, cfg.metric.reference_steps))
        return generate(trainer, module, cfg.seed, cfg.num_samples, cfg.batch_size)[0]

    return cached(Path(cfg.paths.cache_dir) / "references" / f"{key}.pt", compute)
