"""run.py end to end: a tiny multirun through parallel jobs, the store, W&B offline runs and the report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT
from tests.wandb_records import summarize

TINY = ["data=toy2d", "data.num_samples=256", "metric=raw", "nfe.steps=[2,4]", "num_samples=64", "batch_size=32",
        "metric.reference_steps=32", "trainer.enable_progress_bar=false"]


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *args, f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun",
           f"hydra.run.dir={tmp_path}/outputs"]
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python run.py -m solver=heun,euler schedule=edm,vp` on tiny settings, two jobs at a time."""
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


def test_wandb_offline_runs_share_a_group_and_plot_against_nfe(sweep):
    root, _ = sweep
    frame = ResultsStore(root / "results").load()
    run_files = sorted((root / "multirun").rglob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 4
    for path in run_files:
        run = summarize(path)
        assert run["group"] == frame.sweep.iloc[0]
        assert run["metrics"]["fd_raw"] == "nfe" and run["metrics"]["sampler_rmse"] == "nfe"
        points = [h for h in run["history"] if "fd_raw" in h]
        assert [p["nfe"] for p in points] == sorted(p["nfe"] for p in points) and len(points) == 2
        solver, schedule = run["config"]["solver"]["_target_"], run["config"]["schedule"]["_target_"]
        for point in points:
            match = frame[(frame.nfe == point["nfe"]) & (abs(frame.fd_raw - point["fd_raw"]) < 1e-12)]
            assert len(match) == 1, (solver, schedule, point)
            assert point["sampler_rmse"] == pytest.approx(match.sampler_rmse.iloc[0], rel=1e-12)
            assert point["samples/_type"] == "image-file"
        assert any(h.get("curve/_type") == "table-file" for h in run["history"])
        assert run["config"]["logger"]["offline"] is True


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
    assert "results: 2 rows" in proc.stdout and "tracker run:" in proc.stdout


def test_rerun_skips_stored_points_and_force_recomputes(sweep):
    root, _ = sweep
    store = ResultsStore(root / "results")
    before = {p: p.stat().st_mtime_ns for p in (root / "results").rglob("steps-*.json")}
    proc = run_cli(root, "-m", "solver=heun,euler", "schedule=edm", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("stored row reused") == 4
    assert {p: p.stat().st_mtime_ns for p in before} == before
    proc = run_cli(root, "solver=euler", "schedule=edm", "force=true", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 2
    assert len(store.load()) == 8
    assert json.loads(changed[0].read_text())["solver"] == "euler"
