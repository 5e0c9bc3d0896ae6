"""The training task: `python run.py task=train net=... precond=... noise=... weighting=... augment=...`.

Builds the network for the data set, trains it with the paper's recipe through Lightning
(checkpoints, resume, DDP, precision from the `trainer` group), evaluates the EMA every
`task.eval_kimg` with the configured sampler, and saves the final EMA network in this
project's checkpoint format for `model=checkpoint`. With `task.loss_profile` it also stores the
training loss per noise level of the initial and of the final EMA network (Figure 5a).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from edm_lab.checkpoints.resume import check_resume_checkpoint
from edm_lab.checkpoints.snapshot import save_checkpoint
from edm_lab.data.datamodule import ImageDataModule, one_hot_labels
from edm_lab.design.losses import DenoisingLoss, loss_per_sigma, noise_density, sigma_grid
from edm_lab.design.sampler import sample
from edm_lab.evaluate.sampling import SamplingModule, frechet_from_features, point_nfe
from edm_lab.nets.denoisers import network_denoiser
from edm_lab.tasks import schema
from edm_lab.tasks.sample import AXES, build_frechet, computation, git_commit
from edm_lab.tasks.hydra_support import PROJECT_ROOT
from edm_lab.tasks.schema import ConfigError
from edm_lab.track.store import ResultsStore, config_hash, write_manifest
from edm_lab.track.tracking import (configuration_group, finish_run, log_model_files, make_logger, read_records,
                                   record_run, run_config)
from edm_lab.nets.fast import FastPath, accelerate
from edm_lab.train.module import DiffusionModule
from edm_lab.train.progress import KimgProgressBar

log = logging.getLogger(__name__)


def batch_split(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(images per device per pass, accumulation rounds) giving task.batch_size per optimizer step."""
    t = cfg.task
    batch_gpu = t.batch_gpu or t.batch_size // world_size
    rounds = t.batch_size // (batch_gpu * world_size) if batch_gpu else 0
    if batch_gpu < 1 or rounds < 1 or batch_gpu * world_size * rounds != t.batch_size:
        raise ConfigError(f"task.batch_size={t.batch_size} is not task.batch_gpu={t.batch_gpu} x {world_size} "
                          "devices x an integer number of accumulation rounds")
    return batch_gpu, rounds


