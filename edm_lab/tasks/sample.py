"""The sampling task: one point of the design grid, evaluated at every step count of its NFE list.

Each (configuration, num_steps, repeat) becomes one result row, written atomically to the local
store once all its metrics are known; the tracker gets one point per step count (the minimum over
repeats, as the paper reports, with mean and std). Rows already stored are reused unless `force`
is set, so an interrupted sweep resumes where it stopped. Repeat k samples seeds
seed + k * num_samples ... seed + (k + 1) * num_samples - 1.

Under DDP (trainer=ddp) every rank runs this whole function: each samples its share of the seeds
and all get the gathered results, so every rank computes the same rows; only rank 0 writes rows,
single files and the tracker.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
from hydra.utils import get_class, instantiate
from tqdm.contrib.logging import logging_redirect_tqdm
from omegaconf import DictConfig, OmegaConf

from edm_lab.atomic import atomic_torch_save, atomic_write_text, cached
from edm_lab.checkpoints.official import OfficialCheckpointError
from edm_lab.checkpoints.snapshot import file_sha256
from edm_lab.design.sampler import sample, stochastic
from edm_lab.evaluate import reference as ref
from edm_lab.evaluate.features import FrechetDistance, kernel_distance
from edm_lab.evaluate.progress import SamplingProgress
from edm_lab.nets.fast import FastPath, accelerate, eager
from edm_lab.evaluate.sampling import (
    SamplingModule,
    frechet_from_features,
    generate,
    reference_sampler,
    rms_from_squared_errors,
    start_sigma,
)
from edm_lab.tasks import schema
from edm_lab.tasks.hydra_support import PROJECT_ROOT
from edm_lab.tasks.schema import ConfigError
from edm_lab.track.images import grid_items, save_images
from edm_lab.track.store import ResultsStore, config_hash, write_manifest
from edm_lab.track.tracking import CurveTracker, configuration_group, make_logger, record_run, run_config

T = TypeVar("T")

log = logging.getLogger(__name__)

AXES = ("schedule", "scaling", "discretization", "solver", "churn")
# What fixes a row's numbers; logger, paths, trainer and batch size do not, nor `repeats`
# (each repeat is its own row of the same configuration, so raising it reuses the rows stored).
HASHED = (*schema.SAMPLING_NODES, "num_samples", "seed")
# Overrides of these keys change neither the numbers nor the label.
# Lightning's spellings of its default, fp32 precision (any other changes the numbers: part of the hash).
FULL_PRECISION = ("32-true", "32")
UNHASHED_PREFIXES = ("nfe.", "logger.", "paths.", "trainer.", "hydra.", "limits.", "metric.batch_size")


def git_commit(root: Path | None) -> str:
    """Short commit of the code that ran, '+dirty' when it had uncommitted changes; an installed package
    (no checkout, `root` None) is named by its version."""
    if root is None:
        from edm_lab import __version__

        return f"edm_lab {__version__}"
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


def label_head(choices: Mapping[str, str], provenance: Mapping[str, Any]) -> str:
    """data/model/precond, a network model with its preset, a loaded one with its file."""
    model = choices.get("model")
    if provenance.get("checkpoint"):
        model = f"{model}({Path(str(provenance['checkpoint'])).name})"
    elif model == "network":
        model = f"network({choices.get('net') or provenance.get('network')})"
    return f"{choices.get('data')}/{model}/{choices.get('precond')}"


def make_label(choices: Mapping[str, str], extra_overrides: Sequence[str],
               provenance: Mapping[str, Any] | None = None) -> str:
    """Human name of a configuration: data/model/precond, then the sampling axes and other overrides.

    A network model shows its preset, a loaded one its file: `digits/network(ddpmpp_small)/edm`, `.../checkpoint(a.safetensors)/...`.
    """
    provenance = provenance or {}
    head = label_head(choices, provenance)
    axes = " ".join(f"{a}={choices.get(a)}" for a in AXES)
    guidance = [f"guidance={provenance['guidance']}(w={provenance['guidance_weight']:g})"] if provenance.get("guidance") else []
    return " ".join([head, axes, *guidance, *[o for o in extra_overrides if not o.startswith("guidance.weight=")]])


def run_sample(cfg: DictConfig, choices: Mapping[str, str], overrides: Sequence[str] = (),
               sweep: str = "local", project_root: Path | None = PROJECT_ROOT) -> list[dict[str, Any]]:
    """Evaluate the configured sampler at each step count and repeat; returns the rows (stored or reused)."""
    schema.check(cfg)  # run.py checked it already; direct callers get the same check
    schema.normalize(cfg)
    steps_list = schema.steps(cfg)
    axes = {name: instantiate(cfg[name]) for name in AXES}  # raises on bad values before any work
    # An unavailable accelerator fails here, before any output; the job's one bar replaces Lightning's.
    trainer = instantiate(cfg.trainer, callbacks=[SamplingProgress()] if cfg.trainer.enable_progress_bar else None)
    dataset = instantiate(cfg.data)
    if cfg.export_images is not None and not dataset.is_image:
        raise ConfigError(f"export_images writes PNG files, but data {dataset.name!r} has samples shaped "
                          f"{tuple(dataset.sample_shape)}; set export_images=null")
    net = load_model(cfg, dataset, choices)
    net = guided(cfg, accelerate(net, FastPath(**cfg.fast)), dataset, instantiate(cfg.precond, _partial_=True))
    # FID weights are checked here, before any sampling; the data set's features are extracted on the
    # trainer's device (the Inception features of 50k images take hours on a CPU).
    frechet = build_frechet(cfg, dataset, trainer.strategy.root_device)
    kid = kid_column(cfg)
    real_features = None if kid is None else ref.cached_data_features(
        frechet, dataset, dataset.fingerprint, OmegaConf.to_container(cfg.metric.extractor, resolve=True),
        cfg.paths.cache_dir)

    store = ResultsStore(cfg.paths.results_dir)
    identity = describe(cfg, choices, overrides, axes, sweep, project_root,
                        getattr(net, "provenance", {}))
    metric = str(cfg.metric.name)
    main = trainer.is_global_zero  # other DDP ranks compute the same rows but write nothing
    points = [(num_steps, repeat) for repeat in range(cfg.repeats) for num_steps in steps_list]
    # Rank 0 reads the store once (an unusable row is moved aside) and decides for all ranks what to compute.
    stored = {p: store.get(identity["config_hash"], *p) for p in points} if main and not cfg.force else {}
    stored = trainer.strategy.broadcast({p: row for p, row in stored.items() if row is not None})
    todo = [p for p in points if p not in stored]
    if not todo:
        if main:
            write_manifest(cfg.paths.output_dir, list(stored.values()))
            record_run(cfg.paths.output_dir, None, 0)
            log.info("all %d points of %s are stored: nothing to compute (force=true recomputes)", len(points),
                     identity["config_hash"])
        return sorted(stored.values(), key=lambda r: (r["num_steps"], r["repeat"]))

    # A tracker run only for a job that computes: it shows the whole curve, stored points included.
    logger = None
    if main and cfg.get("logger"):
        logger = make_logger(cfg.logger, name=identity["label"], job_type="sample", sweep=sweep,
                             group=configuration_group(identity["label"], identity["config_hash"]))
    tracker = CurveTracker(logger, [metric, *([kid] if kid else []), "sampler_rmse"], run_config(cfg, choices, identity))
    export = _export_root(cfg, identity, main)
    progress = trainer.progress_bar_callback if isinstance(trainer.progress_bar_callback, SamplingProgress) else None
    if progress is not None and not main:
        progress.draw = False  # one bar per job: rank 0's
    if progress is not None:
        progress.plan(float(cfg.num_samples) * sum(schema.nfe_estimate(cfg, n) for n, _ in todo))
    references: dict[tuple[float, int], torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    by_steps: dict[int, list[dict[str, Any]]] = {}
    status = "failed"
    try:
        # On a terminal, log lines print above the bar, not through it.
        with logging_redirect_tqdm() if progress is not None and progress.draw else contextlib.nullcontext():
            # Repeat by repeat, so one repeat's reference solution serves all its step counts; the
            # tracker gets a step count's point once its last repeat is known.
            for repeat in range(cfg.repeats):
                references.clear()
                for num_steps in steps_list:
                    row, samples = stored.get((num_steps, repeat)), None
                    if row is None:
                        phase = f"point {todo.index((num_steps, repeat)) + 1}/{len(todo)} (steps={num_steps})"
                        samples, row = evaluate_point(cfg, trainer, net, dataset, axes, num_steps, repeat, frechet,
                                                      references, export, progress, phase, real_features)
                        row = {**identity, **row}
                        if main:
                            store.write(row)  # only complete rows are ever written
                            eta = progress.eta() if progress is not None and not progress.draw else ""
                            log.info("steps=%d%s nfe=%g %s=%.4g%s sampler_rmse=%s (%.1fs, %.0f img/s)%s", num_steps,
                                     f" repeat={repeat}" if cfg.repeats > 1 else "", row["nfe"], metric, row[metric],
                                     f" {kid}={row[kid]:.4g}" if kid else "",
                                     _fmt(row["sampler_rmse"]), row["seconds"], row["images_per_second"],
                                     f" [{eta}]" if eta else "")
                    rows.append(row)
                    by_steps.setdefault(num_steps, []).append(row)
                    if repeat == cfg.repeats - 1:
                        tracker.log_point(by_steps[num_steps], samples)
        status = "success"
    finally:
        if progress is not None:
            progress.close()
        rows.sort(key=lambda r: (r["num_steps"], r["repeat"]))
        tracker.finish(rows, status)
    if main:
        write_manifest(cfg.paths.output_dir, rows)  # this job's rows, reused ones included, for its report
        record_run(cfg.paths.output_dir, logger, len(todo))
        if len(stored):
            log.info("%d of %d points were stored already (force=true recomputes)", len(stored), len(points))
        if export is not None:
            log.info("images: %s", export)
    return rows


def reference_tolerance(cfg: DictConfig) -> float | None:
    """RK45's tolerance for the reference solution, or None for Heun with `metric.reference_steps`."""
    rk45 = cfg.metric.get("reference_solver", "heun") == "rk45"
    return float(cfg.metric.reference_tolerance) if rk45 else None


