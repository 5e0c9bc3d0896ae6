"""The experiment tracker's edge: W&B (offline by default) or CSV runs, through Lightning loggers.

W&B layout, chosen so a default workspace shows what a user of the dashboard expects:
- one run per job that computed something, all under `<paths.root>/wandb/` (W&B's own layout), so
  `wandb sync` in that folder uploads every run of the project (a resumed training run's parts
  are synced into one run, in order);
- the run's group is its configuration (label and config hash): a configuration is one curve,
  and a later job adding points to it joins the same curve; `job_type` is the task, the sweep a tag;
- the config holds the Hydra choice of every group (`solver: heun`, `schedule: edm`, ...) beside
  the resolved values (`resolved.solver.alpha`), so runs filter and colour by axis;
- curve metrics are metrics only, against NFE (sampling) or kimg (training), summarised by their
  minimum; costs and counts go to the curve's table.

A point may have several repeats (disjoint seed ranges): a curve metric `m` is then their
minimum, as the paper reports, with `m_mean` and `m_std` (sample std) beside it; the costs
(`seconds`, `images_per_second`) are their means.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from edm_lab.atomic import atomic_write_text
from edm_lab.track.images import sample_grid

TRACKER_RECORD = "tracker.json"  # in a job's output folder: the tracker run it wrote to (for the closing lines)
W_AND_B = "lightning.pytorch.loggers.WandbLogger"
GROUP_LIMIT = 128  # W&B's longest group name


def is_wandb(logger_cfg: Any) -> bool:
    """Whether a logger config (or None) builds a W&B logger."""
    return logger_cfg is not None and OmegaConf.select(logger_cfg, "_target_") == W_AND_B


def configuration_group(label: str, config_hash: str) -> str:
    """A configuration's W&B group: its label, cut to W&B's limit, and its config hash (which keeps it unique)."""
    suffix = f" [{config_hash}]"
    return (label if len(label) + len(suffix) <= GROUP_LIMIT else label[:GROUP_LIMIT - len(suffix) - 1] + "~") + suffix


def run_config(cfg: DictConfig, choices: Mapping[str, str], identity: Mapping[str, Any]) -> dict[str, Any]:
    """The tracker run's config: every group's choice by name, the row identity, and the resolved config."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {**choices, **identity, "resolved": resolved}


def make_logger(logger_cfg: DictConfig | None, *, name: str, group: str, job_type: str, sweep: str,
                run_id: str | None = None) -> Logger | None:
    """The configured Lightning logger for one job (None for `logger=null`).

    A W&B run prints nothing (its failures raise), is named `name`, grouped by `group`, typed by the
    task and tagged with the sweep; `run_id` continues an earlier run (a resumed training run).
    """
    if logger_cfg is None:
        return None
    if not is_wandb(logger_cfg):
        return instantiate(logger_cfg)  # CSV: one log folder per job, in the job's folder
    import wandb

    # W&B prints nothing (its failures raise, with their message); WANDB_SILENT=false: its usual output. Set
    # before the run's settings are read too: W&B warns while reading them (about Lightning's `anonymous=None`).
    silent = os.environ.get("WANDB_SILENT", "true").strip().lower() not in ("false", "0", "no", "off")
    settings = wandb.Settings(silent=silent)
    wandb.termsetup(settings, None)
    extra: dict[str, Any] = {}
    if run_id is not None:
        extra = {"id": run_id, "resume": "allow"}
    options = {k: v for k, v in OmegaConf.to_container(logger_cfg, resolve=True).items() if k != "artifacts"}
    return instantiate(options, name=name, group=group, job_type=job_type, tags=[f"sweep:{sweep}"],
                       settings=settings, **extra)


def log_model_files(logger: Logger | None, files: Mapping[str, Path], metadata: Mapping[str, Any]) -> None:
    """Each file as a W&B model artifact `<name>-<run id>` (aliases latest); offline runs keep them for `wandb sync`."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    for name, path in files.items():
        artifact = wandb.Artifact(f"{name}-{run.id}", type="model", metadata=dict(metadata))
        artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=["latest"])


def record_run(output_dir: str | Path, logger: Logger | None, computed: int) -> None:
    """Note in the job's folder which tracker run it wrote and how many points it computed."""
    entry: dict[str, Any] = {"computed": int(computed), "kind": None, "location": None}
    if logger is not None:
        entry["kind"] = "wandb" if isinstance(logger, WandbLogger) else "csv"
        entry["location"] = run_location(logger)
        if isinstance(logger, WandbLogger):
            entry["offline"] = bool(logger.experiment.offline)
            entry["id"] = logger.experiment.id
    atomic_write_text(Path(output_dir) / TRACKER_RECORD, json.dumps(entry) + "\n")


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """The tracker records of every job under a run or sweep folder (unreadable ones skipped)."""
    out = []
    for path in sorted(Path(folder).rglob(TRACKER_RECORD)):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def run_location(logger: Logger) -> str:
    """Where a logger wrote its run (a W&B run directory or a CSV log folder)."""
    if isinstance(logger, WandbLogger):
        return str(Path(logger.experiment.dir).parent)
    return str(logger.log_dir)


