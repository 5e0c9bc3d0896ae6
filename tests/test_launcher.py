"""Cluster launch presets (conf/hydra/launcher/): they compose, SLURM's get the resources they promise,
and a sweep through submitit's local executor runs end to end, resumes point by point and leaves no
literal `%j` folder behind (the plugin's default `submitit_folder` does).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from edm_lab.tasks.hydra_support import register_resolvers
from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is not installed (pip install -e '.[cluster]')")

LAUNCHERS = PROJECT_ROOT / "conf" / "hydra" / "launcher"
PRESETS = sorted(p.stem for p in LAUNCHERS.glob("*.yaml"))
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
# The cheapest settings of the other end-to-end tests: the ideal denoiser of a 2-D toy set, raw features.
TINY = ["data=toy2d", "data.num_samples=128", "metric=raw", "nfe.steps=[2,3]", "num_samples=16", "batch_size=16",
        "metric.reference_solver=heun", "metric.reference_steps=8", "logger=csv", "trainer.enable_progress_bar=false"]


def launcher_node(tmp_path: Path, *overrides: str):
    """The config as run.py composes it, hydra node included, with every folder under tmp_path."""
    register_resolvers()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={tmp_path}/multirun", f"paths.root={tmp_path}",
                                           *overrides], return_hydra_config=True)
    return cfg


def test_the_presets_are_there():
    assert {"slurm_sample", "slurm_train", "local"} <= set(PRESETS)
    # A preset named like one of the plugin's own options would shadow the option it extends (RecursionError).
    assert not {"submitit_slurm", "submitit_local"} & set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_extends_the_plugin(preset, tmp_path):
    text = (LAUNCHERS / f"{preset}.yaml").read_text()
    assert text.startswith("# @package hydra.launcher\n")
    cfg = launcher_node(tmp_path, f"hydra/launcher={preset}")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    plugin_option = "submitit_local" if launcher["_target_"].endswith("LocalLauncher") else "submitit_slurm"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == preset
    assert f"- {plugin_option}" in text  # its defaults list extends the plugin's own config
    assert launcher["_target_"] in (PLUGIN + "SlurmLauncher", PLUGIN + "LocalLauncher")
    # One flat log folder in the sweep folder: no %j (or other id) folder per job.
    assert launcher["submitit_folder"] == f"{tmp_path}/multirun/.submitit"
    assert launcher["nodes"] == 1 and launcher["timeout_min"] > 0
    # Hydra instantiates the launcher from this node: every value resolves and reaches it.
    assert instantiate(cfg.hydra.launcher).params["submitit_folder"] == launcher["submitit_folder"]


def test_slurm_train_runs_one_task_per_gpu(tmp_path):
    launcher = launcher_node(tmp_path, "hydra/launcher=slurm_train").hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (8, 8)
    assert launcher.max_num_timeout > 0  # a requeued training job resumes from its own last checkpoint
    assert launcher.timeout_min == 48 * 60
    cfg = launcher_node(tmp_path, "hydra/launcher=slurm_train", "hydra.launcher.gpus_per_node=4",
                        "hydra.launcher.partition=gpu")
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node) == (4, 4)
    # ...and so in what Hydra hands the plugin, which passes it on to submitit (--ntasks-per-node).
    params = instantiate(cfg.hydra.launcher).params
    assert (params["gpus_per_node"], params["tasks_per_node"], params["partition"]) == (4, 4, "gpu")


def test_slurm_sample_is_one_gpu_one_task_with_requeues(tmp_path):
    launcher = launcher_node(tmp_path, "hydra/launcher=slurm_sample").hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    assert launcher.max_num_timeout > 0 and launcher.mem_gb >= 16 and launcher.cpus_per_task >= 1
    assert launcher.timeout_min >= 6 * 60  # the estimate of one 35-NFE point at 50k x 3 (see the preset)
    assert launcher.array_parallelism >= 1


FAKE_SBATCH = """#!/bin/sh
# Keeps the batch script it is given (its last argument), then refuses it: the sweep stops there.
for arg; do script=$arg; done
cp "$script" "$(dirname "$0")/batch.sh"
echo "fake sbatch: not a cluster" >&2
exit 1
"""


@pytest.mark.parametrize("preset,overrides,flags", [
    ("slurm_sample", [], {"--gpus-per-node=1", "--ntasks-per-node=1", "--time=480", "--mem=32GB",
                          "--cpus-per-task=8", "--array=0-1%2", "--partition=gpu"}),
    ("slurm_train", ["hydra.launcher.gpus_per_node=4"], {"--gpus-per-node=4", "--ntasks-per-node=4", "--time=2880",
                                                         "--mem=128GB", "--array=0-1%2", "--partition=gpu"}),
], ids=["slurm_sample", "slurm_train-4-gpus"])
def test_slurm_presets_make_the_batch_script_they_promise(preset, overrides, flags, tmp_path):
    """run.py up to `sbatch`, with stand-ins for srun and sbatch on the PATH (there is no SLURM here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", "#!/bin/sh\nexit 1\n"), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "run.py", "-m", "solver=heun,euler", f"hydra/launcher={preset}", *overrides,
           "hydra.launcher.partition=gpu", *TINY, f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun"]
    proc = subprocess.run(cmd, check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "fake sbatch: not a cluster" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    script = (bin_dir / "batch.sh").read_text()
    sbatch = {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")}
    assert flags <= sbatch, sbatch
    logs = f"{tmp_path}/multirun/.submitit"
    assert {f"--output={logs}/%A_%a_0_log.out", f"--error={logs}/%A_%a_0_log.err"} <= sbatch  # flat, by job id
    assert f"--output {logs}/%A_%a_%t_log.out" in script  # one log per task (GPU process)
    assert not [p for p in tmp_path.rglob("*") if "%" in p.name]


def run_cli(root: Path, *args: str, sweep: str = "multirun") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", "-m", *args, f"paths.root={root}", f"hydra.sweep.dir={root}/{sweep}",
           f"hydra.run.dir={root}/outputs"]
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """`python run.py -m solver=heun,euler hydra/launcher=local`: two submitit jobs (child processes)."""
    root = tmp_path_factory.mktemp("launcher")
    proc = run_cli(root, "solver=heun,euler", "hydra/launcher=local", *TINY)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc


def test_local_preset_sweep_end_to_end(local_sweep):
    root, proc = local_sweep
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    frame = ResultsStore(root / "results").load()
    assert sorted(zip(frame.solver, frame.num_steps, frame.nfe)) == [
        ("euler", 2, 2), ("euler", 3, 3), ("heun", 2, 3), ("heun", 3, 5)]
    assert frame.sweep.nunique() == 1 and set(frame.num_samples) == {16}

    report = root / "reports" / "report.md"
    assert report.is_file() and f"report: {report}" in proc.stdout
    assert "solver=heun" in report.read_text() and "solver=euler" in report.read_text()


def test_local_preset_leaves_no_percent_j_folder_and_logs_by_job_id(local_sweep):
    root, _ = local_sweep
    assert not [p for p in root.rglob("*") if "%j" in p.name]
    sweep = root / "multirun"
    logs = sweep / ".submitit"
    assert not [p for p in logs.iterdir() if p.is_dir()]  # one flat folder
    outs = sorted(logs.glob("*_0_log.out"))
    assert len(outs) == 2 and len(list(logs.glob("*_0_log.err"))) == 2
    for out in outs:
        assert out.name.split("_")[0].isdigit()  # named by the job id (the process id, locally)
        assert "Job completed successfully" in out.read_text()  # submitit's own line, after the task returned
    for num in (0, 1):
        assert list((sweep / str(num)).glob("*.log"))  # the job's Python log, in its Hydra folder


@pytest.mark.slow  # a second sweep through submitit (~20 s on 2 idle CPU cores, twice that when they are busy)
def test_a_rerun_sweep_resumes_point_by_point(local_sweep):
    """A requeued job is the same job run again: the rows it stored are reused, the missing one is computed."""
    root, _ = local_sweep
    results = root / "results"
    lost = min(results.rglob("steps-3.json"))
    kept = {p: p.stat().st_mtime_ns for p in results.rglob("steps-*.json") if p != lost}
    lost.unlink()
    proc = run_cli(root, "solver=heun,euler", "hydra/launcher=local", *TINY, sweep="multirun-again")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert lost.is_file() and {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(ResultsStore(results).load()) == 4
    assert not [p for p in root.rglob("*") if "%j" in p.name]
