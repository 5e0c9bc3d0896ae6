"""Training: the task end to end, gradient accumulation, exact resume, the data stream."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import functools
from pathlib import Path

import lightning as L
import pytest
import torch

from edm_lab.checkpoints.snapshot import load_checkpoint
from edm_lab.data import digits
from edm_lab.data.datamodule import InfiniteSampler, TrainingView
from edm_lab.design.losses import DenoisingLoss, EDMNoise, EDMWeighting
from edm_lab.design.precond import EDMPrecond
from edm_lab.nets.denoisers import network_denoiser
from edm_lab.tasks.sample import run_sample
from edm_lab.tasks.train import run_train
from edm_lab.track.store import ResultsStore
from edm_lab.train.module import DiffusionModule
from tests.conftest import net_preset
from tests.test_configs import compose_cfg

TINY = ["task=train", "net=ddpmpp_small", "data.limit=256", "task.batch_size=32", "task.lr_rampup_kimg=0.05",
        "task.ema_halflife_kimg=0.1", "task.log_kimg=0.032", "task.num_workers=0", "task.eval_steps=4", "num_samples=64", "batch_size=64",
        "logger=csv", "trainer.enable_progress_bar=false", "metric=raw", "task.loss_profile_images=64"]
CHOICES = {"data": "digits", "net": "ddpmpp_small", "precond": "edm", "noise": "edm", "weighting": "edm",
           "augment": "none", "schedule": "edm"}


def train(tmp_path: Path, name: str, *overrides: str):
    cfg = compose_cfg(tmp_path, *TINY, f"paths.output_dir={tmp_path}/{name}", *overrides)
    return run_train(cfg, CHOICES), tmp_path / name


def evaluations(results: Path) -> list[dict]:
    """The training evaluations of a store (its loss-profile rows left out)."""
    return [r for r in ResultsStore(results).rows() if r["task"] == "train"]


def logged_losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_training_task_checkpoints_evaluates_and_saves_the_ema(tmp_path):
    result, run_dir = train(tmp_path, "run", "task.duration_kimg=0.128", "task.snapshot_kimg=0.064",
                            "task.eval_kimg=0.064")
    assert result["kimg"] == pytest.approx(0.128)
    snapshots = sorted(p.name for p in (run_dir / "checkpoints").glob("snapshot-*.ckpt"))
    assert snapshots == ["snapshot-0000002.ckpt", "snapshot-0000004.ckpt"]
    ema = load_checkpoint(result["network"])
    assert ema.build_spec["network"]["model_type"] == "SongUNet" and ema.checkpoint_extra["kimg"] == pytest.approx(0.128)
    rows = sorted(evaluations(tmp_path / "results"), key=lambda r: r["kimg"])
    assert [r["kimg"] for r in rows] == [0.032, 0.064, 0.128]
    assert all(r["task"] == "train" and r["nfe"] == 7 and r["fd_raw"] > 0 for r in rows)
    assert len({r["run_hash"] for r in rows}) == 1 and len({r["config_hash"] for r in rows}) == 3
    assert len(logged_losses(run_dir)) == 4
    # The last evaluation is the sample task's measurement of the saved EMA network: same seeds, same number.
    cfg = compose_cfg(tmp_path, *[o for o in TINY if not o.startswith("task")], "model=checkpoint",
                      f"model.path={result['network']}", "nfe.steps=[4]", "metric.sampler_error=false",
                      f"paths.results_dir={tmp_path}/sampled")
    (sampled,) = run_sample(cfg, {"data": "digits", "model": "checkpoint"})
    assert sampled["nfe"] == rows[-1]["nfe"] and sampled["fd_raw"] == rows[-1]["fd_raw"]


def test_resume_continues_exactly(tmp_path):
    full, full_dir = train(tmp_path, "full", "task.duration_kimg=0.128", "task.snapshot_kimg=0.064",
                           "task.eval_kimg=0.064", f"paths.results_dir={tmp_path}/full-results")
    half = full_dir / "checkpoints" / "snapshot-0000002.ckpt"
    resumed, resumed_dir = train(tmp_path, "resumed", "task.duration_kimg=0.128", "task.snapshot_kimg=0.064",
                                 "task.eval_kimg=0.064", f"task.resume={half}", f"paths.results_dir={tmp_path}/resumed-results")
    assert logged_losses(resumed_dir) == logged_losses(full_dir)[2:]
    a, b = load_checkpoint(full["network"]).state_dict(), load_checkpoint(resumed["network"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The resumed run evaluates only the marks after the checkpoint, as the same run (the report's one curve).
    full_rows = {r["kimg"]: r for r in evaluations(tmp_path / "full-results")}
    (last,) = evaluations(tmp_path / "resumed-results")
    assert sorted(full_rows) == [0.032, 0.064, 0.128] and last["kimg"] == 0.128
    assert {k: last[k] for k in ("run_hash", "config_hash", "fd_raw")} == \
        {k: full_rows[0.128][k] for k in ("run_hash", "config_hash", "fd_raw")}


class ContentNoise(DenoisingLoss):
    """A loss whose sigma and noise depend only on the image, so two batch splits see the same draws."""

    def __call__(self, denoiser, images, class_labels=None, augment_pipe=None):
        sigma = images.flatten(1).sum(1).abs().add(0.5).reshape(-1, 1, 1, 1)
        n = torch.sin(images * 1000 + 1) * sigma
        return EDMWeighting()(sigma) * (denoiser(images + n, sigma.flatten(), class_labels) - images) ** 2


@pytest.mark.parametrize("rounds", [2, 4])
def test_gradient_accumulation_gives_the_same_update(rounds):
    data = TrainingView(digits(limit=64), use_labels=False)

    class RecordGradients(L.Callback):
        grads: dict | None = None

        def on_before_optimizer_step(self, trainer, module, optimizer):
            if self.grads is None:  # the first update: both runs start from the same weights
                self.grads = {n: p.grad.clone() for n, p in module.net.named_parameters()}

    def run(batch_gpu: int, accumulate: int) -> dict:
        torch.manual_seed(0)
        record = RecordGradients()
        # Dropout off: its masks depend on how the batch is split, the update must not.
        net = network_denoiser(digits(limit=8), functools.partial(EDMPrecond), net_preset("ddpmpp_small") | {"dropout": 0},
                               seed=1).train()
        module = DiffusionModule(net, ContentNoise(EDMNoise(), EDMWeighting()),
                                 batch_size=32, lr=1e-3, lr_rampup_kimg=0)
        sampler = InfiniteSampler(len(data), seed=0, start=lambda: module.cur_nimg)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_gpu, sampler=sampler)
        trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=accumulate, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[record])
        trainer.fit(module, loader)
        assert module.cur_nimg == 64
        return record.grads

    one, split = run(32, 1), run(32 // rounds, rounds)
    for key in one:  # equal up to float32 summation order
        scale = one[key].abs().max().item() + 1e-12
        torch.testing.assert_close(split[key], one[key], rtol=0, atol=1e-4 * scale, msg=lambda m, k=key: f"{k}: {m}")


def test_infinite_sampler_is_a_resumable_sharded_shuffle():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    whole = take(InfiniteSampler(10, seed=3), 25)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[:10] != whole[10:20]  # a new permutation each epoch
    assert take(InfiniteSampler(10, seed=3, start=lambda: 7), 18) == whole[7:25]
    ranks = [take(InfiniteSampler(10, seed=3, rank=r, world_size=2), 12) for r in range(2)]
    interleaved = [x for pair in zip(*ranks) for x in pair]
    assert interleaved == whole[:24]


def test_bad_training_values_fail_early(tmp_path):
    for override, key in [("task.batch_size=0", "task.batch_size"), ("task.duration_kimg=-1", "task.duration_kimg"),
                          ("task.batch_gpu=24", "task.batch_size"), ("task.resume=/nope.ckpt", "task.resume")]:
        cfg = compose_cfg(tmp_path, *TINY, override)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            run_train(cfg, CHOICES)


def test_ddp_on_cpu_with_two_processes(tmp_path):
    """trainer=ddp with the gloo backend: two ranks, each half the batch, one EMA network saved."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    cmd = [sys.executable, "run.py", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "task.duration_kimg=0.128", "task.snapshot_kimg=0.064", "task.eval_kimg=0", f"paths.root={tmp_path}",
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained 0.128 kimg" in proc.stdout
    snapshots = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("snapshot-*.ckpt"))
    assert snapshots == ["snapshot-0000002.ckpt", "snapshot-0000004.ckpt"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "snapshot-0000004.ckpt", weights_only=True)
    assert ckpt["cur_nimg"] == 128 and ckpt["global_step"] == 4
    assert len(list((tmp_path / "run").glob("network-snapshot-*.safetensors"))) == 1


