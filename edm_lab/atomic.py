"""Atomic files and a compute-once disk cache, safe for parallel jobs and interrupted runs.

Every file this project writes for others to read (result rows, reports, caches) goes
through `atomic_write_bytes`: a same-directory temp file, fsync, then os.replace, so a crash
leaves the previous file (or none), never a truncated one. A writer holds an advisory lock on
its temp file, so `remove_stale_temp_files` can tell the leftovers of killed writers from files
being written. Write errors name the file. torch is imported only where tensors are saved.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then recognised by age alone
    fcntl = None

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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "w+b") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when this process closes it or dies
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), _FILE_MODE)
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # Errors of writes to the file carry no file name (a full disk, a quota): name it.
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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


STALE_AFTER_SECONDS = 10.0  # a temp file younger than this may belong to a writer that has not locked it yet


def remove_stale_temp_files(directory: str | Path, min_age: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Delete the temp files `atomic_file` left in `directory` when its writer died; returns them.

    A temp file is stale when no process holds its lock (and, without file locks, when it is an
    hour old); live writers' files are never touched.
    """
    removed = []
    now = time.time()
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        try:
            age = now - tmp.stat().st_mtime
            if age < (min_age if fcntl is not None else max(min_age, 3600.0)):
                continue
            with open(tmp, "rb") as fh:
                if fcntl is not None:
                    try:
                        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its writer is alive
                tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            continue  # its writer finished (renamed it) meanwhile
    return removed


def probe_writable(directory: str | Path) -> None:
    """Create `directory` if needed and write and delete a small file there; an OSError names the folder."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=TMP_PREFIX + "probe.", suffix=TMP_SUFFIX) as fh:
            fh.write(b"probe")
            fh.flush()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(directory)) from exc


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save streamed through `atomic_file` (keep to tensors and plain containers: weights_only loads)."""
    import torch

    with atomic_file(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def cached(path: str | Path, compute: Callable[[], T]) -> T:
    """Load `path` (weights_only) if present, else compute, store atomically and return it.

    A file lock makes parallel jobs compute it once; an unreadable file is an error naming it.
    """
    import torch
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
