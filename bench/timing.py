"""Timing shared by the bench scripts: untimed warm-up runs, then torch.utils.benchmark's adaptive autorange.

The first calls of a function pay for one-time work (CUDA context and cuDNN autotuning, allocator
growth, lazy imports and kernel compilation): timed alone they overstate the steady cost many times
over. `measure` runs the function `warmup` times first, reports that cost apart, and times the rest
with `torch.utils.benchmark.Timer`, which synchronises the accelerator around every timed block and
keeps repeating blocks of calls until there are at least 4 and their interquartile range is within
10% of the median, or until `max_time` seconds have been spent.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: `median` and `iqr` over the timed runs; `first_call` the first warm-up run."""

    median: float
    iqr: float
    runs: int
    first_call: float | None
    result: Any  # what the last warm-up call returned (the timer discards the timed calls' results)
    measurement: benchmark.Measurement

    def __str__(self) -> str:
        scale, unit = time_unit(self.median)
        text = f"{self.median / scale:8.3f} {unit:2s} (IQR {self.iqr / scale:.3f} {unit}, {self.runs:3d} runs)"
        if self.first_call is not None:
            first_scale, first_unit = time_unit(self.first_call)
            text += f"  first call {self.first_call / first_scale:.3f} {first_unit}"
        return text


def time_unit(value: float) -> tuple[float, str]:
    """(scale, unit) printing `value` seconds as a number of at least 1: s, ms or us."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        if abs(value) >= scale:
            return scale, unit
    return 1e-6, "us"


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued work of `device` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure(fn: Callable[[], Any], device: str | torch.device, *, warmup: int = 1, max_time: float = 10.0,
            label: str = "") -> Timing:
    """Time `fn()` on `device`: `warmup` untimed calls, then `Timer.adaptive_autorange` for up to `max_time` s."""
    if warmup < 1:
        # The autorange's own block-size estimate would then absorb the cold call unseen: keep it visible.
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    result, first_call = None, None
    for index in range(warmup):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        if index == 0:
            first_call = time.perf_counter() - start
    # num_threads: the Timer's default of 1 would time a single-threaded CPU run, not the one we use.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads())
    # The timer reads a max_run_time of 0 as "no limit": the smallest positive one stops after the first block.
    measurement = timer.adaptive_autorange(max_run_time=max(max_time, 1e-9))
    return Timing(median=measurement.median, iqr=measurement.iqr,
                  runs=len(measurement.times) * measurement.number_per_run, first_call=first_call, result=result,
                  measurement=measurement)


def add_timing_arguments(parser: argparse.ArgumentParser, max_time: float = 10.0) -> None:
    """The bench scripts' shared options: --warmup and --max-time."""
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the measurement (>= 1)")
    parser.add_argument("--max-time", type=float, default=max_time,
                        help="seconds of timed runs per configuration at most (the timer stops earlier once the "
                             "IQR is within 10%% of the median and 4 blocks are done; 0: a single timed block)")