def test_bf16_mixed_precision_training_runs(tmp_path):
    result, run_dir = train(tmp_path, "bf16", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064",
                            "task.eval_kimg=0", "trainer.precision=bf16-mixed")
    losses = logged_losses(run_dir)
    assert len(losses) == 2 and all(0 < x < 1e3 for x in losses)
    assert load_checkpoint(result["network"]).precision == "fp32"  # the stored network stays float32


@pytest.mark.parametrize("override", ["task.grad_clip=1e-12", "task.loss_scaling=1e-12"])
def test_gradient_clipping_and_loss_scaling_reach_the_update(tmp_path, override):
    """Adam ignores the gradient's scale but for eps: a gradient shrunk to 1e-12 (clipped to that norm,
    or a loss scaled by it) must leave the weights almost where they were, unlike the plain recipe."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    def moved(name: str, *overrides: str) -> float:
        result, _ = train(tmp_path, name, "task.duration_kimg=0.064", "task.snapshot_kimg=0.064", "task.eval_kimg=0",
                          "task.ema_halflife_kimg=0.001", *overrides)
        cfg = compose_cfg(tmp_path, *TINY)
        start = network_denoiser(instantiate(cfg.data), instantiate(cfg.precond, _partial_=True),
                                 OmegaConf.to_container(cfg.net) | {"augment_dim": 0}, seed=cfg.seed).state_dict()
        end = load_checkpoint(result["network"]).state_dict()
        return max((end[k] - start[k]).abs().max().item() for k in start)

    plain, shrunk = moved("plain"), moved("shrunk", override)
    assert plain > 1e-4 and shrunk < plain * 0.02  # without the option both move alike (ratio ~1)


def test_wandb_charts_training_against_kimg(tmp_path):
    from tests.wandb_records import summarize

    train(tmp_path, "wandb", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064", "task.eval_kimg=0.064",
          "logger=wandb")
    run = summarize(next((tmp_path / "wandb").rglob("run-*.wandb")))
    assert run["metrics"]["eval/fd_raw"] == "eval/kimg" and run["metrics"]["train/loss"] == "train/kimg"
    assert [h["eval/kimg"] for h in run["history"] if "eval/fd_raw" in h] == [0.032, 0.064]


def test_a_seed_reproduces_training_exactly(tmp_path):
    """Fresh runs with one seed draw the same noise levels, noise and dropout masks whatever state the process's
    global generators are in: same losses, EMA weights, evaluation rows and checkpoint bytes."""
    import random

    import numpy as np

    from edm_lab.checkpoints.snapshot import file_sha256

    def run(name: str, process_state: int, *overrides: str):
        torch.manual_seed(process_state)  # whatever ran before in this process
        np.random.seed(process_state)
        random.seed(process_state)
        result, run_dir = train(tmp_path, name, "task.duration_kimg=0.064", "task.snapshot_kimg=0.064",
                                "task.eval_kimg=0.064", f"paths.results_dir={tmp_path}/{name}-results", *overrides)
        rows = sorted(evaluations(tmp_path / f"{name}-results"), key=lambda r: r["kimg"])
        return logged_losses(run_dir), load_checkpoint(result["network"]).state_dict(), rows, result["network"]

    a, b, other = run("a", 1), run("b", 2), run("other-seed", 1, "seed=7")
    assert len(a[0]) == 2 and a[0] == b[0] and a[0] != other[0]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert [(r["config_hash"], r["fd_raw"]) for r in a[2]] == [(r["config_hash"], r["fd_raw"]) for r in b[2]]
    assert file_sha256(a[3]) == file_sha256(b[3])


def test_a_resumed_run_continues_its_folder_and_wandb_run_and_stores_artifacts(tmp_path):
    """`task.resume=<folder>/checkpoints/last.ckpt` through run.py: the same output folder (the first config kept),
    the same W&B run id, kimg-based curves that continue; with `logger.artifacts=true`, model artifacts."""
    from tests.wandb_records import finished_records, summarize

    common = [a for a in TINY if not a.startswith(("logger=", "trainer.enable_progress_bar"))] + [
        "logger=wandb", "logger.artifacts=true", "task.snapshot_kimg=0.064", "task.eval_kimg=0.064"]

    def cli(*overrides: str) -> subprocess.CompletedProcess:
        from tests.conftest import PROJECT_ROOT

        # Run from tmp_path: outputs/, results/ and wandb/ go under the current directory.
        proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "run.py"), *common, *overrides], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    cli("task.duration_kimg=0.064")
    (folder,) = (tmp_path / "outputs").glob("*/*")
    proc = cli("task.duration_kimg=0.128", f"task.resume={folder}/checkpoints/last.ckpt")
    assert list((tmp_path / "outputs").glob("*/*")) == [folder]  # no new folder
    assert (folder / ".hydra" / "config.yaml").is_file() and len(list(folder.glob(".hydra-resumed-*"))) == 1
    parts = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(parts) == 2 and parts[0].name == parts[1].name  # run-<id>.wandb: one W&B run in two parts
    curves = [[h["eval/kimg"] for h in summarize(p)["history"] if "eval/fd_raw" in h] for p in parts]
    assert curves == [[0.032, 0.064], [0.128]]  # evaluated at the first step, then every 0.064 kimg
    # The folder's report covers the whole run: the manifest keeps the first part's evaluations.
    kimgs = sorted(r["kimg"] for r in evaluations(tmp_path / "results"))
    assert len(json.loads((folder / "rows.json").read_text())) >= len(kimgs) == 3
    assert "report:" in proc.stdout and "W&B: 1 offline run" in proc.stdout
    artifacts = [r.artifact for p in parts for r in finished_records(p) if r.WhichOneof("record_type") == "artifact"]
    assert {a.type for a in artifacts} == {"model"}
    assert sorted(a.name.split("-")[0] for a in artifacts) == ["checkpoint", "checkpoint", "network", "network"]


def test_a_requeued_job_resumes_from_its_own_last_checkpoint(tmp_path):
    """A job run again in its own folder (a cluster requeue) continues from checkpoints/last.ckpt there."""
    first, run_dir = train(tmp_path, "job", "task.duration_kimg=0.064", "task.snapshot_kimg=0.032", "task.eval_kimg=0")
    assert first["kimg"] == 0.064
    again, _ = train(tmp_path, "job", "task.duration_kimg=0.128", "task.snapshot_kimg=0.032", "task.eval_kimg=0")
    assert again["kimg"] == 0.128
    losses = logged_losses(run_dir)  # one CSV log per part, in the same folder
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("snapshot-*.ckpt"))
    assert steps == [1, 2, 3, 4] and losses


def test_training_on_the_fast_path_is_its_own_run(tmp_path):
    """`fast.channels_last=true`: the trained network's weights go NHWC, the run gets its own hash, the saved
    EMA network loads as any other."""
    train(tmp_path, "plain", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064", "task.eval_kimg=0.064",
                         f"paths.results_dir={tmp_path}/plain-results")
    result, _ = train(tmp_path, "fast", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064", "task.eval_kimg=0.064",
                      "fast.channels_last=true", f"paths.results_dir={tmp_path}/fast-results")
    plain, fast = (sorted(evaluations(tmp_path / f"{name}-results"), key=lambda r: r["kimg"]) for name in ("plain", "fast"))
    assert plain[0]["run_hash"] != fast[0]["run_hash"] and [r["kimg"] for r in plain] == [r["kimg"] for r in fast]
    assert fast[-1]["fd_raw"] == pytest.approx(plain[-1]["fd_raw"], rel=1e-3)  # float rounding apart
    assert load_checkpoint(result["network"]) is not None


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """`fast.compile=true` compiles the trained network in place (forward and backward): the losses follow the
    eager run's to float rounding, and the checkpoint's keys are the eager module's."""
    _, eager_dir = train(tmp_path, "eager", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064", "task.eval_kimg=0")
    _, compiled_dir = train(tmp_path, "compiled", "task.duration_kimg=0.064", "task.snapshot_kimg=0.064",
                            "task.eval_kimg=0", "fast.compile=true")
    assert logged_losses(compiled_dir) == pytest.approx(logged_losses(eager_dir), rel=1e-4)
    keys = torch.load(compiled_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].keys()
    assert not any("_orig_mod" in k for k in keys)
