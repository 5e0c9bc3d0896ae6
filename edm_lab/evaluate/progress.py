"""One progress bar per sampling job, over all of its points, with an ETA.

A job runs Lightning `predict` once per point (and once per reference solution); Lightning's own bar
would start afresh at each, with no ETA for the job. This one counts the job's denoiser evaluations
(samples x NFE of each batch), planned from the config before the first batch, and says what it is
computing: "reference solution (RK45, tolerance 1e-05)" or "point 3/7 (steps=4)". A reference solution is
planned when it starts (a cached one costs nothing); an adaptive solver's planned NFE is a bound, so
its bar may end early.

On a terminal it is a tqdm bar. Written to a file or a pipe (a cluster job's log) a redrawn bar is
only noise, so there is no bar: `eta()` gives the job's progress and ETA for the point lines instead.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class SamplingProgress(ProgressBar):
    """The job's progress (rank 0 only). `plan` adds work, `begin` names a phase and its evaluations per
    sample, `eta` says how far the job is, `close` ends the bar.

    `bar`: draw a tqdm bar (default: when `file`, default stderr, is a terminal).
    """

    def __init__(self, description: str = "sampling", bar: bool | None = None, file: IO[str] | None = None) -> None:
        super().__init__()
        self.description = description
        self.file = file if file is not None else sys.stderr
        self.draw = self.file.isatty() if bar is None else bar
        self.total = self.done = 0.0
        self.per_sample = 1.0
        self.started: float | None = None
        self.bar: tqdm | None = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def plan(self, evaluations: float) -> None:
        """Add `evaluations` denoiser evaluations to the job's total."""
        self.total += float(evaluations)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def begin(self, phase: str, evaluations_per_sample: float) -> None:
        """Start a phase: what the bar says it computes, and what one sample of it costs."""
        self.per_sample = float(evaluations_per_sample)
        if self.started is None:
            self.started = time.perf_counter()
        if not (self._enabled and self.draw):
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.description, unit="eval", leave=True, dynamic_ncols=True,
                            file=self.file, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self.bar.set_postfix_str(phase, refresh=True)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        # Every rank samples batches of this size: rank 0's count stands for all of them.
        step = len(batch) * self.per_sample * trainer.world_size
        self.done += step
        if self.bar is not None and self._enabled:
            self.bar.update(step)

    def eta(self) -> str:
        """The job's progress and its time left at the rate so far: `"43%, ETA 1:12"` ('' before any work)."""
        if self.started is None or not self.total or not self.done:
            return ""
        fraction = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.started
        return f"{100 * fraction:.0f}%, ETA {_clock(elapsed * (1 - fraction) / fraction)}"

    def close(self) -> None:
        """End the bar (it stays on screen with its total time)."""
        if self.bar is not None:
            self.bar.set_postfix_str("done", refresh=False)
            self.bar.n = self.bar.total  # planned evaluations are estimates (an adaptive solver's NFE)
            self.bar.close()
            self.bar = None
