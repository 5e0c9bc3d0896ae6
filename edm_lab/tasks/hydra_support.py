"""The Hydra edge: resolvers, task dispatch and the report callback. Nothing here does math."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def sweep_id() -> str:
    """Name shared by every job of one multirun (its sweep folder), or of the single run."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return "/".join(Path(hc.sweep.dir).parts[-2:])
    return "/".join(Path(hc.run.dir).parts[-2:])


def run_name() -> str:
    """The job's overrides (`solver=euler,schedule=vp`), or `defaults` when it has none."""
    return HydraConfig.get().job.override_dirname or "defaults"


def register_resolvers() -> None:
    """`${sweep_id:}` and `${run_name:}` for the tracker's group and run name."""
    for name, fn in (("sweep_id", sweep_id), ("run_name", run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def run_task(cfg: DictConfig) -> Any:
    """Dispatch on `task.name` with the job's Hydra choices and overrides."""
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # device summaries and tips, once per Trainer
    name = cfg.task.name
    if name == "sample":
        from edm_lab.tasks.sample import run_sample

        return run_sample(cfg, _choices(), list(HydraConfig.get().overrides.task), sweep=sweep_id(),
                          project_root=PROJECT_ROOT)
    if name == "train":
        from edm_lab.tasks.train import run_train

        return run_train(cfg, _choices(), sweep=sweep_id(), project_root=PROJECT_ROOT)
    if name == "report":
        return regenerate_report(cfg)
    if name == "fid_ref":
        from edm_lab.tasks.fid_ref import run_fid_ref

        return run_fid_ref(cfg)
    raise ValueError(f"task.name={name!r} is not a task here (sample, train, report, fid_ref)")


def _choices() -> dict[str, str]:
    """The option chosen in every config group of this job (hydra's own groups left out)."""
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")}


def regenerate_report(cfg: DictConfig) -> Path:
    """Rewrite the report folder from every row in the results store."""
    from edm_lab.report.report import write_report
    from edm_lab.track.store import ResultsStore

    metrics = cfg.task.get("metrics") if cfg.task.name == "report" else None
    path = write_report(ResultsStore(cfg.paths.results_dir).load(), cfg.paths.reports_dir,
                        metrics=list(metrics) if metrics else None)
    print(f"report: {path}")
    return path


class RegenerateReport(Callback):
    """Regenerates the report once a run, or a whole multirun, has ended."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.task.name != "report":
            self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config)

    @staticmethod
    def _write(config: DictConfig) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return  # under DDP every rank runs the job; the report is written once
        try:
            if not HydraConfig.initialized():  # callbacks run outside the job, where ${hydra:} needs it set
                HydraConfig.instance().set_config(config)
            regenerate_report(config)
        except Exception as exc:  # noqa: BLE001 - a report failure must not hide the jobs' own outcome
            log.error("report not regenerated: %s (run `python run.py task=report`)", exc)
