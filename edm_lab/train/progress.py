"""Training progress in the paper's units: kimg of the configured duration, img/s, sec/kimg and the ETA.

`KimgProgressBar` replaces Lightning's epoch/it-per-second bar for `task=train`. Its position is the
module's image count (`cur_nimg / 1000`), its total `task.duration_kimg`, so a resumed run starts at
its checkpoint's kimg; speeds and the ETA count only the images trained by this process. On a
terminal it redraws in place; in a log file (SLURM) it writes one line every `log_interval_s`.
"""
from __future__ import annotations

import sys
import time
from typing import Any, NamedTuple, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class ProgressStats(NamedTuple):
    """Training speed; None where nothing has been measured yet."""

    images_per_second: float | None
    sec_per_kimg: float | None
    eta_seconds: float | None


def progress_stats(nimg: int, seconds: float, remaining_nimg: float = 0) -> ProgressStats:
    """Speed of `nimg` images trained in `seconds` (by this process), and the time the `remaining_nimg` need.

    `nimg` excludes a resumed run's earlier images: they were not trained in `seconds`.
    """
    if nimg <= 0 or seconds <= 0:
        return ProgressStats(None, None, None)
    images_per_second = nimg / seconds
    return ProgressStats(images_per_second, 1000 / images_per_second, max(remaining_nimg, 0) / images_per_second)


class _LineWriter:
    """A file for tqdm that ends each redraw with a newline: a log gets one readable line per refresh
    instead of one ever-growing line of carriage returns."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()  # tqdm pads a redraw with spaces to erase the previous one
        if line:
            self.file.write(line + "\n")

    def flush(self) -> None:
        self.file.flush()


def _is_tty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or minimal file object
        return False


class KimgProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting kimg up to `duration_kimg`, with img/s, sec/kimg, loss and the ETA.

    The figures of the last step are kept in `images_per_second`, `sec_per_kimg` and `eta_seconds`
    (None until a step has been trained); with `log_speed` they are also logged every step as
    `train/images_per_second` and `train/sec_per_kimg`, so Lightning writes them every `log_every_n_steps`
    next to `train/loss`. Speeds are averages since this process began training: they include data
    loading, checkpoints and evaluations, which is also what the ETA has to include.
    Validation, test, predict and sanity-check bars are never shown.
    """

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} kimg [{elapsed}<{remaining}{postfix}]"
    LOG_BAR_FORMAT = BAR_FORMAT.replace("{bar}", "{bar:20}")  # lines of a log keep their columns

    def __init__(self, duration_kimg: float, *, log_speed: bool = False, tty_interval_s: float = 0.5,
                 log_interval_s: float = 30.0, file: TextIO | None = None) -> None:
        super().__init__()
        if duration_kimg <= 0:
            raise ValueError(f"duration_kimg must be > 0, got {duration_kimg}")
        self.duration_kimg, self.log_speed = duration_kimg, log_speed
        self.tty_interval_s, self.log_interval_s = tty_interval_s, log_interval_s
        self.file = file  # None: sys.stderr when training starts (pytest and loggers swap it)
        self.images_per_second: float | None = None
        self.sec_per_kimg: float | None = None
        self.eta_seconds: float | None = None
        self.start_nimg, self.nimg = 0, 0
        self._began = self._last_draw = 0.0
        self._interval = log_interval_s

    @property
    def kimg(self) -> float:
        """The module's progress at the last step, in kimg (a resumed run's earlier images included)."""
        return self.nimg / 1000

    def _hidden(self) -> Tqdm:
        return Tqdm(disable=True)

    # Training has no validation, and EvaluateEMA samples without trainer.predict: no other bar is shown.
    def init_sanity_tqdm(self) -> Tqdm:
        return self._hidden()

    def init_validation_tqdm(self) -> Tqdm:
        return self._hidden()

    def init_test_tqdm(self) -> Tqdm:
        return self._hidden()

    def init_predict_tqdm(self) -> Tqdm:
        return self._hidden()

    def init_train_tqdm(self) -> Tqdm:
        """The kimg bar, starting at the module's progress (a resumed run's checkpoint)."""
        file = self.file if self.file is not None else sys.stderr
        tty = _is_tty(file)
        self._interval = self.tty_interval_s if tty else self.log_interval_s
        # `initial` makes tqdm's rate, hence its ETA, count only what this process trains.
        return Tqdm(desc="training", total=self.duration_kimg, initial=self.kimg, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=tty, file=file if tty else _LineWriter(file),
                    smoothing=0, mininterval=self._interval, ascii=None if tty else True,
                    bar_format=self.BAR_FORMAT if tty else self.LOG_BAR_FORMAT)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start_nimg = self.nimg = int(module.cur_nimg)
        self.images_per_second = self.sec_per_kimg = self.eta_seconds = None
        super().on_train_start(trainer, module)
        self._began = self._last_draw = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # the bar spans the whole run: no per-epoch reset, no "Epoch N"

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.nimg = int(module.cur_nimg)
        now = time.perf_counter()
        stats = progress_stats(self.nimg - self.start_nimg, now - self._began,
                               self.duration_kimg * 1000 - self.nimg)
        self.images_per_second, self.sec_per_kimg, self.eta_seconds = stats
        if self.log_speed and stats.images_per_second is not None:
            module.log("train/images_per_second", stats.images_per_second, on_step=True, on_epoch=False)
            module.log("train/sec_per_kimg", stats.sec_per_kimg, on_step=True, on_epoch=False)
        # Redrawn at most every interval: every step would flood a log, and costs time on fast steps.
        # The last step is left to on_train_end, whose close() draws it: a log gets it once.
        last = self.nimg >= self.duration_kimg * 1000 or 0 < trainer.max_steps <= trainer.global_step
        if now - self._last_draw >= self._interval and not last:
            self._draw(trainer)
            self._last_draw = now

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._train_progress_bar is not None:
            self._draw(trainer, refresh=False)  # close() draws the final position, whatever the interval
            self.train_progress_bar.close()

    def _draw(self, trainer: L.Trainer, refresh: bool = True) -> None:
        bar = self._train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = self.kimg  # from the image count each time: no float drift, and 0.128 prints as 0.128
        bar.set_postfix_str(self.postfix(trainer), refresh=False)
        if refresh:
            bar.refresh()

    def postfix(self, trainer: L.Trainer) -> str:
        """The figures after the bar: img/s, sec/kimg and the logged training loss."""
        def fmt(value: float | None, spec: str) -> str:
            return "?" if value is None else format(value, spec)

        parts = [f"img/s={fmt(self.images_per_second, '.1f')}", f"sec/kimg={fmt(self.sec_per_kimg, '.3g')}"]
        loss = trainer.progress_bar_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss={float(loss):.4g}")
        return ", ".join(parts)