def finish_run(logger: Logger | None, status: str = "success") -> None:
    """Close a logger's run (Lightning leaves W&B's open: the next job in this process would log into it)."""
    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        logger.experiment.finish(exit_code=0 if status == "success" else 1)


class CurveTracker:
    """Logs the points of one job's metric-vs-NFE curve."""

    COSTS = ("seconds", "images_per_second")

    def __init__(self, logger: Logger | None, metrics: Sequence[str], config: Mapping[str, Any]) -> None:
        self.logger = logger
        self.curve_metrics = list(metrics)
        self.is_wandb = isinstance(logger, WandbLogger)
        if logger is None:
            return
        logger.log_hyperparams(dict(config))
        if self.is_wandb:
            run = logger.experiment
            run.define_metric("nfe", hidden=True)
            for name in self.curve_metrics:
                run.define_metric(name, step_metric="nfe", summary="min")
                for stat in ("mean", "std"):
                    run.define_metric(f"{name}_{stat}", step_metric="nfe", summary="none")
            run.define_metric("samples", step_metric="nfe")

    def point_values(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The values of one point from its rows (one per repeat): NFE, metrics, costs and counts."""
        values: dict[str, Any] = {"nfe": rows[0]["nfe"], "num_steps": rows[0]["num_steps"], "repeats": len(rows)}
        values.update(self.metric_values(rows))
        for name in self.COSTS:
            found = [float(r[name]) for r in rows if r.get(name) is not None]
            if found:
                values[name] = float(np.mean(found))
        return values

    def metric_values(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """A point's curve metrics: the minimum over repeats, with mean and std when there are several."""
        values: dict[str, float] = {}
        for name in self.curve_metrics:
            found = np.array([r[name] for r in rows if r.get(name) is not None], dtype=np.float64)
            if len(found):
                values[name] = float(found.min())  # NaN propagates: a failed repeat is not hidden
            if len(found) > 1:
                values[f"{name}_mean"], values[f"{name}_std"] = float(found.mean()), float(found.std(ddof=1))
        return values

    def log_point(self, rows: Sequence[Mapping[str, Any]], samples: Tensor | None = None) -> None:
        """One curve point from its rows (one per repeat); `samples` (optional) are drawn as a grid."""
        if self.logger is None:
            return
        if self.is_wandb:
            import wandb

            values: dict[str, Any] = {"nfe": rows[0]["nfe"], **self.metric_values(rows)}
            if samples is not None:
                values["samples"] = wandb.Image(sample_grid(samples), caption=f"NFE {values['nfe']}")
            # Logged on the run directly: the Lightning logger would make trainer/global_step the x axis.
            self.logger.experiment.log(values)
        else:
            values = self.point_values(rows)
            self.logger.log_metrics({k: float(v) for k, v in values.items()}, step=int(values["nfe"]))

    def finish(self, rows: Sequence[Mapping[str, Any]], status: str = "success") -> None:
        """The curve as a table (every column of every row), then close the run."""
        if self.logger is None:
            return
        if self.is_wandb and rows:
            self.logger.experiment.log({"curve": rows_table(rows)})
        finish_run(self.logger, status)


def rows_table(rows: Sequence[Mapping[str, Any]]):
    """Store rows as a W&B table (nested values as JSON text, so every column has one type)."""
    import pandas as pd
    import wandb

    frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                          for r in rows])
    return wandb.Table(dataframe=frame)


def log_sweep_table(logger_cfg: DictConfig, rows: Sequence[Mapping[str, Any]], sweep: str,
                    images: Sequence[Path] = ()) -> str | None:
    """One W&B run (job_type "sweep") holding a table of every point of a sweep and the report's plots.

    Returns the run's folder; None when the logger is not W&B or there are no rows.
    """
    if not is_wandb(logger_cfg) or not rows:
        return None
    logger = make_logger(logger_cfg, name=f"sweep {sweep}", group=f"sweep {sweep}", job_type="sweep", sweep=sweep)
    run = logger.experiment
    run.log({"points": rows_table(rows)})
    import wandb

    for path in images:
        run.log({f"report/{Path(path).stem}": wandb.Image(str(path))})
    location = run_location(logger)
    finish_run(logger)
    return location
