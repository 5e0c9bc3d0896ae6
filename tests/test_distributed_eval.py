"""Evaluation under DDP: run.py with two CPU ranks (gloo) stores the rows one process stores.

Each rank samples whole batches of consecutive seeds and computes their features; the gathered
per-seed results are put in seed order, so the metrics come out bit for bit the same.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_lab.evaluate.features import FlattenFeatures, FrechetDistance
from edm_lab.evaluate.sampling import SeedDataset, SeedShards, frechet_from_features
from edm_lab.tasks.sample import run_sample
from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT
from tests.test_configs import compose_cfg

TINY = ["nfe.steps=[4]", "num_samples=64", "metric.reference_solver=heun", "metric.reference_steps=16", "logger=csv",
        "trainer.enable_progress_bar=false"]
CLASSIFIER = ["metric=classifier", "+metric.extractor.epochs=2"]  # a real network extractor, trained quickly
CHOICES = {"data": "digits", "model": "ideal", "precond": "edm", "schedule": "edm", "scaling": "none",
           "discretization": "edm", "solver": "heun", "churn": "none"}


def run_ddp(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *TINY, *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           f"paths.root={root}", f"hydra.run.dir={root}/run"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("count,batch,world", [(10, 3, 1), (10, 3, 2), (10, 3, 5), (64, 64, 2), (7, 2, 3)])
def test_shards_are_whole_batches_that_do_not_depend_on_the_world_size(count, batch, world):
    data = SeedDataset(100, count)
    batches = set()
    for rank in range(world):
        indices = list(SeedShards(data, batch, world, rank))
        assert indices  # Lightning refuses a rank without a batch
        batches |= {tuple(indices[i:i + batch]) for i in range(0, len(indices), batch)}
    assert batches == {tuple(range(s, min(s + batch, count))) for s in range(0, count, batch)}


def test_distance_from_features_is_the_distance_of_the_samples():
    generator = torch.Generator().manual_seed(0)
    reference, generated = torch.randn(300, 5, generator=generator), torch.randn(200, 5, generator=generator) + 0.3
    distance = FrechetDistance(FlattenFeatures(5), batch_size=64)
    distance.set_reference(reference)
    assert frechet_from_features(distance.reference_statistics(), generated.double(), 64) == distance(generated)
    with pytest.raises(ValueError, match="do not fit"):
        frechet_from_features(distance.reference_statistics(), generated[:, :4].double())


def test_two_ranks_store_the_rows_of_one_process(tmp_path):
    proc = run_ddp(tmp_path / "ddp", *CLASSIFIER, "batch_size=16", "repeats=2", f"export_images={tmp_path}/png")
    assert proc.stdout.count("results: 2 rows") == 1  # rank 1 computed them too, but reports and writes nothing
    ddp = ResultsStore(tmp_path / "ddp" / "results").rows()
    one = run_sample(compose_cfg(tmp_path / "one", *TINY, *CLASSIFIER, "batch_size=16", "repeats=2"),
                     {**CHOICES, "metric": "classifier"})
    assert [(r["repeat"], r["first_seed"]) for r in ddp] == [(r["repeat"], r["first_seed"]) for r in one] == [(0, 0), (1, 64)]
    for a, b in zip(ddp, one):
        assert a["config_hash"] == b["config_hash"] and a["nfe"] == b["nfe"] == 7
        assert a["fd_classifier"] == b["fd_classifier"]  # exactly: same features in the same order
        assert a["sampler_rmse"] == b["sampler_rmse"]
        assert a["seconds"] > 0 and a["images_per_second"] > 0
    assert ddp[0]["fd_classifier"] != ddp[1]["fd_classifier"]
    # The reference solutions gathered from both ranks are the single process's, bit for bit.
    refs = {p.name: p for p in (tmp_path / "ddp" / ".cache" / "references").glob("*.pt")}
    assert len(refs) == 2
    for name, path in refs.items():
        assert torch.equal(torch.load(path), torch.load(tmp_path / "one" / ".cache" / "references" / name))
    # Each rank exported its own seeds: every seed once, nothing half written.
    folder = tmp_path / "png" / ddp[0]["config_hash"] / "steps-4"
    assert sorted(p.stem for p in folder.rglob("*.png")) == [f"{s:06d}" for s in range(128)]
    assert {p.parent.parent.name for p in folder.rglob("*.png")} == {"r0", "r1"}
    assert not list((tmp_path / "png").rglob("*.tmp"))
    # One tracker run: one point per NFE, the minimum over the two repeats.
    logged = list(csv.DictReader(next((tmp_path / "ddp" / "run").rglob("metrics.csv")).read_text().splitlines()))
    assert len(logged) == 1 and float(logged[0]["fd_classifier"]) == min(r["fd_classifier"] for r in ddp)


def test_batches_fewer_than_ranks_and_another_batch_size(tmp_path):
    """One batch for two ranks: rank 1 samples a duplicate that the gather drops."""
    run_ddp(tmp_path / "ddp", "metric=raw", "batch_size=64")
    ddp = ResultsStore(tmp_path / "ddp" / "results").rows()
    one = run_sample(compose_cfg(tmp_path / "one", *TINY, "metric=raw", "batch_size=24"), {**CHOICES, "metric": "raw"})
    assert len(ddp) == len(one) == 1
    # Raw features and the ideal denoiser's samples do not depend on the batch: still exact.
    assert ddp[0]["fd_raw"] == one[0]["fd_raw"] and ddp[0]["sampler_rmse"] == one[0]["sampler_rmse"]
