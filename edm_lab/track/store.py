"""A results store: one JSON file per (configuration, num_steps, repeat) evaluation.

Layout: ``root/rows/<config_hash>/steps-<num_steps>.json`` for repeat 0 (the layout of stores
written before repeats existed, whose rows count as repeat 0) and
``root/rows/<config_hash>/steps-<num_steps>-r<repeat>.json`` for repeats 1, 2, ... Every file is written atomically
(temp file in the same directory, fsync, ``os.replace``), so several processes of a parallel
launcher can write into one store at once and an interrupted run never leaves a half-written
row behind: a reader sees either the previous complete file or the new complete file.

A row is used only if it is a JSON object with the required keys (`REQUIRED`) and its
`config_hash`, `num_steps` and `repeat` match its path: a row copied into another configuration's
folder, or a hand-edited `{}`, is never reused or reported. `get` moves such a file aside
(`<name>.rejected-<time>`, kept for inspection) so its point is recomputed; `rows` skips it. Both
warn, naming the file. Temp files left by killed writers are removed by `remove_stale_temp_files`.

Deliberately free of hydra/lightning/wandb (and torch) so reports can be rebuilt from a bare checkout.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from edm_lab.atomic import atomic_write_text, remove_stale_temp_files

if TYPE_CHECKING:  # pandas is only needed by `load`; keep worker imports cheap.
    import pandas

__all__ = ["config_hash", "ResultsStore", "MANIFEST", "row_key", "write_manifest", "read_manifests"]

MANIFEST = "rows.json"  # in a job's output folder: the keys of the rows it computed or reused

# Temp files start with "." and end with ".tmp": they can never match the row glob below.
_ROW_GLOB = "steps-*.json"
_ROW_NAME = re.compile(r"^steps-(-?\d+)(?:-r(\d+))?\.json$")
# A hash becomes a directory name: refuse anything that could escape the store or hide.
_SAFE_HASH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
# What every row must hold to be used, with its type (repeat is optional: old rows are repeat 0). A
# fixed-step solver's nfe is an int, an adaptive one's the mean over the samples of their own NFE.
REQUIRED: dict[str, type] = {"config_hash": str, "num_steps": int, "nfe": numbers.Real, "label": str}


def _plain(obj: Any) -> Any:
    """Nested Mappings/sequences -> dicts/lists, so DictConfig and dict hash alike."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_hash(config: Mapping) -> str:
    """Stable 12-hex-digit sha256 of a nested mapping (key order does not matter)."""
    text = json.dumps(_plain(config), sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# Strict JSON has no NaN or infinity: rows spell them as these strings, and reading turns them back.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value: Any) -> Any:
    """A row value as strict JSON holds it: numpy/torch scalars as Python numbers, non-finite floats as strings."""
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several elements: refused below
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Path):
        return str(value)
    return value


