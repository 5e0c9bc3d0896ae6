"""run.py end to end: a tiny multirun through parallel jobs, the store, W&B offline runs, the report and the console."""
from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edm_lab.track.store import ResultsStore
from edm_lab.track.tracking import configuration_group
from tests.conftest import PROJECT_ROOT
from tests.wandb_records import summarize

TINY = ["data=toy2d", "data.num_samples=256", "metric=raw", "nfe.steps=[2,4]", "num_samples=64", "batch_size=32",
        "metric.reference_solver=heun", "metric.reference_steps=32"]


def run_cli(tmp_path: Path, *args: str, env: dict | None = None, sweep: str = "multirun") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *args, f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/{sweep}",
           f"hydra.run.dir={tmp_path}/outputs"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"} | {"HYDRA_FULL_ERROR": "1"} | (env or {})
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)


def wandb_runs(root: Path) -> dict[str, dict]:
    """Every W&B offline run under root/wandb, by its folder name."""
    return {p.parent.name: summarize(p) for p in sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python run.py -m solver=heun,euler schedule=edm,vp` on tiny settings, two jobs at a time, W&B not
    told to be quiet (the harness silences it)."""
    root = tmp_path_factory.mktemp("e2e")
    proc = run_cli(root, "-m", "solver=heun,euler", "schedule=edm,vp", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", *TINY)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc


def test_every_point_of_the_grid_is_stored(sweep):
    root, _ = sweep
    frame = ResultsStore(root / "results").load()
    assert len(frame) == 8  # 2 solvers x 2 schedules x 2 step counts
    assert set(zip(frame.solver, frame.schedule)) == {("heun", "edm"), ("heun", "vp"), ("euler", "edm"), ("euler", "vp")}
    expected_nfe = {("heun", 2): 3, ("heun", 4): 7, ("euler", 2): 2, ("euler", 4): 4}
    for row in frame.itertuples():
        assert row.nfe == expected_nfe[(row.solver, row.num_steps)]
        assert math.isfinite(row.fd_raw) and row.fd_raw >= -1e-6
        assert math.isfinite(row.sampler_rmse) and row.sampler_rmse >= 0
        assert row.seconds > 0 and row.num_samples == 64 and row.seed == 0
        assert row.data == "toy2d" and row.model == "ideal" and row.discretization == "edm"
        assert row.git_commit and len(row.config_hash) == 12
    assert frame.sweep.nunique() == 1
    assert frame.config_hash.nunique() == 4
    # Every job starts at sigma_max = 80 (through either schedule), so all four share one reference solution.
    assert len(list((root / ".cache" / "references").glob("*.pt"))) == 1


def test_wandb_runs_are_one_curve_per_configuration_with_choice_names(sweep):
    root, _ = sweep
    frame = ResultsStore(root / "results").load()
    runs = wandb_runs(root)
    points_runs = [r for r in runs.values() if r["config"].get("config_hash")]
    tables = [r for r in runs.values() if not r["config"].get("config_hash")]
    assert len(points_runs) == 4 and len(tables) == 1  # one per job, and the sweep's table of all points
    sweep_id = frame.sweep.iloc[0]
    for run in points_runs:
        config = run["config"]
        rows = frame[frame.config_hash == config["config_hash"]]
        # The configuration is the group: its label (cut to W&B's 128 characters) and its hash.
        assert run["group"] == configuration_group(rows.label.iloc[0], config["config_hash"])
        assert run["group"].endswith(f" [{config['config_hash']}]") and len(run["group"]) <= 128
        assert run["name"] == rows.label.iloc[0]
        assert config["solver"] in ("heun", "euler") and config["schedule"] in ("edm", "vp")  # Hydra choices
        assert config["resolved"]["solver"]["_target_"].startswith("edm_lab.design.solvers.")
        assert config["resolved"]["logger"]["offline"] is True and config["sweep"] == sweep_id
        assert run["metrics"]["fd_raw"] == "nfe" and run["metrics"]["sampler_rmse"] == "nfe"
        assert not {"num_steps", "repeats", "seconds", "images_per_second"} & set(run["metrics"])
        points = [h for h in run["history"] if "fd_raw" in h]
        assert [p["nfe"] for p in points] == sorted(p["nfe"] for p in points) and len(points) == 2
        for point in points:
            assert not {"num_steps", "repeats", "seconds", "images_per_second"} & set(point)
            match = rows[(rows.nfe == point["nfe"]) & (abs(rows.fd_raw - point["fd_raw"]) < 1e-12)]
            assert len(match) == 1, (config["solver"], config["schedule"], point)
            assert point["sampler_rmse"] == pytest.approx(match.sampler_rmse.iloc[0], rel=1e-12)
            assert point["samples/_type"] == "image-file"
        assert any(h.get("curve/_type") == "table-file" for h in run["history"])
    assert tables[0]["name"] == f"sweep {sweep_id}"
    assert any(h.get("points/_type") == "table-file" for h in tables[0]["history"])


def test_console_is_quiet_and_says_where_everything_went(sweep):
    root, proc = sweep
    out = proc.stdout + proc.stderr
    # Not a terminal: no bars, each point's line says how far its job is. 4 jobs x (start, 2 points), the
    # launcher's lines, the data set's statistics and the closing lines.
    assert out.count("\n") <= 20, out
    assert "wandb:" not in out and "Warning" not in out and "Predicting" not in out and "%|" not in out, out
    points = [line for line in out.splitlines() if " steps=" in line]
    assert len(points) == 8 and all(re.search(r"\] #[0-3] steps=\d .*\[\d+%, ETA \d+:\d\d\]$", p) for p in points)
    assert f"results: 8 rows in {root / 'results'} (8 computed now, 0 stored before)" in proc.stdout
    assert f"W&B: 4 offline runs and the sweep's table in {root / 'wandb'}" in proc.stdout
    assert "wandb sync --yes" in proc.stdout


def test_report_is_regenerated_after_the_sweep(sweep):
    root, proc = sweep
    report = root / "reports" / "report.md"
    assert report.exists(), proc.stdout[-2000:]
    text = report.read_text()
    assert text.count("solver=heun") >= 2 and text.count("solver=euler") >= 2
    for metric in ("fd_raw", "sampler_rmse"):
        png = root / "reports" / f"{metric}_vs_nfe.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"report: {report}" in proc.stdout


def test_rerun_skips_stored_points_and_force_recomputes(sweep):
    root, _ = sweep
    store = ResultsStore(root / "results")
    before = {p: p.stat().st_mtime_ns for p in (root / "results").rglob("steps-*.json")}
    runs = set(wandb_runs(root))
    proc = run_cli(root, "-m", "solver=heun,euler", "schedule=edm", *TINY, sweep="rerun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("all 2 points of") == 2
    assert "tracker: no new run (nothing was computed)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert set(wandb_runs(root)) == runs  # a rerun that computes nothing makes no W&B run, nor a sweep table
    proc = run_cli(root, "solver=euler", "schedule=edm", "force=true", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 2
    assert len(store.load()) == 8
    assert json.loads(changed[0].read_text())["solver"] == "euler"


def test_wandb_sync_in_the_root_finds_every_run(sweep):
    """The one documented command: `wandb sync --yes` in paths.root; its dry run lists what it would upload."""
    root, _ = sweep
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}  # silent, it would list nothing
    proc = subprocess.run(["wandb", "sync", "--dry-run"], cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split("/")[-2] for line in (proc.stdout + proc.stderr).splitlines() if "run-" in line and ".wandb" in line}
    latest = (root / "wandb" / "latest-run").resolve().name  # W&B lists its newest run by this link
    assert {latest if name == "latest-run" else name for name in listed} == set(wandb_runs(root)), proc.stdout


def test_a_failed_run_prints_its_error_and_no_report(tmp_path):
    """Inception weights missing: the job fails before sampling; nothing says a report or results were written."""
    args = ["metric=fid", "data.limit=64", "nfe.steps=[2]", "num_samples=16"]
    proc = run_cli(tmp_path, *args, env={"TORCH_HOME": str(tmp_path / "torch")})
    assert proc.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth are missing" in proc.stderr
    assert "report:" not in proc.stdout and "results:" not in proc.stdout
    assert not (tmp_path / "reports" / "report.md").exists()