def reference_method(cfg: DictConfig) -> str:
    """How the reference solution is computed, in words: "RK45, tolerance 1e-06" or "256 Heun steps"."""
    tolerance = reference_tolerance(cfg)
    return f"{int(cfg.metric.reference_steps)} Heun steps" if tolerance is None else f"RK45, tolerance {tolerance:g}"


def _export_root(cfg: DictConfig, identity: Mapping[str, Any], main: bool) -> Path | None:
    """`<export_images>/<config_hash>`, with the configuration's label beside its images (rank 0 writes it)."""
    if cfg.export_images is None:
        return None
    root = Path(cfg.export_images).expanduser() / identity["config_hash"]
    if main:
        atomic_write_text(root / "label.txt", identity["label"] + "\n")
    return root


def build_frechet(cfg: DictConfig, dataset, device: torch.device | str | None = None) -> FrechetDistance:
    """The configured Frechet distance against `dataset`'s reference statistics: read from the
    `metric.reference` .npz when set, else extracted once per (data set content, extractor config)
    and cached, so a sweep extracts the data set's features once. Bad input fails before sampling.

    The extractor is moved to `device` (default: where its factory left it, the CPU) before extracting."""
    path = cfg.metric.get("reference")
    loaded = ref.load_npz(path, key="metric.reference") if path else None  # before building the extractor
    cache_dir = Path(cfg.paths.cache_dir)
    frechet = FrechetDistance(instantiate(cfg.metric.extractor)(dataset, cache_dir), batch_size=cfg.metric.batch_size)
    if device is not None:
        frechet.to(device)
    if loaded is not None:
        ref.check_compatible(loaded, ref.extractor_name(frechet.extractor), frechet.extractor.num_features,
                             key="metric.reference")
        stats = ref.statistics_from_moments(loaded.mu, loaded.sigma, loaded.num_images or ref.DEFAULT_COUNT)
    else:
        stats = ref.cached_data_statistics(frechet, dataset, dataset.fingerprint,
                                           OmegaConf.to_container(cfg.metric.extractor, resolve=True), cache_dir)
    frechet.load_reference_statistics(stats)
    return frechet


