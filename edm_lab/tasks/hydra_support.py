"""The Hydra edge: resolvers, the pre-flight check, task dispatch and the report callback. Nothing here does math.

Nothing here imports torch, Lightning or W&B at module level: the pre-flight check runs before them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from edm_lab.tasks import schema
from edm_lab.tasks.schema import ConfigError

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


def unique_dir(base: str) -> str:
    """`base`, or `base-1`, `base-2`, ... : the first of them this call creates (so two sweeps or runs
    started in the same second get folders of their own). Resolved once per run (cached, and copied
    into every job of a sweep by Hydra), so all jobs of one sweep share it."""
    path, n = Path(base), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path if n == 0 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()  # atomic: exactly one process creates a given folder
            return str(candidate)
        except FileExistsError:
            n += 1


def register_resolvers() -> None:
    """`${sweep_id:}`, `${run_name:}` (the tracker's group and run name) and `${unique_dir:...}`."""
    for name, fn in (("sweep_id", sweep_id), ("run_name", run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)


# Folders each task writes (besides Hydra's job folder): probed before any work.
WRITES = {"sample": ("results_dir", "cache_dir", "reports_dir"), "train": ("results_dir", "cache_dir", "reports_dir"),
          "fid_ref": ("cache_dir", "reports_dir"), "report": ("reports_dir",)}


def preflight(cfg: DictConfig, job: str = "") -> None:
    """Check `cfg` against the schema, then probe the folders its task writes; raises ConfigError.

    Cheap (no torch): run before Hydra writes a job folder and again at the start of each job.
    """
    schema.check(cfg, job)
    probe_folders(cfg)


def probe_folders(cfg: DictConfig) -> None:
    """Make sure the folders `cfg`'s task writes are writable (and clear the store of dead writers' temp files)."""
    from edm_lab.atomic import probe_writable
    from edm_lab.track.store import ResultsStore

    for key in WRITES.get(str(cfg.task.name), ()):
        folder = Path(str(cfg.paths[key])).expanduser()
        try:
            probe_writable(folder)
            if key == "results_dir":
                ResultsStore(folder).remove_stale_temp_files()
        except OSError as exc:
            raise ConfigError(f"paths.{key}={folder}: cannot write there ({exc.strerror or exc})") from None


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job a basic-sweeper multirun will launch (None for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    # As BasicSweeper.sweep: the sweeper's params, then the command line's overrides.
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@contextlib.contextmanager
def _hydra_config(config: DictConfig) -> Iterator[None]:
    """`config` as HydraConfig while checking it (`${hydra:...}` interpolations resolve against it)."""
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(config)
    try:
        yield
    finally:
        if previous is not None:
            instance.cfg = previous


class Preflight(Callback):
    """Refuses a run, or a whole sweep, whose config is invalid before Hydra creates any folder.

    A sweep is checked job by job (composed as the launcher will compose it), so a bad value in
    its last job stops it before the first one starts. Checked again at each job's start.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _refusing(), _hydra_config(config):
            preflight(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = sweep_jobs(config)
        if jobs is None:  # another sweeper picks its jobs as it goes: each is checked when it starts
            return
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        with _refusing():
            configs = []
            for number, overrides in enumerate(jobs):  # every job's values before anything is written
                job_config = loader.load_sweep_config(config, list(overrides))
                with _hydra_config(job_config):
                    schema.check(job_config, f"job {number} of {len(jobs)} ({' '.join(overrides) or 'no overrides'})"
                                 if len(jobs) > 1 else "")
                configs.append(job_config)
            probed = set()
            for job_config in configs:
                with _hydra_config(job_config):
                    folders = tuple(str(job_config.paths[k]) for k in WRITES.get(str(job_config.task.name), ()))
                    if folders not in probed:
                        probe_folders(job_config)
                        probed.add(folders)


@contextlib.contextmanager
def _refusing() -> Iterator[None]:
    """Turn a ConfigError into the process's exit: Hydra only warns about exceptions from callbacks.

    SystemExit prints the message alone (exit status 1); HYDRA_FULL_ERROR=1 adds the traceback.
    """
    try:
        yield
    except ConfigError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exception(exc)
        raise SystemExit(str(exc)) from None


def run_task(cfg: DictConfig) -> Any:
    """Check the config, then dispatch on `task.name` with the job's Hydra choices and overrides."""
    preflight(cfg)
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
    raise ConfigError(f"task.name={name}: expected one of sample, train, report, fid_ref")


def _choices() -> dict[str, str]:
    """The option chosen in every config group of this job (hydra's own groups left out)."""
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")}


def regenerate_report(cfg: DictConfig, sweep: str | None = None) -> Path:
    """Rewrite the report folder from the store's rows of one scope.

    After a run or multirun (`sweep` given): that sweep's rows. `task=report`: `task.sweep` (latest,
    all, or a sweep id) and `task.where` (a pandas query over the rows).
    """
    from edm_lab.report.report import select_rows, write_report
    from edm_lab.track.store import ResultsStore

    frame = ResultsStore(cfg.paths.results_dir).load()
    if cfg.task.name == "report":
        frame, scope = select_rows(frame, str(cfg.task.sweep), cfg.task.get("where"))
        metrics = cfg.task.get("metrics")
    else:
        frame, scope = select_rows(frame, sweep or "latest")
        metrics = None
    path = write_report(frame, cfg.paths.reports_dir, metrics=list(metrics) if metrics else None,
                        title=f"edm-lab report: {scope}")
    print(f"report: {path} ({scope})")
    return path


class RegenerateReport(Callback):
    """Regenerates the report of a run, or a whole multirun, once it has ended (its own rows only)."""

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
            regenerate_report(config, sweep=sweep_id())
        except Exception as exc:  # noqa: BLE001 - a report failure must not hide the jobs' own outcome
            log.error("report not regenerated: %s (run `python run.py task=report`)", exc)
