"""The Hydra edge: resolvers, the pre-flight check, task dispatch and the report callback. Nothing here does math.

Nothing here imports torch, Lightning or W&B at module level: the pre-flight check runs before them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from edm_lab.tasks import schema
from edm_lab.tasks.schema import ConfigError

log = logging.getLogger(__name__)
PACKAGE = Path(__file__).resolve().parents[1]
# A source checkout (or editable install) keeps conf/ and sweeps/ beside the package; a wheel carries them
# inside it, as edm_lab/conf/ with sweeps/ in it (pyproject.toml maps them there).
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "conf" / "config.yaml").is_file() else None
PROJECT_ROOT = CHECKOUT  # the code's git checkout, recorded with every row; None when installed from a wheel


def config_dir() -> Path:
    """The primary config folder: the checkout's conf/, else the one the installed package carries."""
    return CHECKOUT / "conf" if CHECKOUT is not None else PACKAGE / "conf"


def sweeps_root() -> str:
    """The folder holding sweeps/ (the `sweeps` group; conf/config.yaml puts it on Hydra's search path)."""
    return str(CHECKOUT if CHECKOUT is not None else PACKAGE / "conf")


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


# Groups `--help` lists, in this order (the axes first, as in the paper's Table 1); any other group follows.
HELP_GROUPS = ("schedule", "scaling", "discretization", "solver", "churn", "guidance", "precond", "nfe", "model", "net",
               "data", "metric", "task", "noise", "weighting", "augment", "experiment", "sweeps", "trainer", "logger",
               "hydra/launcher")


def _group_options(group: str) -> list[str]:
    """The options of a config group (its yaml files), from the config folder or the sweeps' root."""
    folder = Path(sweeps_root()) / group if group == "sweeps" else config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _top_level_keys() -> list[tuple[str, str, str]]:
    """(key, default, comment) of conf/config.yaml's own keys, nested ones (limits.*, fast.*) by their path."""
    out, parent = [], None
    for line in (config_dir() / "config.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key, rest = stripped.split(":", 1)
        value, _, comment = rest.partition("#")
        if indent == 0:
            parent = key if not value.strip() and key not in ("defaults", "hydra") else None
            if key in ("defaults", "hydra") or parent:
                continue
            out.append((key, value.strip(), comment.strip()))
        elif parent is not None and indent == 2:
            out.append((f"{parent}.{key}", value.strip(), comment.strip()))
    return out


def help_body(choices: Any = None) -> str:
    """`--help`'s groups (the current choice starred) and main keys with their one-line meaning."""
    choices = dict(choices or {})
    groups = [g for g in HELP_GROUPS if _group_options(g)]
    groups += sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name not in groups
                     and p.name != "hydra" and _group_options(p.name))
    width = max(map(len, groups))
    lines = []
    for group in groups:
        options = [o + ("*" if choices.get(group) == o else "") for o in _group_options(group)]
        lines.append(f"  {group:<{width}}  {', '.join(options)}")
    keys = _top_level_keys()
    key_width = max(len(f"{k}={v}") for k, v, _ in keys)
    lines += ["", "== Main keys (key=value; default shown) =="]
    lines += [f"  {f'{k}={v}':<{key_width}}  {c}" for k, v, c in keys]
    return "\n".join(lines)


def resumed_folder(resume: str | None) -> Path | None:
    """The run folder a training checkpoint `<folder>/checkpoints/<name>.ckpt` belongs to (None if it is not one)."""
    if not resume:
        return None
    path = Path(str(resume)).expanduser().resolve()
    folder = path.parent.parent
    return folder if path.parent.name == "checkpoints" and (folder / ".hydra").is_dir() else None


def run_dir(base: str, resume: str | None = None) -> str:
    """A run's folder: that of the run a training checkpoint comes from (a resumed run continues there), else a
    new one (`unique_dir`)."""
    folder = resumed_folder(resume)
    return str(folder) if folder is not None else unique_dir(base)


def output_subdir(resume: str | None = None) -> str:
    """Where Hydra saves the job's config: `.hydra`, or beside it for a resumed run (the first one's stays)."""
    if resumed_folder(resume) is None:
        return ".hydra"
    import datetime as dt

    return f".hydra-resumed-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}"


