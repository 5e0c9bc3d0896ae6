"""Bad config values are refused at compose time: one line naming the key, nothing written, in about a second."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from edm_lab.tasks import schema
from edm_lab.tasks.hydra_support import register_resolvers, unique_dir
from edm_lab.tasks.schema import ConfigError
from tests.conftest import PROJECT_ROOT
from tests.test_configs import CONF, GROUPS, compose_cfg, learned_levels_file, options

# (overrides, the key the first line must name). The first 16 are the cases of issue 9.
BAD_VALUES = [
    (["churn=imagenet", "churn.S_churn=nan"], "churn.S_churn"),
    (["churn=imagenet", "churn.S_noise=nan"], "churn.S_noise"),
    (["churn=imagenet", "churn.S_min=nan"], "churn.S_min"),
    (["discretization.rho=inf"], "discretization.rho"),
    (["seed=-1"], "seed"),
    (["seed=1.5"], "seed"),
    (["seed=1e23"], "seed"),
    (["nfe.steps=5"], "nfe.steps"),
    (["num_samples=abc"], "num_samples"),
    (["model=checkpoint"], "model.path"),
    (["discretization.sigma_max=-5"], "discretization.sigma_max"),
    (["discretization.sigma_max=inf"], "discretization.sigma_max"),
    (["discretization.sigma_min=nan"], "discretization.sigma_min"),
    (["batch_size=2.5"], "batch_size"),
    (["num_samples=1000000000000"], "num_samples"),
    (["nfe.steps=[1000000000]"], "nfe.steps"),
    # more of the same kinds
    (["seed=true"], "seed"),
    (["repeats=0"], "repeats"),
    (["nfe.steps=[]"], "nfe.steps"),
    (["nfe.steps=[4,0]"], "nfe.steps"),
    (["force=maybe"], "force"),
    (["metric.reference_solver=heun", "metric.reference_steps=1"], "metric.reference_steps"),
    (["metric.reference_solver=rk4"], "metric.reference_solver"),
    (["metric.reference_tolerance=0"], "metric.reference_tolerance"),
    (["solver=heun", "solver.alpha=0"], "solver.alpha"),
    (["discretization.sigma_min=10", "discretization.sigma_max=5"], "discretization.sigma_min"),
    (["schedule=vp", "schedule.epsilon_s=1"], "schedule.epsilon_s"),
    (["churn=imagenet", "churn.S_min=60"], "churn.S_min"),
    (["seed=4294967000"], "seed"),  # its 1024 samples' seeds would pass 2^32
    (["model=checkpoint", "model.path=does-not-exist.safetensors"], "model.path"),
    (["model=network", "net.dropout=1.5"], "net.dropout"),
    (["model=network", "model.seed=-3"], "model.seed"),
    (["precond=vp", "precond.precision=fp8"], "precond.precision"),
    (["data=image_folder"], "data.path"),
    (["metric=fid", "metric.extractor.weights_path=no-such-weights.pth"], "metric.extractor.weights_path"),
    (["metric.reference=no-such-stats.npz"], "metric.reference"),
    (["limits.memory_gb=0.000001"], "num_samples"),
    (["experiment=train_digits", "task.lr=nan"], "task.lr"),
    (["experiment=train_digits", "task.batch_gpu=0"], "task.batch_gpu"),
    (["experiment=train_digits", "task.resume=no-such.ckpt"], "task.resume"),
    (["experiment=train_digits", "task.betas=[0.9]"], "task.betas"),
    (["experiment=train_digits", "noise.P_std=0"], "noise.P_std"),
    (["-m", "solver=heun,euler", "seed=0,-1"], "seed"),  # a sweep whose last job is bad: refused as a whole
]


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python run.py ...` with every output path under `root` (W&B offline inside the job folder)."""
    cmd = [sys.executable, "run.py", *args, f"paths.root={root}", f"hydra.run.dir={root}/outputs",
           f"hydra.sweep.dir={root}/multirun"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "WANDB_SILENT": "true"})


