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
    """Name shared by every job of one multirun (its sweep folder), or of the single run: `<date>/<time>`.

    Read off the job's resolved output folder, never by resolving `hydra.sweep.dir` again: outside
    the config object that resolved it, `${now:}` and `${unique_dir:}` would give a new time and folder.
    """
    hc = HydraConfig.get()
    output_dir = OmegaConf.select(hc, "runtime.output_dir", throw_on_missing=False)
    if output_dir is None:  # composed outside a job (tests, the compose API): no run folder exists
        return "local"
    if hc.mode == RunMode.MULTIRUN:
        folder = Path(output_dir).parents[len(Path(str(hc.sweep.subdir)).parts) - 1]
    else:
        folder = Path(output_dir)
    return "/".join(folder.parts[-2:])


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
          "fid_ref": ("cache_dir", "reports_dir"), "report": ("reports_dir",), "paper": ("reports_dir",)}


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
    if name == "paper":
        return regenerate_paper(cfg)
    from edm_lab.tasks.fid_ref import run_fid_ref  # the schema admits no other task.name

    return run_fid_ref(cfg)


def _choices() -> dict[str, str]:
    """The option chosen in every config group of this job (hydra's own groups left out)."""
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")}


RUN_FOLDERS = ("multirun", "outputs")  # under paths.root: where Hydra puts sweeps and runs (conf/hydra)


def report_scope(cfg: DictConfig, folder: Path | None = None) -> tuple[set | None, str]:
    """(row keys, description) of the rows a report shows: those of a run or sweep folder's job
    manifests (reused rows included); for `task=report`, of `task.sweep` (latest, all, or a sweep id)."""
    from edm_lab.track.store import MANIFEST, read_manifests

    if folder is None:
        sweep = str(cfg.task.sweep)
        if sweep == "all":
            return None, "all rows"
        root = Path(str(cfg.paths.root))
        if sweep == "latest":
            found = []  # (when a job recorded its rows, its run or sweep folder <name>/<date>/<time>)
            for name in RUN_FOLDERS:
                for manifest in (root / name).glob(f"*/*/**/{MANIFEST}"):
                    date, time = manifest.relative_to(root / name).parts[:2]
                    found.append((manifest.stat().st_mtime, root / name / date / time))
            if not found:  # an empty store, or rows older than the manifests: say what is shown
                return None, f"all rows (no run or sweep under {root} has recorded its rows)"
            folder = max(found)[1]
        else:
            folder = next((root / name / sweep for name in RUN_FOLDERS if (root / name / sweep).is_dir()), None)
            if folder is None:
                raise ConfigError(f"task.sweep={sweep}: no such run or sweep under {root}/{{{','.join(RUN_FOLDERS)}}}")
    return read_manifests(folder), f"sweep {'/'.join(folder.parts[-2:])}"


def _scoped_rows(cfg: DictConfig, folder: Path | None = None) -> tuple[Any, str]:
    """The store's rows of the scope (`report_scope`), filtered by `task.where`; and the scope's description."""
    from edm_lab.report.report import select_rows
    from edm_lab.track.store import ResultsStore

    keys, scope = report_scope(cfg, folder)
    where = cfg.task.get("where") if cfg.task.name in ("report", "paper") else None
    try:
        frame = select_rows(ResultsStore(cfg.paths.results_dir).load(), keys, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return frame, scope + (f" where {where}" if where else "")


def regenerate_paper(cfg: DictConfig) -> Path:
    """Write `task.dest` (reports/paper/): the paper's artifacts from the scoped rows."""
    from edm_lab.report.paper import write_paper_reports

    frame, scope = _scoped_rows(cfg)
    path = write_paper_reports(frame, Path(str(cfg.task.dest)), scope)
    print(f"paper reports: {path} ({scope}, {len(frame)} rows)")
    return path


def regenerate_report(cfg: DictConfig, folder: Path | None = None) -> Path:
    """Rewrite the report folder from the rows of one scope (see `report_scope`), filtered by `task.where`."""
    from edm_lab.report.report import write_report

    frame, scope = _scoped_rows(cfg, folder)
    metrics = cfg.task.get("metrics") if cfg.task.name == "report" else None
    path = write_report(frame, cfg.paths.reports_dir, metrics=list(metrics) if metrics else None,
                        title=f"edm-lab report: {scope}")
    print(f"report: {path} ({scope}, {len(frame)} rows)")
    return path


class RegenerateReport(Callback):
    """Regenerates the report of a run, or a whole multirun, once it has ended (its own rows only)."""

    def on_run_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.task.name not in ("report", "paper") and job_return is not None:
            self._write(config, lambda: Path(job_return.hydra_cfg.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweeper resolved hydra.sweep.dir on this very config object: its cache holds the folder.
        self._write(config, lambda: Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def _write(config: DictConfig, folder: Any) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return  # under DDP every rank runs the job; the report is written once
        try:
            if not HydraConfig.initialized():  # callbacks run outside the job, where ${hydra:} needs it set
                HydraConfig.instance().set_config(config)
            regenerate_report(config, folder=folder())
        except Exception as exc:  # noqa: BLE001 - a report failure must not hide the jobs' own outcome
            log.error("report not regenerated: %s (run `python run.py task=report`)", exc)