def _decode(value: Any) -> Any:
    """The inverse of `_encode` for what JSON gives back (also reads rows written with bare NaN/Infinity)."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _unserialisable(obj: Any) -> Any:
    raise TypeError(f"result row value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _steps_key(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"num_steps must be an integer, got {value!r}")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_steps must be an integer, got {value!r}") from None
    if isinstance(value, float) and (not math.isfinite(value) or value != as_int):
        raise ValueError(f"num_steps must be an integer, got {value!r}")
    return as_int


def _repeat_key(value: Any) -> int:
    try:
        as_int = _steps_key(value)
    except ValueError:
        as_int = -1
    if as_int < 0:
        raise ValueError(f"repeat must be an integer >= 0, got {value!r}")
    return as_int


def _hash_key(value: Any) -> str:
    if not isinstance(value, str) or not _SAFE_HASH.match(value):
        raise ValueError(f"config_hash must be a plain name such as '3f2a9c1b7d0e', got {value!r}")
    return value


class ResultsStore:
    """A directory of one atomically written JSON file per result row."""

    def __init__(self, root: str | Path) -> None:
        """Open (lazily create) the store rooted at ``root``."""
        self.root = Path(root)
        self.rows_dir = self.root / "rows"

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    def path(self, config_hash: str, num_steps: int, repeat: int = 0) -> Path:
        """The file that holds the row of (config_hash, num_steps, repeat)."""
        repeat = _repeat_key(repeat)
        suffix = f"-r{repeat}" if repeat else ""  # repeat 0 keeps the pre-repeat name
        return self.rows_dir / _hash_key(config_hash) / f"steps-{_steps_key(num_steps)}{suffix}.json"

    @staticmethod
    def _problem(row: Any, config_hash: str, num_steps: int, repeat: int) -> str | None:
        """Why `row`, read from the file of (config_hash, num_steps, repeat), cannot be used (None: it can)."""
        if not isinstance(row, dict):
            return "not a JSON object"
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            return f"missing required keys {missing}"
        for key, kind in REQUIRED.items():
            if not isinstance(row[key], kind) or isinstance(row[key], bool):
                return f"{key}={row[key]!r} is not a {kind.__name__}"
        found = (row["config_hash"], row["num_steps"], row.get("repeat", 0))
        if found != (config_hash, num_steps, repeat):
            return (f"it holds config_hash={found[0]}, num_steps={found[1]}, repeat={found[2]!r} but its path says "
                    f"{config_hash}, {num_steps}, {repeat} (copied from elsewhere?)")
        return None

    def _read(self, path: Path, config_hash: str, num_steps: int, repeat: int) -> tuple[dict | None, str | None]:
        """(row, None) for a usable row, (None, reason) for an unusable file, (None, None) for none."""
        try:
            row = _decode(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return None, f"unreadable ({exc})"
        problem = self._problem(row, config_hash, num_steps, repeat)
        if problem:
            return None, problem
        row.setdefault("repeat", repeat)  # rows written before repeats existed are repeat 0
        return row, None

    def get(self, config_hash: str, num_steps: int, repeat: int = 0) -> dict | None:
        """The stored row (its `repeat` always set), or None if absent or unusable.

        An unusable file is moved aside (never deleted) with a warning naming it, so the point is
        recomputed and the file can still be inspected.
        """
        path = self.path(config_hash, num_steps, repeat)
        row, problem = self._read(path, config_hash, _steps_key(num_steps), _repeat_key(repeat))
        if problem:
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = path.with_name(f"{path.name}.rejected-{stamp}")
            try:
                os.replace(path, aside)
                where = f"moved to {aside.name}"
            except OSError as exc:
                where = f"left in place ({exc.strerror})"
            warnings.warn(f"result row {path} is not usable: {problem}; {where}, the point will be recomputed",
                          RuntimeWarning, stacklevel=2)
        return row

    def has(self, config_hash: str, num_steps: int, repeat: int = 0) -> bool:
        """Whether a usable row exists (an unusable file counts as missing, and is moved aside)."""
        return self.get(config_hash, num_steps, repeat) is not None

    def write(self, row: Mapping) -> Path:
        """Validate and atomically write one row; returns its path (overwrites an older row).

        The row's `repeat` (default 0) is part of its key: each repeat of a point is its own file.
        """
        for key in REQUIRED:
            if key not in row:
                raise ValueError(f"result row is missing required key {key!r}")
        path = self.path(row["config_hash"], row["num_steps"], row.get("repeat", 0))
        text = json.dumps(_encode(dict(row)), indent=1, allow_nan=False, default=_unserialisable)
        return atomic_write_text(path, text + "\n")

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temp files of writers that died mid-write (never a live writer's); returns them."""
        if not self.rows_dir.is_dir():
            return []
        return [p for folder in self.rows_dir.iterdir() if folder.is_dir() for p in remove_stale_temp_files(folder)]

    def _row_paths(self) -> list[tuple[str, int, int, Path]]:
        if not self.rows_dir.is_dir():
            return []
        found = []
        for path in self.rows_dir.glob(f"*/{_ROW_GLOB}"):
            match = _ROW_NAME.match(path.name)
            if match and path.is_file():
                found.append((path.parent.name, int(match.group(1)), int(match.group(2) or 0), path))
        found.sort(key=lambda t: t[:3])
        return found

    def rows(self) -> list[dict]:
        """All usable rows, ordered by (config_hash, num_steps, repeat); other files are warned about and skipped."""
        out = []
        for config_hash, num_steps, repeat, path in self._row_paths():
            row, problem = self._read(path, config_hash, num_steps, repeat)
            if problem:
                warnings.warn(f"skipping result row {path}: {problem}", RuntimeWarning, stacklevel=2)
            elif row is not None:
                out.append(row)
        return out

    def load(self) -> "pandas.DataFrame":
        """All readable rows as a DataFrame (empty DataFrame for an empty store)."""
        import pandas as pd

        rows = self.rows()
        if not rows:
            return pd.DataFrame()
        return pd.DataFrame.from_records(rows)


RowKey = tuple[str, int, int]


def row_key(row: Mapping) -> RowKey:
    """(config_hash, num_steps, repeat): what identifies a row in the store."""
    return str(row["config_hash"]), _steps_key(row["num_steps"]), _repeat_key(row.get("repeat", 0))


def write_manifest(folder: str | Path, rows: list[Mapping], keep: bool = False) -> Path:
    """Record in a job's output folder which rows it computed or reused, so its report can find them
    (a reused row keeps the sweep that first computed it); `keep`: add to the rows recorded there (a
    resumed training run continuing in its folder)."""
    keys = {row_key(r) for r in rows}
    if keep:
        keys |= read_manifests(Path(folder) / MANIFEST) if (Path(folder) / MANIFEST).is_file() else set()
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps(sorted(keys)) + "\n")


def read_manifests(folder: str | Path) -> set[RowKey]:
    """The row keys of every job manifest under `folder` (a run's folder, or a sweep's with its jobs), or of one
    manifest file."""
    keys: set[RowKey] = set()
    folder = Path(folder)
    for path in [folder] if folder.is_file() else sorted(folder.rglob(MANIFEST)):
        try:
            keys.update((str(h), int(n), int(r)) for h, n, r in json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            warnings.warn(f"skipping unreadable row manifest {path}: {exc}", RuntimeWarning, stacklevel=2)
    return keys