def load_model(cfg: DictConfig, dataset, choices: Mapping[str, str] | None = None):
    """The configured model inside the configured preconditioner; a loader's refusal is one line naming the key."""
    try:
        return instantiate(cfg.model)(dataset, instantiate(cfg.precond, _partial_=True))
    except (ValueError, OSError, OfficialCheckpointError) as exc:  # a loader's refusal, naming the file: one line
        key = f"model.path={cfg.model.path}" if "path" in cfg.model else f"model={(choices or {}).get('model')}"
        raise ConfigError(f"{key}: {exc}") from exc


def guided(cfg: DictConfig, net, dataset, precond):
    """`net` inside the configured guidance (`guidance=none`: `net` itself); an autoguidance guide is loaded
    like `model=checkpoint`, with the same data and preconditioner, and put on the same fast path."""
    node = cfg.get("guidance")
    if not node or node.get("_target_") is None:
        return net
    kind, weight, guide = get_class(node._target_), float(node.weight), ()
    if "guide" in node:
        try:
            guide = (accelerate(instantiate(node.guide)(dataset, precond), FastPath(**cfg.fast)),)
        except (ValueError, OSError, OfficialCheckpointError) as exc:
            raise ConfigError(f"guidance.guide.path={node.guide.get('path')}: {exc}") from exc
    try:
        return kind(net, *guide, weight)
    except ValueError as exc:  # the wrapper's refusal (an unconditional network, mismatched networks): one line
        raise ConfigError(f"guidance: {exc}") from exc