@pytest.mark.parametrize("overrides,key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, overrides, key):
    root = tmp_path / "root"
    start = time.perf_counter()
    proc = run_cli(root, *overrides)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert f"{key}=" in first or f"{key} " in first, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    written = [p for p in root.rglob("*")] if root.exists() else []
    assert written == []  # no row, no W&B run, no job folder, no cache, no report
    assert seconds < 30  # refused at compose time, before torch is imported (~1 s on an idle machine)


def test_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "run.py", "seed=1.5", f"paths.root={tmp_path}",
                           f"hydra.run.dir={tmp_path}/outputs"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "seed=1.5" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_unwritable_results_folder_is_refused_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli(tmp_path / "root", f"paths.results_dir={blocker}/results")
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[0].startswith(f"paths.results_dir={blocker}/results: cannot write there")
    assert not (tmp_path / "root").exists()


# -- the schema itself (in-process) ----------------------------------------------------------------

def leaf_paths(node, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from leaf_paths(value, path)
        else:
            yield path


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in schema.UNCHECKED + ("experiment", "hydra")])
def test_every_key_of_every_option_has_a_rule(group):
    """Validation is data: a key added to conf/ without a rule fails here, not silently at run time."""
    for option in options(group):
        raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
        if not isinstance(raw, dict) or "defaults" in raw or group == "augment" and option == "none":
            continue
        target = raw.get("_target_")
        for path in leaf_paths(raw):
            if path.rsplit(".", 1)[-1] in ("_target_", "_partial_"):
                continue
            full = f"{group}.{path}"
            if group in ("metric",) and path.startswith("extractor."):
                rules = schema.TARGETS[raw["extractor"]["_target_"]]
                assert path.split(".", 1)[1] in rules, f"{full} ({option}) has no rule"
            elif target is not None:
                assert path in schema.TARGETS[target], f"{full} ({option}: {target}) has no rule"
            else:
                assert full in schema.PATHS, f"{full} ({option}) has no rule"
    top = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    for path in leaf_paths({k: v for k, v in top.items() if k not in ("defaults", "hydra")}):
        assert path in schema.PATHS, f"{path} has no rule"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS if g not in ("hydra", "sweeps") for o in options(g)])
def test_every_shipped_option_passes(tmp_path, group, option):
    extra = []
    if (group, option) in (("model", "checkpoint"), ("model", "official"), ("data", "image_folder")):
        (tmp_path / "file").write_text("x")
        extra = [f"{group}.path={tmp_path / 'file'}"]
    if group == "experiment":
        extra = ["data=digits"]  # the presets name their data set's file
    if (group, option) == ("solver", "rk45"):
        extra = ["nfe.steps=[18]"]  # it takes the steps its tolerance asks for: one step count
    if (group, option) == ("discretization", "optimized"):
        extra = [f"discretization.path={learned_levels_file(tmp_path)}"]
    if (group, option) == ("guidance", "autoguidance"):
        (tmp_path / "guide").write_text("x")
        extra = [f"guidance.guide.path={tmp_path / 'guide'}"]
    cfg = compose_cfg(tmp_path, f"{group}={option}", *extra)
    schema.check(cfg)


def test_rules_say_what_they_allow():
    assert not schema.Int(lo=0).allows(True) and not schema.Int(lo=0).allows(2.0) and schema.Int(lo=0).allows(2)
    assert schema.Real(gt=0).allows(3) and not schema.Real(gt=0).allows(float("inf"))
    assert schema.Real(ge=0, inf=True).allows(float("inf")) and not schema.Real(ge=0, inf=True).allows(float("nan"))
    assert schema.Real(ge=0, inf=True).describe() == "a number >= 0 (inf allowed)"
    assert schema.SEED.describe() == "an integer in [0, 4294967295]"
    assert schema.Real(gt=0, null=True).describe() == "a finite number > 0, or null"
    assert schema.IntList(lo=1, min_len=1).allows([1, 2]) and not schema.IntList(lo=1, min_len=1).allows([1, 2.5])


def test_all_problems_are_listed_one_per_line(tmp_path):
    cfg = compose_cfg(tmp_path, "seed=-1", "batch_size=0", "churn=imagenet", "churn.S_noise=nan")
    with pytest.raises(ConfigError) as info:
        schema.check(cfg)
    assert sorted(str(info.value).splitlines()) == [  # in the config's order; sorted here
        "batch_size=0: expected an integer >= 1",
        "churn.S_noise=nan: expected a finite number >= 0",
        "seed=-1: expected an integer in [0, 4294967295]",
    ]


