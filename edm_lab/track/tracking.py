"""Curves to the experiment tracker: one point per NFE, through a Lightning logger.

W&B gets NFE as the step metric of every curve metric (so its charts are metric-vs-NFE),
the resolved config, a table of the curve and a grid of samples per point; other loggers
(CSV) get the metrics with step = NFE.

A point may have several repeats (disjoint seed ranges): a curve metric `m` is then their
minimum, as the paper reports, with `m_mean` and `m_std` (sample std) beside it; the costs
(`seconds`, `images_per_second`) are their means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import Tensor

from edm_lab.track.images import sample_grid


class CurveTracker:
    """Logs the points of one job's metric-vs-NFE curve."""

    COSTS = ("seconds", "images_per_second")

    def __init__(self, logger: Logger | None, metrics: Sequence[str], config: Mapping[str, Any]) -> None:
        self.logger = logger
        self.curve_metrics = list(metrics)
        self.metrics = [*metrics, *(f"{m}_{s}" for m in metrics for s in ("mean", "std")), *self.COSTS,
                        "num_steps", "repeats"]
        self.is_wandb = isinstance(logger, WandbLogger)
        if logger is None:
            return
        logger.log_hyperparams(dict(config))
        if self.is_wandb:
            run = logger.experiment
            run.define_metric("nfe")
            for name in self.metrics + ["samples"]:
                run.define_metric(name, step_metric="nfe", summary="min")

    def point_values(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The logged values of one point from its rows (one per repeat)."""
        values: dict[str, Any] = {"nfe": rows[0]["nfe"], "num_steps": rows[0]["num_steps"], "repeats": len(rows)}
        for name in self.curve_metrics:
            found = np.array([r[name] for r in rows if r.get(name) is not None], dtype=np.float64)
            if len(found):
                values[name] = float(found.min())  # NaN propagates: a failed repeat is not hidden
            if len(found) > 1:
                values[f"{name}_mean"], values[f"{name}_std"] = float(found.mean()), float(found.std(ddof=1))
        for name in self.COSTS:
            found = [float(r[name]) for r in rows if r.get(name) is not None]
            if found:
                values[name] = float(np.mean(found))
        return values

    def log_point(self, rows: Sequence[Mapping[str, Any]], samples: Tensor | None = None) -> None:
        """One curve point from its rows (one per repeat); `samples` (optional) are drawn as a grid."""
        if self.logger is None:
            return
        values = self.point_values(rows)
        if self.is_wandb:
            import wandb

            if samples is not None:
                values["samples"] = wandb.Image(sample_grid(samples), caption=f"NFE {values['nfe']}")
            # Logged on the run directly: the Lightning logger would make trainer/global_step the x axis.
            self.logger.experiment.log(values)
        else:
            self.logger.log_metrics({k: float(v) for k, v in values.items()}, step=int(values["nfe"]))

    def finish(self, rows: Sequence[Mapping[str, Any]], status: str = "success") -> None:
        """The curve as a table, then close the run."""
        if self.logger is None:
            return
        if self.is_wandb and rows:
            import pandas as pd
            import wandb

            self.logger.experiment.log({"curve": wandb.Table(dataframe=pd.DataFrame(list(rows)))})
        self.logger.finalize(status)
        if self.is_wandb:
            self.logger.experiment.finish(exit_code=0 if status == "success" else 1)

    @property
    def location(self) -> str | None:
        """Where the tracker wrote this run (a W&B run directory or a CSV log folder)."""
        if self.logger is None:
            return None
        if self.is_wandb:
            return str(Path(self.logger.experiment.dir).parent)
        return self.logger.log_dir
