"""The likelihood task: negative log-likelihood in bits/dim of data images under the configured model.

    python run.py task=likelihood                                  # the digits' ideal denoiser
    python run.py -m task=likelihood model=checkpoint model.path=a.safetensors,b.safetensors

The probability-flow ODE with the instantaneous change of variables (`edm_lab.evaluate.likelihood`), on
the data set's first `task.num_images` images (image i with seed `seed + i`: its dequantisation noise and
Hutchinson probes). One row per configuration in the results store, `bits_per_dim` (and its standard error)
against the ODE's mean NFE, so the report lays the models side by side.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from edm_lab.evaluate.likelihood import mean_bits_per_dim
from edm_lab.tasks import schema
from edm_lab.tasks.sample import git_commit, label_head, load_model
from edm_lab.track.store import ResultsStore, config_hash, write_manifest
from edm_lab.track.tracking import configuration_group, finish_run, make_logger, record_run, run_config

log = logging.getLogger(__name__)

# Keys of task=likelihood that change its number (the identity of a row).
IDENTITY_KEYS = ("num_images", "dequantize", "sigma_min", "sigma_max", "divergence", "probes", "rtol", "atol")


def pixels_of(dataset, count: int) -> torch.Tensor:
    """The first `count` images as uint8 pixels: the stored ones, or float samples in [-1, 1] quantised."""
    if dataset.raw is not None:
        return dataset.raw[:count]
    return ((dataset.sample_batch(slice(0, count)).to(torch.float64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def run_likelihood(cfg: DictConfig, choices: Mapping[str, str], sweep: str = "local",
                   project_root: Path | None = None) -> dict[str, Any]:
    """Measure bits/dim (or reuse the stored row) and write one row; returns it."""
    schema.check(cfg)
    t = cfg.task
    dataset = instantiate(cfg.data)
    if t.dequantize and not dataset.is_image:
        raise schema.ConfigError(f"task.dequantize=true needs 8-bit images; data {dataset.name!r} has samples shaped "
                                 f"{tuple(dataset.sample_shape)}: set task.dequantize=false")
    net = load_model(cfg, dataset, choices)
    provenance = dict(getattr(net, "provenance", {}) or {})
    count = min(int(t.num_images), len(dataset))
    identity = {"task": "likelihood", "data": OmegaConf.to_container(cfg.data, resolve=True),
                "fingerprint": dataset.fingerprint, "model": OmegaConf.to_container(cfg.model, resolve=True),
                "precond": OmegaConf.to_container(cfg.precond, resolve=True), "provenance": provenance,
                "seed": int(cfg.seed), **{k: OmegaConf.to_container(t, resolve=True)[k] for k in IDENTITY_KEYS}}
    identity["num_images"] = count
    chash = config_hash(identity)
    store = ResultsStore(cfg.paths.results_dir)
    stored = None if cfg.force else store.get(chash, 0)
    if stored is not None:
        log.info("likelihood of %s is stored: %.4f bits/dim (force=true recomputes)", chash, stored["bits_per_dim"])
        write_manifest(cfg.paths.output_dir, [stored])
        record_run(cfg.paths.output_dir, None, 0)
        return stored

    device = instantiate(cfg.trainer).strategy.root_device
    net = net.to(device).eval() if isinstance(net, torch.nn.Module) else net
    images = pixels_of(dataset, count) if t.dequantize else dataset.sample_batch(slice(0, count))
    labels = None
    if int(getattr(net, "label_dim", 0) or 0) and dataset.labels is not None:
        labels = torch.nn.functional.one_hot(dataset.labels[:count].long(), int(net.label_dim)).to(torch.float32)
    options = dict(sigma_min=float(t.sigma_min), sigma_max=float(t.sigma_max), divergence=str(t.divergence),
                   probes=int(t.probes), rtol=float(t.rtol), atol=float(t.atol))
    start = time.perf_counter()
    mean, sem, nfe = mean_bits_per_dim(net, images.to(device), seeds=list(range(int(cfg.seed), int(cfg.seed) + count)),
                                       batch_size=int(cfg.batch_size),
                                       class_labels=None if labels is None else labels.to(device), **options)
    label = " ".join([label_head(choices, provenance), "likelihood", *([] if t.dequantize else ["dequantize=false"])])
    row = {"config_hash": chash, "label": label, "sweep": sweep, "task": "likelihood", "num_steps": 0, "repeat": 0,
           "nfe": nfe, "bits_per_dim": mean, "bits_per_dim_se": None if math.isnan(sem) else sem,
           "num_images": count, "seed": int(cfg.seed), "seconds": time.perf_counter() - start,
           **{k: choices.get(k) for k in ("data", "model", "precond")}, **options,
           "dequantize": bool(t.dequantize), "git_commit": git_commit(project_root),
           **{k: v for k, v in provenance.items() if k != "precond"}}
    store.write(row)
    write_manifest(cfg.paths.output_dir, [row])
    logger = None
    if cfg.get("logger"):  # one tracker run per configuration, grouped like its sampling runs
        logger = make_logger(cfg.logger, name=label, job_type="likelihood", sweep=sweep,
                             group=configuration_group(label, chash))
        logger.log_hyperparams(run_config(cfg, choices, {"config_hash": chash, "label": label}))
        logger.log_metrics({k: row[k] for k in ("bits_per_dim", "bits_per_dim_se", "nfe") if row[k] is not None})
        finish_run(logger)
    record_run(cfg.paths.output_dir, logger, 1)
    log.info("likelihood: %.4f +- %.4f bits/dim over %d images (mean NFE %.0f, %.1f s)", row["bits_per_dim"],
             row["bits_per_dim_se"] or 0.0, count, row["nfe"], row["seconds"])
    return row
