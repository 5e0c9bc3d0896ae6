"""Atomic files and a compute-once disk cache, safe for parallel jobs and interrupted runs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch
from filelock import FileLock

T = TypeVar("T")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save through `atomic_write` (tensors and plain containers only, loadable weights_only)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cached(path: str | Path, compute: Callable[[], T]) -> T:
    """Load `path` (weights_only) if present, else compute, store atomically and return.

    A file lock makes parallel jobs compute it once; an unreadable file is an error naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - re-raised with the file named
                raise RuntimeError(f"cache file {path} is unreadable ({exc}); delete it to recompute") from exc
        value = compute()
        atomic_torch_save(value, path)
        return value