class EvaluateEMA(L.Callback):
    """Every `every_kimg`, sample with the EMA network and log the metric against kimg."""

    def __init__(self, every_kimg: float, evaluate) -> None:
        self.every_nimg, self.evaluate = every_kimg * 1000, evaluate
        self.done, self.last_nimg = -1, None

    def on_train_start(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        # A resumed run has evaluated its intervals up to the checkpoint: the next point is the next mark.
        if module.cur_nimg and self.every_nimg:
            self.done = int(module.cur_nimg // self.every_nimg)

    def on_train_batch_end(self, trainer: L.Trainer, module: DiffusionModule, *args: Any) -> None:
        mark = int(module.cur_nimg // self.every_nimg) if self.every_nimg else -1
        if mark > self.done:
            self.done = mark
            self._run(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        if self.last_nimg != module.cur_nimg:
            self._run(trainer, module)  # the final network is always evaluated, once

    def _run(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        self.last_nimg = module.cur_nimg
        if trainer.is_global_zero:
            metrics = self.evaluate(module.ema, module.cur_nimg)
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)


LOSS_PROFILE_SIGMA_RANGE = (0.002, 80.0)  # the EDM sampler's [sigma_min, sigma_max]


class LossProfile(L.Callback):
    """The training loss per noise level (Figure 5a) on a fixed subset of the training images.

    `initial` is set by the caller before fit; `final` (the EMA network) is measured at the end of
    training, while the network is still on its device. Attach it on rank 0 only.
    """

    def __init__(self, cfg: DictConfig, dataset, loss: DenoisingLoss) -> None:
        t = cfg.task
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:t.loss_profile_images]
        self.images = dataset.sample_batch(pick)  # these images only: a uint8 data set stays uint8
        self.labels = one_hot_labels(dataset)[pick] if t.class_conditional else None
        self.sigmas = sigma_grid(t.loss_profile_sigmas, *LOSS_PROFILE_SIGMA_RANGE)
        self.weighting, self.seed, self.batch_size = loss.weighting, int(cfg.seed), int(cfg.batch_size)
        self.initial: list[float] | None = None
        self.final: list[float] | None = None
        self.kimg: float | None = None

    def measure(self, net: torch.nn.Module) -> list[float]:
        """The training loss of `net` at each sigma of the grid."""
        device = next(net.parameters()).device
        began = time.perf_counter()
        # The same noise for every network measured: their difference is the training, not the draws.
        loss = loss_per_sigma(net, self.images.to(device), self.sigmas, self.weighting,
                              self.labels.to(device) if self.labels is not None else None,
                              generator=torch.Generator().manual_seed(self.seed), batch_size=self.batch_size)
        log.info("loss profile: %d noise levels x %d images in %.1fs", len(self.sigmas), len(self.images),
                 time.perf_counter() - began)
        return loss.tolist()

    def on_train_end(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        self.final, self.kimg = self.measure(module.ema), module.kimg


def run_train(cfg: DictConfig, choices: Mapping[str, str], sweep: str = "local",
              project_root: Path | None = PROJECT_ROOT) -> dict[str, Any]:
    """Train; returns the final evaluation and where the checkpoints went."""
    schema.check(cfg)  # run.py checked it already; direct callers get the same check
    schema.normalize(cfg)
    t = cfg.task
    output_dir = Path(cfg.paths.output_dir)
    resume = t.resume
    own = output_dir / "checkpoints" / "last.ckpt"
    if resume is None and own.is_file():
        # This job's folder already holds its checkpoints: a cluster job requeued after a timeout or a
        # preemption. It continues (a new job always gets a new folder).
        resume = str(own)
        log.info("resuming from this job's own last checkpoint %s (a requeued job)", own)
    if resume is not None:
        try:
            check_resume_checkpoint(resume)  # weights-only, before anything is built or logged
        except ValueError as exc:
            raise ConfigError(f"task.resume={resume}: {exc}") from None
    axes = {name: instantiate(cfg[name]) for name in AXES}
    loss = DenoisingLoss(instantiate(cfg.noise), instantiate(cfg.weighting))
    augment_pipe = instantiate(cfg.augment) if cfg.get("augment") else None
    dataset = instantiate(cfg.data)
    net_cfg = OmegaConf.to_container(cfg.net, resolve=True)
    net_cfg["augment_dim"] = augment_pipe.label_dim if augment_pipe is not None else 0
    denoiser = network_denoiser(dataset, instantiate(cfg.precond, _partial_=True), net_cfg, seed=cfg.seed,
                                class_conditional=t.class_conditional).train()
    module = DiffusionModule(denoiser, loss, batch_size=t.batch_size, augment_pipe=augment_pipe, lr=t.lr,
                             betas=tuple(t.betas), eps=t.eps, lr_rampup_kimg=t.lr_rampup_kimg,
                             ema_halflife_kimg=t.ema_halflife_kimg, ema_rampup_ratio=t.ema_rampup_ratio,
                             loss_scaling=t.loss_scaling, seed=cfg.seed)
    # The fast path (TF32, channels_last, compile in place) for the network being trained; the EMA copy that
    # evaluations sample stays eager.
    accelerate(module.net, FastPath(**cfg.fast))

    steps = math.ceil(t.duration_kimg * 1000 / t.batch_size)  # optimizer steps (Lightning's global_step)
    checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="snapshot-{step:07d}", save_top_k=-1,
                                  auto_insert_metric_name=False,  # no '=' in file names: they go into overrides
                                  save_last=True, every_n_train_steps=max(1, round(t.snapshot_kimg * 1000 / t.batch_size)))
    callbacks: list[L.Callback] = [checkpoints]
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback when bars are off
        callbacks.append(KimgProgressBar(t.duration_kimg, log_speed=True))  # kimg, img/s, sec/kimg, ETA
    trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=callbacks, enable_checkpointing=True,
                          log_every_n_steps=max(1, round(t.log_kimg * 1000 / t.batch_size)), logger=False,
                          use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
                          gradient_clip_val=t.grad_clip, gradient_clip_algorithm="norm")
    batch_gpu, trainer.accumulate_grad_batches = batch_split(cfg, trainer.world_size)
    if cfg.get("logger"):  # attached once the batch split is known to work: a refused run leaves no W&B run
        trainer.logger = _training_logger(cfg, choices, sweep, output_dir, trainer.is_global_zero, resume)
    if t.eval_kimg:
        # Built once the trainer knows its device: the data set's reference features are extracted there.
        evaluate = _evaluator(cfg, choices, dataset, axes, sweep, project_root, trainer.strategy.root_device)
        trainer.callbacks.insert(0, EvaluateEMA(t.eval_kimg, evaluate))
    profile = LossProfile(cfg, dataset, loss) if t.loss_profile and trainer.is_global_zero else None
    if profile is not None:
        # The network as initialised (a resumed run loads its checkpoint only inside fit), on the training device.
        profile.initial = profile.measure(denoiser.to(trainer.strategy.root_device))
        denoiser.cpu()
        trainer.callbacks.append(profile)

    data = ImageDataModule(dataset, batch_gpu, num_workers=t.num_workers, xflip=t.xflip, seed=cfg.seed,
                           use_labels=t.class_conditional, start=lambda: module.cur_nimg)
    began = time.perf_counter()
    status = "failed"
    try:
        # On a terminal, log lines (evaluations) print above the progress bar, not through it.
        with logging_redirect_tqdm() if sys.stderr.isatty() else contextlib.nullcontext():
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        status = "success"
    finally:
        if trainer.is_global_zero and status != "success":
            finish_run(trainer.logger, status)
    result = {"kimg": module.kimg, "seconds": time.perf_counter() - began, "checkpoints": str(checkpoints.dirpath)}
    if trainer.is_global_zero:
        rows = list(evaluate.rows) if t.eval_kimg else []
        if profile is not None and profile.final is not None:  # None: fit had nothing left to train
            rows.append(_write_profile(cfg, choices, sweep, project_root, loss, profile))
        if rows or resume is not None:
            write_manifest(output_dir, rows, keep=resume is not None)
        final = save_checkpoint(module.ema, output_dir / f"network-snapshot-{int(module.kimg):06d}.safetensors",
                                extra={"kimg": module.kimg, "git_commit": git_commit(project_root)})
        result["network"] = str(final)
        if cfg.logger is not None and cfg.logger.get("artifacts"):
            log_model_files(trainer.logger, {"network": final, "checkpoint": Path(checkpoints.dirpath) / "last.ckpt"},
                            {"kimg": module.kimg})
        if trainer.logger is not None:
            record_run(output_dir, trainer.logger, len(rows))
        finish_run(trainer.logger)
        print(f"trained {module.kimg:g} kimg in {result['seconds']:.0f}s; EMA network: {final} "
              f"(sample with model=checkpoint model.path={final}); checkpoints: {checkpoints.dirpath}")
    return result


def _training_logger(cfg: DictConfig, choices: Mapping[str, str], sweep: str, output_dir: Path, main: bool,
                     resume: str | None) -> Logger:
    """The run's logger: W&B charts progress in kimg (the paper's unit), not in optimizer steps; a run resumed
    from a checkpoint continues the W&B run recorded in that checkpoint's run folder."""
    previous = read_records(Path(resume).expanduser().resolve().parent.parent) if resume is not None else []
    run_id = next((r.get("id") for r in previous if r.get("id")), None)
    label = run_label(choices)
    logger = make_logger(cfg.logger, name=label, group=configuration_group(label, config_hash(run_identity(cfg))),
                         job_type="train", sweep=sweep, run_id=run_id)
    if not main:
        return logger
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        # Named one by one: an exact definition outranks Lightning's "*" -> global_step glob.
        for prefix, names in (("train", ("loss", "lr", "images_per_second", "sec_per_kimg")),
                              ("eval", (str(cfg.metric.name),))):
            run.define_metric(f"{prefix}/kimg", hidden=True)
            for name in names:
                run.define_metric(f"{prefix}/{name}", step_metric=f"{prefix}/kimg",
                                  summary="min" if prefix == "eval" else "last")
    logger.log_hyperparams(run_config(cfg, choices, {**run_columns(cfg, choices), "label": label,
                                                      "run_hash": config_hash(run_identity(cfg)), "sweep": sweep}))
    record_run(output_dir, logger, 0)  # now: a run killed before its end can still be resumed into this W&B run
    return logger


# Task keys that change neither the network at a given kimg nor its evaluation: a resumed or
# extended run keeps its run hash, so the report draws it as one curve.
UNHASHED_TASK_KEYS = ("resume", "duration_kimg", "snapshot_kimg", "log_kimg", "eval_kimg", "num_workers",
                      "loss_profile", "loss_profile_sigmas", "loss_profile_images")


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What fixes a training run's networks: the design choices, the recipe, the seed and the precision."""
    identity = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in
                ("data", "net", "precond", "noise", "weighting", "augment", "task", "metric") if cfg.get(k) is not None}
    identity["task"] = {k: v for k, v in identity["task"].items() if k not in UNHASHED_TASK_KEYS}
    identity["seed"] = cfg.seed
    identity["precision"] = str(cfg.trainer.get("precision", "32-true"))  # Lightning's default
    fast = computation(cfg).get("fast")  # the trained network's fast path (absent when off: older hashes)
    if fast is not None:
        identity["fast"] = fast
    return identity


def run_columns(cfg: DictConfig, choices: Mapping[str, str]) -> dict[str, Any]:
    """The columns that describe a training run in every row it writes (its design choices, seed, labels)."""
    return {**{k: choices.get(k) for k in ("data", "net", "precond", "noise", "weighting", "augment")},
            "class_conditional": bool(cfg.task.class_conditional), "seed": cfg.seed}


def run_label(choices: Mapping[str, str]) -> str:
    """The name of a training run in the report, shared by all of its rows."""
    # A paper preset names the run (configs A-C differ only in hyperparameters the axes do not show).
    return " ".join(filter(None, [choices.get("experiment"), "train",
                                  (f"{choices.get('data')}/{choices.get('net')}/{choices.get('precond')} "
                                   f"noise={choices.get('noise')} weighting={choices.get('weighting')} "
                                   f"augment={choices.get('augment')}")]))


def _evaluator(cfg: DictConfig, choices: Mapping[str, str], dataset, axes, sweep: str, project_root: Path | None,
               device: torch.device | str | None = None):
    """evaluate(ema, nimg) -> metrics: sample with the sampling axes, Frechet distance, a store row."""
    t = cfg.task
    frechet = build_frechet(cfg, dataset, device)
    reference_statistics = frechet.reference_statistics()
    store = ResultsStore(cfg.paths.results_dir)
    sampler = functools.partial(sample, num_steps=t.eval_steps, **axes)
    run = run_identity(cfg)
    run_hash = config_hash(run)  # one training run: the report draws its metric against kimg
    # A row is one evaluation: of this run's network at kimg, with this sampler and sample count.
    evaluation = {**run, **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in AXES},
                  "num_samples": cfg.num_samples, **computation(cfg)}
    label = run_label(choices)
    commit = git_commit(project_root)
    first, end = int(cfg.seed), int(cfg.seed) + int(cfg.num_samples)

    def evaluate(ema: torch.nn.Module, nimg: int) -> dict[str, float]:
        # generate() would be collective (trainer.predict) and this runs inside fit on rank 0 alone, so
        # the batches go through SamplingModule's step directly: the same seeds, batches and features
        # (on the EMA's device) as `task=sample` of the saved network, hence the same number.
        module = SamplingModule(ema, dataset.sample_shape, sampler, first, extractor=frechet.extractor,
                                feature_batch_size=frechet.batch_size, feature_dtype=frechet.input_dtype,
                                keep_samples=0, noise=cfg.seed_noise).to(next(ema.parameters()).device)
        with torch.no_grad():
            for start in range(first, end, cfg.batch_size):
                module.predict_step(torch.arange(start, min(start + cfg.batch_size, end)), 0)
        value = frechet_from_features(reference_statistics, torch.cat([p["features"] for p in module.parts]),
                                      frechet.batch_size)
        nfe = point_nfe(torch.cat([p["nfe"] for p in module.parts]), module.nfe, module.nfe_varies)
        kimg = nimg / 1000
        row = {"config_hash": config_hash({**evaluation, "kimg": kimg}), "run_hash": run_hash,
               "num_steps": t.eval_steps, "nfe": nfe, cfg.metric.name: value, "kimg": kimg, "task": "train",
               "sweep": sweep, "label": label, **run_columns(cfg, choices), **{k: choices.get(k) for k in AXES},
               "num_samples": cfg.num_samples, "git_commit": commit}
        store.write(row)
        evaluate.rows.append(row)
        log.info("kimg %g: %s=%.4g (NFE %g)", kimg, cfg.metric.name, value, nfe)
        return {cfg.metric.name: value, "kimg": kimg}

    evaluate.rows = []  # every row written, for the job's manifest
    return evaluate