def kid_column(cfg: DictConfig) -> str | None:
    """The kernel distance's column beside the Frechet distance's (`kid_classifier` beside `fd_classifier`,
    `kid` beside `fid`), or None when `metric.kid` is off."""
    if cfg.metric.get("kid") is None:
        return None
    name = str(cfg.metric.name)
    return "kid" if name == "fid" else "kid_" + name.removeprefix("fd_")


def _metric_identity(metric: dict[str, Any]) -> dict[str, Any]:
    """What of the metric config fixes its numbers: not the batch size nor where the Inception weights
    came from; a reference statistics file by its content (and absent when unset, so rows stored before
    the option existed keep their hash)."""
    metric = {k: v for k, v in metric.items() if k != "batch_size"}
    if metric.get("kid", 0) is None:  # off: absent, so rows stored before the option existed keep their hash
        del metric["kid"]
    # Only the keys of the reference solver in use; Heun's rows keep the hash they had before RK45 was an option.
    if metric.pop("reference_solver", "heun") == "rk45":
        metric["reference_solver"] = "rk45"
        metric.pop("reference_steps", None)
    else:
        metric.pop("reference_tolerance", None)
    if isinstance(metric.get("extractor"), dict):
        metric["extractor"] = ref.feature_options(metric["extractor"])  # what keys the cached statistics too
    reference = metric.pop("reference", None)
    if reference is not None:
        metric["reference_sha256"] = file_sha256(Path(str(reference)).expanduser())
    return metric


def computation(cfg: DictConfig) -> dict[str, Any]:
    """How the numbers are computed beyond the design axes, where it is not the default (so that rows of the
    default keep their hash): the per-seed noise source and the network's fast path. Part of every hash
    of computed numbers: rows, reference solutions, training runs and their evaluations."""
    out: dict[str, Any] = {}
    if cfg.seed_noise != "generators":
        out["seed_noise"] = str(cfg.seed_noise)
    if FastPath(**cfg.fast).enabled:
        out["fast"] = OmegaConf.to_container(cfg.fast, resolve=True)
    # Lightning's mixed precision runs the network's matrix products and convolutions under autocast, in
    # sampling (predict) as in training; the sampler's float64 state is not autocast-eligible.
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision not in FULL_PRECISION:
        out["precision"] = precision
    return out


