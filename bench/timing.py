"""Wall-clock timing shared by the bench scripts."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def best_time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    """(fastest of `repeats` runs in seconds, the last result), synchronising CUDA around each run."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result
