"""The training progress bar: kimg of task.duration_kimg, img/s, sec/kimg, the ETA, resume, quiet logs."""
from __future__ import annotations

import functools
import io
import itertools
from pathlib import Path

import lightning as L
import pytest
import torch

from edm_lab.data import digits
from edm_lab.data.datamodule import InfiniteSampler, TrainingView
from edm_lab.design.losses import DenoisingLoss, EDMNoise, EDMWeighting
from edm_lab.design.precond import EDMPrecond
from edm_lab.nets.denoisers import network_denoiser
from edm_lab.train import progress
from edm_lab.train.module import DiffusionModule
from edm_lab.train.progress import KimgProgressBar, progress_stats
from tests.conftest import net_preset

BATCH = 16  # images per optimizer step: 0.016 kimg
TINY_NET = net_preset("ddpmpp_small") | {"model_channels": 8, "channel_mult": [1], "channel_mult_emb": 1}


def test_progress_stats_arithmetic():
    stats = progress_stats(nimg=2048, seconds=4.0, remaining_nimg=10_240)
    assert stats.images_per_second == 512 and stats.sec_per_kimg == pytest.approx(1000 / 512)
    assert stats.eta_seconds == pytest.approx(20.0)
    assert progress_stats(500, 2.0).eta_seconds == 0  # nothing left
    assert progress_stats(500, 2.0, remaining_nimg=-32).eta_seconds == 0  # past the duration
    assert progress_stats(0, 3.0, 1000) == (None, None, None)  # nothing trained yet: no speed, no ETA
    assert progress_stats(64, 0.0, 1000) == (None, None, None)


class FakeClock:
    """perf_counter advancing one second per call: the bar sees one step per second."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self.ticks))


def fit(duration_kimg: float, bar: KimgProgressBar, tmp_path: Path, ckpt_path: Path | None = None,
        **trainer_kwargs: object) -> tuple[DiffusionModule, L.Trainer]:
    """Train a tiny network up to duration_kimg through Lightning, as run_train configures its Trainer."""
    data = TrainingView(digits(limit=64), use_labels=False)
    net = network_denoiser(digits(limit=8), functools.partial(EDMPrecond), TINY_NET, seed=1).train()
    module = DiffusionModule(net, DenoisingLoss(EDMNoise(), EDMWeighting()), batch_size=BATCH, lr_rampup_kimg=0)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH,
                                         sampler=InfiniteSampler(len(data), start=lambda: module.cur_nimg))
    trainer = L.Trainer(**{"accelerator": "cpu", "max_steps": round(duration_kimg * 1000 / BATCH), "callbacks": [bar],
                           "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                           "use_distributed_sampler": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                           "default_root_dir": tmp_path, **trainer_kwargs})
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, trainer


def test_bar_counts_kimg_to_the_duration_and_resumes_at_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "time", FakeClock())
    log = io.StringIO()  # not a TTY: one line per redraw
    first = KimgProgressBar(0.064, file=log, log_interval_s=0)
    module, trainer = fit(0.064, first, tmp_path)
    bar = first.train_progress_bar
    assert module.cur_nimg == 64 and bar.total == 0.064 and bar.initial == 0 and bar.n == 0.064
    assert bar.desc == "training" and first.kimg == 0.064
    # Four steps of 16 images in four (fake) seconds.
    assert (first.images_per_second, first.sec_per_kimg, first.eta_seconds) == (16, 62.5, 0)
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)

    # Resumed and extended to 0.128 kimg: the bar starts at the checkpoint's kimg with the configured total.
    resumed_log = io.StringIO()
    second = KimgProgressBar(0.128, file=resumed_log, log_interval_s=0)
    module, _ = fit(0.128, second, tmp_path, ckpt_path=checkpoint)
    bar = second.train_progress_bar
    assert module.cur_nimg == 128 and bar.total == 0.128 and bar.initial == 0.064 and bar.n == 0.128
    assert second.start_nimg == 64
    # Speed counts this process's 64 images only, not the checkpoint's (which would double it).
    assert second.images_per_second == 16
    lines = resumed_log.getvalue().splitlines()
    assert lines[0].startswith("training:") and " 0.064/0.128 kimg [" in lines[0]
    assert " 0.128/0.128 kimg [" in lines[-1] and "img/s=16.0, sec/kimg=62.5, loss=" in lines[-1]
    # Mid-run: 0.112 kimg after 3 of the 4 steps, (128 - 112) images left at 16 img/s.
    assert " 0.112/0.128 kimg [" in lines[-2] and "sec/kimg=62.5" in lines[-2]
    assert "Epoch" not in resumed_log.getvalue() and "it/s" not in resumed_log.getvalue()


def test_piped_output_is_a_bounded_number_of_lines(tmp_path, capsys):
    # 16 steps: Lightning's bar would redraw 16+ times; a log gets the start and the end only.
    fit(0.256, KimgProgressBar(0.256), tmp_path)
    err = capsys.readouterr().err
    bar_lines = [line for line in err.splitlines() if line.startswith("training:")]
    assert "\r" not in err and len(bar_lines) <= 3, err
    assert " 0.256/0.256 kimg [" in bar_lines[-1] and "img/s=" in bar_lines[-1]


def test_on_a_terminal_the_bar_redraws_in_place(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    fit(0.064, KimgProgressBar(0.064, file=screen, tty_interval_s=0), tmp_path)
    out = screen.getvalue()
    assert out.count("\r") >= 4 and out.count("\n") == 1  # redrawn per step, one line left at the end


def test_speed_is_logged_every_log_interval(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    bar = KimgProgressBar(0.064, log_speed=True, file=io.StringIO())
    _, trainer = fit(0.064, bar, tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    assert trainer.callback_metrics["train/images_per_second"].item() == pytest.approx(bar.images_per_second)
    assert trainer.callback_metrics["train/sec_per_kimg"].item() == pytest.approx(bar.sec_per_kimg)
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "train/images_per_second" in header and "train/sec_per_kimg" in header and len(rows) == 1 + 2


def test_rejects_a_non_positive_duration():
    with pytest.raises(ValueError, match="duration_kimg"):
        KimgProgressBar(0)