def describe(cfg: DictConfig, choices: Mapping[str, str], overrides: Sequence[str], axes: Mapping[str, Any],
             sweep: str, project_root: Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every row of this job shares: config hash, label, axis values, provenance.

    `provenance` (from the model factory) names the network and checkpoint behind the rows;
    a loaded checkpoint's own preconditioner replaces the `precond` choice.
    """
    choices = {**choices, **({"precond": provenance["precond"]} if provenance.get("precond") else {})}
    hashed = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
              for k in HASHED}
    hashed["metric"] = _metric_identity(hashed["metric"])
    extra = computation(cfg)
    hashed.update(extra)
    hashed["provenance"] = provenance  # a checkpoint is identified by its content, not its path
    if getattr(axes["discretization"], "fingerprint", None):  # learned levels too: a file replaced at the same path
        hashed["discretization_sha256"] = axes["discretization"].fingerprint
    params = [o for o in overrides if "." in o.split("=")[0] and not o.startswith(UNHASHED_PREFIXES)]
    words = [f"seed_noise={extra['seed_noise']}"] if "seed_noise" in extra else []
    words += [f"fast.{k}=true" for k, v in extra.get("fast", {}).items() if v is True]
    words += [f"trainer.precision={extra['precision']}"] if "precision" in extra else []
    given = {p.split("=")[0] for p in params}  # an override already names its key (`fast.channels_last=True`)
    params += [w for w in words if w.split("=")[0] not in given]
    return {
        "config_hash": config_hash(hashed), "label": make_label(choices, params, provenance), "sweep": sweep,
        **{k: choices.get(k) for k in ("data", "model", "precond", *AXES, "metric")},
        **axis_params(axes),
        "num_samples": int(cfg.num_samples), "seed": int(cfg.seed), "seed_noise": str(cfg.seed_noise),
        "git_commit": git_commit(project_root),
        **{k: v for k, v in provenance.items() if k != "precond"},
    }


def evaluate_point(cfg: DictConfig, trainer, net, dataset, axes: Mapping[str, Any], num_steps: int, repeat: int,
                   frechet: FrechetDistance, references: dict[tuple[float, int], torch.Tensor],
                   export: Path | None = None, progress: SamplingProgress | None = None,
                   phase: str = "", real_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sample repeat `repeat` at `num_steps` and measure: (the tracker's samples, the row's measured columns).

    `seconds` is the point's wall time (sampling, features, gathering, distance), without the
    one-off reference solution; `images_per_second` counts sampling alone (the slowest rank).
    """
    first_seed = int(cfg.seed) + repeat * int(cfg.num_samples)
    sigma0 = start_sigma(net, num_steps, axes["discretization"])
    reference = None  # a stochastic sampler does not converge to the ODE's solution: no truncation error
    if cfg.metric.sampler_error and not stochastic(axes["solver"], axes["churn"]):
        if (sigma0, first_seed) not in references:
            references[(sigma0, first_seed)] = _reference_solution(cfg, trainer, net, dataset, sigma0, first_seed,
                                                                   progress)
        reference = references[(sigma0, first_seed)]
    if progress is not None:
        progress.begin(phase or f"steps={num_steps}", schema.nfe_estimate(cfg, num_steps))
    on_batch = None
    if export is not None:
        on_batch = functools.partial(_export_batch, export / f"steps-{num_steps}" / f"r{repeat}")
    start = time.perf_counter()
    module = SamplingModule(net, dataset.sample_shape, functools.partial(sample, num_steps=num_steps, **axes),
                            first_seed, extractor=frechet.extractor, feature_batch_size=frechet.batch_size,
                            feature_dtype=frechet.input_dtype, reference=reference,
                            keep_samples=grid_items(dataset.sample_shape), on_batch=on_batch, noise=cfg.seed_noise)
    out = generate(trainer, module, cfg.num_samples, cfg.batch_size)
    value = frechet_from_features(frechet.reference_statistics(), out.features, frechet.batch_size)
    kid = {}
    if real_features is not None:
        kid[kid_column(cfg)] = kernel_distance(real_features, out.features, int(cfg.metric.kid.subsets),
                                               int(cfg.metric.kid.subset_size))
    error = None
    if out.squared_error is not None:
        error = rms_from_squared_errors(out.squared_error, math.prod(dataset.sample_shape))
    seconds = time.perf_counter() - start
    return out.samples, {"num_steps": num_steps, "repeat": repeat, "first_seed": first_seed, "nfe": out.nfe,
                         str(cfg.metric.name): value, **kid, "sampler_rmse": error, "sigma_start": sigma0,
                         "seconds": seconds, "images_per_second": cfg.num_samples / max(out.sampling_seconds, 1e-9),
                         "time": dt.datetime.now().isoformat(timespec="seconds")}


def _export_batch(directory: Path, seeds: list[int], samples: torch.Tensor) -> None:
    save_images(samples, seeds, directory)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _reference_solution(cfg: DictConfig, trainer, net, dataset, sigma_start: float, first_seed: int,
                        progress: SamplingProgress | None = None) -> torch.Tensor:
    """The same ODE solved with many Heun steps from the same seeds, cached across jobs."""
    # The model's provenance carries a checkpoint's content hash: a file replaced at the same path
    # must not reuse the old network's solution.
    tolerance = reference_tolerance(cfg)
    method = {"steps": cfg.metric.reference_steps} if tolerance is None else {"rk45_tolerance": repr(tolerance)}
    key = config_hash({"data": OmegaConf.to_container(cfg.data, resolve=True), "fingerprint": dataset.fingerprint,
                       "model": OmegaConf.to_container(cfg.model, resolve=True),
                       "provenance": getattr(net, "provenance", {}),
                       "precond": OmegaConf.to_container(cfg.precond, resolve=True),
                       "sigma_start": repr(sigma_start), **method,
                       **computation(cfg),
                       "seed": first_seed, "num_samples": cfg.num_samples})

    def compute() -> torch.Tensor:
        log.debug("reference solution: %s from sigma=%.4g, seeds from %d", reference_method(cfg), sigma_start,
                  first_seed)
        if progress is not None:  # planned only now: a cached solution costs nothing
            cost = schema.reference_evaluations(cfg)  # RK45's: a planning estimate
            progress.plan(float(cfg.num_samples) * cost)
            progress.begin(f"reference solution ({reference_method(cfg)})", cost)
        sampler = reference_sampler(sigma_start, int(cfg.metric.reference_steps), tolerance)
        module = SamplingModule(net, dataset.sample_shape, sampler, first_seed, noise=cfg.seed_noise)  # the points' latents
        # RK45's per-sample steps hand the network ever new batch shapes: compiled for fixed shapes, it
        # would recompile at each. The reference is about accuracy, not speed.
        with eager(net) if tolerance is not None else contextlib.nullcontext():
            return generate(trainer, module, cfg.num_samples, cfg.batch_size).samples

    return shared_cache(trainer, Path(cfg.paths.cache_dir) / "references" / f"{key}.pt", compute)


def shared_cache(trainer, path: Path, compute: Callable[[], T]) -> T:
    """`cached` for a value all DDP ranks compute together (`compute` is collective).

    Only rank 0 takes the file lock, decides whether the file exists and writes it: a rank waiting
    for a lock that another rank holds while both must meet in `compute` would never get it.
    """
    if trainer.world_size == 1:
        return cached(path, compute)
    from filelock import FileLock

    main = trainer.is_global_zero
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock") if main else contextlib.nullcontext():
        # Before the ranks first connect, each decides alone. They agree: ranks that Lightning
        # launches start only once rank 0 is in its first collective (holding this lock if it
        # computes, so no other job can write the file meanwhile). Ranks started by an external
        # launcher could disagree only if another job wrote this very file in between.
        if trainer.strategy.broadcast(path.exists()):
            try:
                return torch.load(path, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - re-raised with the file named
                raise RuntimeError(f"cache file {path} is unreadable ({exc}); delete it to recompute") from exc
        value = compute()
        if main:
            atomic_torch_save(value, path)
        return value
