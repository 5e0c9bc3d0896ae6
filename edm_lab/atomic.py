"""Atomic files and a compute-once disk cache, safe for parallel jobs and interrupted runs.

Every file this project writes for others to read (result rows, reports, caches) goes
through `atomic_write_bytes`: a same-directory temp file, fsync, then os.replace, so a crash
leaves the previous file (or none), never a truncated one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")
TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; results are shared between users, so honour the umask instead.
_FILE_MODE = 0o666 & ~current_umask()


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the block completes (temp beside it, fsync, rename).

    Streams, so large outputs (a dataset zip) need not fit in memory; on any exception,
    KeyboardInterrupt included, the temp file is removed and `path` is left as it was.
    `durable=False` skips the fsyncs: the rename alone still shows whole files or none to readers,
    but a power loss may lose recent ones -- the price for tens of thousands of exported images.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w+b") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), _FILE_MODE)
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save streamed through `atomic_file` (keep to tensors and plain containers: weights_only loads)."""
    with atomic_file(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def cached(path: str | Path, compute: Callable[[], T]) -> T:
    """Load `path` (weights_only) if present, else compute, store atomically and return it.

    A file lock makes parallel jobs compute it once; an unreadable file is an error naming it.
    """
    from filelock import FileLock

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