def _write_profile(cfg: DictConfig, choices: Mapping[str, str], sweep: str, project_root: Path | None,
                   loss: DenoisingLoss, profile: LossProfile) -> dict[str, Any]:
    """Store the run's loss profile as one row (task "loss_profile"); returns it for the manifest."""
    run, sigmas = run_identity(cfg), profile.sigmas
    # One row per run and profile grid: an extended or resumed run replaces it with its later final network.
    settings = {"sigmas": len(sigmas), "sigma_range": list(LOSS_PROFILE_SIGMA_RANGE), "images": len(profile.images)}
    p_sigma = noise_density(loss.noise, sigmas, generator=torch.Generator().manual_seed(profile.seed))
    row = {"config_hash": config_hash({**run, "loss_profile": settings}), "run_hash": config_hash(run),
           "num_steps": len(sigmas), "nfe": 2 * len(sigmas), "label": run_label(choices), "task": "loss_profile",
           "sweep": sweep, "kimg": profile.kimg, "sigma": sigmas.tolist(), "loss_initial": profile.initial,
           "loss_final": profile.final, "p_sigma": p_sigma.tolist(), "num_images": len(profile.images),
           **run_columns(cfg, choices), "git_commit": git_commit(project_root)}
    ResultsStore(cfg.paths.results_dir).write(row)
    return row