def test_undeclared_numbers_must_still_be_finite(tmp_path):
    cfg = compose_cfg(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(schema.PATHS, "batch_size")
        OmegaConf.update(cfg, "batch_size", float("nan"))
        with pytest.raises(ConfigError, match=r"^batch_size=nan: expected a finite number"):
            schema.check(cfg)


def test_workload_estimate(tmp_path):
    cfg = compose_cfg(tmp_path, "nfe.steps=[4,18]", "num_samples=1000", "repeats=3", "metric=raw")
    work = schema.workload(cfg)
    # Heun: 2N - 1 per step count, plus the reference solution per repeat: RK45's estimate at 1e-5 ...
    assert work.evaluations == 3 * 1000 * ((7 + 35) + schema.RK45_REFERENCE_EVALUATIONS)
    finer = compose_cfg(tmp_path, "nfe.steps=[4]", "num_samples=1000", "metric.reference_tolerance=1e-10")
    assert schema.workload(finer).evaluations == pytest.approx(1000 * (7 + 10 * schema.RK45_REFERENCE_EVALUATIONS))
    # ... or 256 Heun steps (511).
    heun = compose_cfg(tmp_path, "nfe.steps=[4,18]", "num_samples=1000", "metric.reference_solver=heun")
    assert schema.workload(heun).evaluations == 1000 * ((7 + 35) + 511)
    # digits 8x8 with raw features: features + reference + samples, float64, plus the step grid.
    assert work.memory_bytes == 8 * 1000 * (64 + 3 * 64) + schema.BYTES_PER_STEP * 18
    euler = compose_cfg(tmp_path, "solver=euler", "nfe.steps=[4,18]", "num_samples=1000", "metric.sampler_error=false")
    assert schema.workload(euler).evaluations == 1000 * 22
    stochastic = compose_cfg(tmp_path, "churn=imagenet", "nfe.steps=[4]", "num_samples=10")
    assert schema.workload(stochastic).evaluations == 10 * 7  # no reference solution for a stochastic sampler


def test_limits_are_overridable_on_purpose(tmp_path):
    big = ["num_samples=30000000", "metric=raw"]
    with pytest.raises(ConfigError, match="limits.max_evaluations"):
        schema.check(compose_cfg(tmp_path, *big))
    schema.check(compose_cfg(tmp_path, *big, "limits.max_evaluations=1e13", "limits.memory_gb=1000"))
    schema.check(compose_cfg(tmp_path, *big, "limits.max_evaluations=null", "limits.memory_gb=1000"))


# -- distinct output folders -----------------------------------------------------------------------

def test_unique_dir_gives_each_caller_its_own_folder(tmp_path):
    base = str(tmp_path / "multirun" / "2026-12-01" / "10-00-00")
    first, second, third = unique_dir(base), unique_dir(base), unique_dir(base)
    assert [Path(p).name for p in (first, second, third)] == ["10-00-00", "10-00-00-1", "10-00-00-2"]
    assert all(Path(p).is_dir() for p in (first, second, third))


def _two_compositions_in_the_same_second(tmp_path, monkeypatch, key: str) -> tuple[str, str]:
    monkeypatch.chdir(tmp_path)
    register_resolvers()
    frozen = time.strftime("%H-%M-%S")
    dirs = []
    for _ in range(2):
        with initialize_config_dir(str(CONF), version_base="1.3"):  # registers Hydra's own `now` again
            OmegaConf.register_new_resolver("now", lambda pattern: frozen if "H" in pattern else "2026-12-01",
                                            replace=True)
            cfg = compose("config", return_hydra_config=True)
        dirs.append(OmegaConf.select(cfg, key))
    return dirs[0], dirs[1]


@pytest.mark.parametrize("key", ["hydra.sweep.dir", "hydra.run.dir"])
def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch, key):
    from hydra.core.utils import setup_globals

    try:
        first, second = _two_compositions_in_the_same_second(tmp_path, monkeypatch, key)
    finally:
        setup_globals()  # Hydra's own `now` resolver back
    assert first != second and Path(second).name == Path(first).name + "-1"
    assert Path(first).parent == Path(second).parent


def test_sweeps_started_together_write_to_distinct_folders(tmp_path):
    """Two `run.py -m` sweeps at once whose folders resolve to the same name (as two in one second do):
    the second gets `-1`, and every job of each sweep writes into its own sweep's folder."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    same = "hydra.sweep.dir=${unique_dir:multirun/together}"  # one base for both, instead of one second
    procs = [subprocess.Popen([sys.executable, str(PROJECT_ROOT / "run.py"), "-m", "task=report", f"+marker={i},{i}0",
                               f"paths.root={tmp_path}", same], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in (1, 2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    overrides = sorted((tmp_path / "multirun").rglob("overrides.yaml"))
    assert sorted(p.relative_to(tmp_path / "multirun").parts[0] for p in overrides) == \
        ["together"] * 2 + ["together-1"] * 2
    for sweep in ("together", "together-1"):
        markers = {p.read_text().split("+marker=")[1].split()[0]
                   for p in (tmp_path / "multirun" / sweep).rglob("overrides.yaml")}
        assert markers in ({"1", "10"}, {"2", "20"})  # both jobs of one sweep, in that sweep's folder


def test_max_nfe_keeps_the_step_counts_within_the_budget(tmp_path):
    """nfe=low: every step count whose NFE (as the solver counts them) is at most max_nfe; none fitting is refused."""
    assert schema.steps(compose_cfg(tmp_path, "nfe=low", "solver=heun")) == [2, 3, 4, 5]  # 2N - 1 <= 10
    assert schema.steps(compose_cfg(tmp_path, "nfe=low", "solver=dpmpp_2m")) == list(range(2, 11))
    cfg = compose_cfg(tmp_path, "nfe=low", "solver=heun")
    assert schema.workload(cfg).evaluations == cfg.num_samples * (3 + 5 + 7 + 9 + schema.RK45_REFERENCE_EVALUATIONS)
    with pytest.raises(ConfigError, match=r"^nfe.max_nfe=2: no step count of nfe.steps=\[3,4\] fits"):
        schema.check(compose_cfg(tmp_path, "solver=heun", "nfe.steps=[3,4]", "nfe.max_nfe=2"))
