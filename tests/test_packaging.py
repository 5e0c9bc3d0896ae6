"""Packaging: the `edm-lab` command works from any directory, and a wheel carries the configs and sweeps.

pyproject.toml maps conf/ and sweeps/ into the wheel as edm_lab/conf/ and edm_lab/conf/sweeps/; an
installed package finds them there (edm_lab.tasks.hydra_support.config_dir), a checkout beside the package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT

TINY = ["data=toy2d", "data.num_samples=128", "metric=raw", "nfe.steps=[2]", "num_samples=16", "batch_size=16",
        "metric.reference_solver=heun", "metric.reference_steps=8", "logger=csv"]


def test_the_package_list_names_every_package_folder():
    declared = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for p in (PROJECT_ROOT / "edm_lab").rglob("__init__.py")}
    assert declared == found | {"edm_lab.conf", "edm_lab.conf.sweeps"}


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The project built as a wheel (offline: no build isolation) and unpacked into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(PROJECT_ROOT)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(out.glob("edm_lab-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_carries_every_config_and_sweep(installed_wheel):
    conf = installed_wheel / "edm_lab" / "conf"
    for source, packaged in ((PROJECT_ROOT / "conf", conf), (PROJECT_ROOT / "sweeps", conf / "sweeps")):
        expected = sorted(p.relative_to(source) for p in source.rglob("*.yaml"))
        assert sorted(p.relative_to(packaged) for p in packaged.rglob("*.yaml")
                      if packaged == conf / "sweeps" or p.parent != conf / "sweeps") == expected
    entry = (next(installed_wheel.glob("edm_lab-*.dist-info")) / "entry_points.txt").read_text()
    assert "edm-lab = edm_lab.cli:main" in entry


def test_an_installed_wheel_runs_a_named_sweep_outside_any_checkout(installed_wheel, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed_wheel)}  # before the editable install of the checkout
    where = subprocess.run([sys.executable, "-c", "import edm_lab.tasks.hydra_support as h; print(h.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(installed_wheel / "edm_lab" / "conf")
    helped = subprocess.run([sys.executable, "-m", "edm_lab", "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "sweeps" in helped.stdout and "figure2" in helped.stdout and "slurm_sample" in helped.stdout
    composed = subprocess.run([sys.executable, "-m", "edm_lab", "sweeps=figure2", "--cfg", "hydra", "-p",
                               "hydra.sweeper.params"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
    assert composed.returncode == 0 and "experiment" in composed.stdout, composed.stderr


def test_the_command_runs_a_named_sweep_from_another_directory(tmp_path):
    """`edm-lab -m sweeps=solver_order` (or `python -m edm_lab`, where the script is not on PATH) in an empty
    folder: the configs and sweeps come from the package, the results go under the current directory."""
    command = [shutil.which("edm-lab")] if shutil.which("edm-lab") else [sys.executable, "-m", "edm_lab"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*command, "-m", "sweeps=solver_order", *TINY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = ResultsStore(tmp_path / "results").load()
    assert sorted(frame.solver) == ["euler", "heun", "midpoint", "ralston"]
    assert (tmp_path / "reports" / "report.md").is_file() and list((tmp_path / "multirun").iterdir())
    assert f"report: {tmp_path / 'reports' / 'report.md'}" in proc.stdout


def test_help_lists_the_groups_the_main_keys_and_examples():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    groups = {line.split()[0]: line.split(None, 1)[1] for line in text.split("== Config groups")[1]
              .split("== Main keys")[0].splitlines()[1:] if line.strip()}
    for group in ("schedule", "scaling", "discretization", "solver", "churn", "precond", "sweeps", "hydra/launcher"):
        assert group in groups, group
    assert "heun*" in groups["solver"] and "figure2" in groups["sweeps"] and "slurm_train" in groups["hydra/launcher"]
    from omegaconf import OmegaConf

    config = OmegaConf.load(PROJECT_ROOT / "conf" / "config.yaml")
    keys = [k for k in config if k not in ("defaults", "hydra") and not OmegaConf.is_dict(config[k])]
    keys += [f"{k}.{sub}" for k in config if k != "hydra" and OmegaConf.is_dict(config[k]) for sub in config[k]]
    for key in keys:  # each with its default and the first line of its comment in config.yaml
        assert any(line.strip().startswith(f"{key}=") and len(line.split()) > 1 for line in text.splitlines()), key
    examples = text.split("== Examples ==")[1].strip().splitlines()
    assert sum(line.strip().startswith("edm-lab ") for line in examples) == 3
    assert len(text.splitlines()) <= 60