def register_resolvers() -> None:
    """`${unique_dir:...}`, `${run_dir:...}`, `${output_subdir:...}`, `${sweeps_root:}` and `${help_body:...}`
    (the `--help` text)."""
    for name, fn in (("sweeps_root", sweeps_root), ("help_body", help_body)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    for name, fn in (("unique_dir", unique_dir), ("run_dir", run_dir), ("output_subdir", output_subdir)):
        if not OmegaConf.has_resolver(name):  # resolved once per run: every later read gets the same folder
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


# Folders each task writes (besides Hydra's job folder): probed before any work.
WRITES = {"sample": ("results_dir", "cache_dir", "reports_dir"), "train": ("results_dir", "cache_dir", "reports_dir"),
          "fid_ref": ("cache_dir", "reports_dir"), "report": ("reports_dir",), "paper": ("reports_dir",),
          "learn_steps": ("cache_dir",), "likelihood": ("results_dir", "reports_dir")}


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
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        _prefix_console_lines(f"#{HydraConfig.get().job.num} ")  # parallel jobs' lines interleave
    # Lightning's warnings that do not apply here: its pytree helper under torch >= 2.10 (every predict); the
    # EMA network, kept in eval mode on purpose; a resumed run's checkpoint folder (it continues there); and
    # mid-epoch resumption (the data module restarts its order from the checkpoint's image count).
    for message in (r".*isinstance\(treespec, LeafSpec\)", r"Found \d+ module\(s\) in eval mode",
                    r"Checkpoint directory .* exists and is not empty",
                    r"You're resuming from a checkpoint that ended before the epoch ended"):
        warnings.filterwarnings("ignore", message=message, category=Warning)
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
    if name == "likelihood":
        from edm_lab.tasks.likelihood import run_likelihood

        return run_likelihood(cfg, _choices(), sweep=sweep_id(), project_root=PROJECT_ROOT)
    if name == "learn_steps":
        from edm_lab.tasks.learn_steps import run_learn_steps

        return run_learn_steps(cfg)
    from edm_lab.tasks.fid_ref import run_fid_ref  # the schema admits no other task.name

    return run_fid_ref(cfg)


class _Prefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _prefix_console_lines(prefix: str) -> None:
    """Start every log line of this job with `prefix` (Hydra sets the handlers up anew for each job)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Prefix) for f in handler.filters):
            handler.addFilter(_Prefix(prefix))


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


def regenerate_report(cfg: DictConfig, folder: Path | None = None, quiet: bool = False) -> Path:
    """Rewrite the report folder from the rows of one scope (see `report_scope`), filtered by `task.where`."""
    from edm_lab.report.report import write_report

    frame, scope = _scoped_rows(cfg, folder)
    metrics = cfg.task.get("metrics") if cfg.task.name == "report" else None
    path = write_report(frame, cfg.paths.reports_dir, metrics=list(metrics) if metrics else None,
                        title=f"edm-lab report: {scope}")
    if not quiet:
        print(f"report: {path} ({scope}, {len(frame)} rows)")
    return path


def closing_lines(config: DictConfig, folder: Path, report: Path | None, table: str | None = None) -> list[str]:
    """Where a finished run or sweep left its rows, its tracker runs (and the sweep's W&B table run) and its report."""
    from edm_lab.track.store import read_manifests
    from edm_lab.track.tracking import read_records

    records = read_records(folder)
    rows = read_manifests(folder)
    computed = sum(r.get("computed", 0) for r in records)
    out = []
    if rows:
        out.append(f"results: {len(rows)} rows in {config.paths.results_dir} ({computed} computed now, "
                   f"{len(rows) - computed} stored before)")
    runs = [r for r in records if r.get("location")]
    if runs:
        kind = runs[0]["kind"]
        if kind == "wandb":
            offline = all(r.get("offline") for r in runs)
            where = Path(runs[0]["location"]).parent
            out.append(f"W&B: {len(runs)} {'offline ' if offline else ''}run{'s' * (len(runs) != 1)}"
                       + (" and the sweep's table" if table else "") + f" in {where}"
                       + (f" (upload: `cd {where.parent} && wandb sync --yes`)" if offline else ""))
        else:
            locations = [r["location"] for r in runs]
            if len(locations) > 3:  # a sweep's: one per job, under the sweep's folder
                out.append(f"CSV logs: {len(locations)} runs, <job>/csv/version_0 under {os.path.abspath(folder)}")
            else:
                out.append(f"CSV logs: {', '.join(locations)}")
    elif records and not computed:
        out.append("tracker: no new run (nothing was computed)")
    if report is not None:
        out.append(f"report: {report}")
    return out


def _sweep_table(config: DictConfig, folder: Path, report: Path | None) -> str | None:
    """A sweep that computed points gets one W&B run with a table of all of its points and the report's plots."""
    from edm_lab.track.store import ResultsStore, read_manifests, row_key
    from edm_lab.track.tracking import is_wandb, log_sweep_table, read_records

    if not is_wandb(config.get("logger")) or not any(r.get("computed") for r in read_records(folder)):
        return None
    keys = read_manifests(folder)
    frame = ResultsStore(config.paths.results_dir).load()
    rows = [r for r in frame.to_dict("records") if row_key(r) in keys]
    images = sorted(report.parent.glob("*.png")) if report is not None else []
    return log_sweep_table(config.logger, rows, "/".join(folder.parts[-2:]), images)


REPORTED_TASKS = ("sample", "train", "fid_ref", "likelihood")  # the tasks whose runs end with a report and closing lines


class RegenerateReport(Callback):
    """When a run, or a whole multirun, has ended well: its report (its own rows only), a W&B table of
    a sweep's points, and the closing lines saying where rows, tracker runs and report are."""

    def on_run_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return is None or getattr(job_return, "status", None) != JobStatus.COMPLETED:
            return  # the job's own error is what the user must read
        if config.task.name in REPORTED_TASKS:
            self._write(config, lambda: Path(job_return.hydra_cfg.hydra.runtime.output_dir), sweep=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweeper resolved hydra.sweep.dir on this very config object: its cache holds the folder.
        if config.task.name in REPORTED_TASKS:
            self._write(config, lambda: Path(str(config.hydra.sweep.dir)), sweep=True)

    @staticmethod
    def _write(config: DictConfig, folder: Any, sweep: bool) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return  # under DDP every rank runs the job; the report is written once
        if not HydraConfig.initialized():  # callbacks run outside the job, where ${hydra:} needs it set
            HydraConfig.instance().set_config(config)
        report = None
        try:
            report = regenerate_report(config, folder=folder(), quiet=True)
        except Exception as exc:  # noqa: BLE001 - a report failure must not hide the jobs' own outcome
            log.error("report not regenerated: %s (run `edm-lab task=report`)", exc)
        table = None
        if sweep:
            try:
                table = _sweep_table(config, folder(), report)
            except Exception as exc:  # noqa: BLE001 - the rows and the report stand without the table
                log.error("W&B sweep table not written: %s", exc)
        for line in closing_lines(config, folder(), report, table):
            print(line)
