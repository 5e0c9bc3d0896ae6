"""Tests for edm_lab.track.store: atomic, concurrent-safe one-file-per-row results."""
from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from edm_lab.atomic import atomic_write_text
from edm_lab.track.store import ResultsStore, config_hash


def make_row(h: str = "3f2a9c1b7d0e", steps: int = 18, **extra) -> dict:
    row = {
        "config_hash": h, "label": "solver=heun schedule=edm", "sweep": "2026-11-23_10-00-00",
        "solver": "heun", "rho": 7.0, "S_churn": 0.0, "S_max": math.inf, "sigma_max": 80.0,
        "num_steps": steps, "nfe": 2 * steps - 1, "fd_classifier": 1.23, "sampler_rmse": 0.0042,
        "seed": 0, "git_commit": "abc1234",
    }
    row.update(extra)
    return row


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- config_hash ---------------------------------------------------------------------------------

def test_config_hash_stable_under_key_order() -> None:
    a = {"solver": "heun", "schedule": {"rho": 7.0, "sigma_max": 80.0}, "steps": [1, 2]}
    b = {"steps": [1, 2], "schedule": {"sigma_max": 80.0, "rho": 7.0}, "solver": "heun"}
    assert config_hash(a) == config_hash(b)
    h = config_hash(a)
    assert len(h) == 12 and all(c in "0123456789abcdef" for c in h)
    # Deterministic across calls (and processes: no reliance on hash randomisation).
    assert config_hash(dict(a)) == h


def test_config_hash_changes_with_values() -> None:
    a = {"solver": "heun", "schedule": {"rho": 7.0}}
    assert config_hash(a) != config_hash({"solver": "euler", "schedule": {"rho": 7.0}})
    assert config_hash(a) != config_hash({"solver": "heun", "schedule": {"rho": 3.0}})
    assert config_hash(a) != config_hash({"solver": "heun", "schedule": {"rho": 7.0}, "x": 1})


def test_config_hash_handles_inf_and_non_json() -> None:
    assert config_hash({"S_max": math.inf}) != config_hash({"S_max": 80.0})
    assert config_hash({"p": Path("a/b")}) == config_hash({"p": Path("a/b")})


# -- round trip ----------------------------------------------------------------------------------

def test_round_trip_including_inf_and_nan(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    row = make_row(fid=math.nan, fd_raw=-math.inf, extra_unknown="kept")
    path = store.write(row)
    assert path == tmp_path / "rows" / "3f2a9c1b7d0e" / "steps-18.json"
    back = store.get("3f2a9c1b7d0e", 18)
    assert back is not None
    assert back["S_max"] == math.inf
    assert back["fd_raw"] == -math.inf
    assert math.isnan(back["fid"])
    assert back["extra_unknown"] == "kept"
    # A row without `repeat` is repeat 0, and reads back saying so.
    assert {k: v for k, v in back.items() if k != "fid"} == {**{k: v for k, v in row.items() if k != "fid"}, "repeat": 0}
    frame = store.load()
    assert len(frame) == 1
    assert frame.loc[0, "S_max"] == math.inf and math.isnan(frame.loc[0, "fid"])


def test_numpy_scalars_are_stored_as_numbers(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    store = ResultsStore(tmp_path)
    store.write(make_row(steps=np.int64(5), nfe=np.int64(9), fid=np.float32(2.5)))
    back = store.get("3f2a9c1b7d0e", 5)
    assert back["num_steps"] == 5 and back["nfe"] == 9 and back["fid"] == 2.5


def test_overwrite_replaces_row(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(make_row(fid=2.0))
    store.write(make_row(fid=1.0))
    assert store.get("3f2a9c1b7d0e", 18)["fid"] == 1.0
    assert len(store.rows()) == 1


def test_has_and_get(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    assert not store.has("aaaaaaaaaaaa", 18)
    assert store.get("aaaaaaaaaaaa", 18) is None
    store.write(make_row("aaaaaaaaaaaa", 18))
    assert store.has("aaaaaaaaaaaa", 18)
    assert not store.has("aaaaaaaaaaaa", 19)
    assert not store.has("bbbbbbbbbbbb", 18)
    assert store.get("aaaaaaaaaaaa", 18)["num_steps"] == 18


@pytest.mark.parametrize("missing", ["config_hash", "num_steps"])
def test_write_requires_keys(tmp_path: Path, missing: str) -> None:
    row = make_row()
    del row[missing]
    with pytest.raises(ValueError, match=missing):
        ResultsStore(tmp_path).write(row)
    assert all_files(tmp_path) == []


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", ""])
def test_unsafe_hash_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="config_hash"):
        ResultsStore(tmp_path).write(make_row(bad))


def test_non_integer_steps_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        ResultsStore(tmp_path).write(make_row(num_steps="many"))
    with pytest.raises(ValueError, match="num_steps"):
        ResultsStore(tmp_path).write(make_row(num_steps=2.5))


def test_unserialisable_value_leaves_no_file(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    with pytest.raises(TypeError):
        store.write(make_row(bad=object()))
    assert all_files(tmp_path) == []


# -- atomicity -----------------------------------------------------------------------------------

def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    for h in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        for steps in (4, 8, 18):
            store.write(make_row(h, steps))
    files = all_files(tmp_path)
    assert len(files) == 6
    assert all(f.name.startswith("steps-") and f.suffix == ".json" for f in files)
    assert not any(f.name.endswith(".tmp") or f.name.startswith(".") for f in files)


def test_failed_write_keeps_previous_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultsStore(tmp_path)
    store.write(make_row(fid=1.5))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write(make_row(fid=9.9))
    monkeypatch.undo()
    assert store.get("3f2a9c1b7d0e", 18)["fid"] == 1.5
    assert len(all_files(tmp_path)) == 1  # the temp file was cleaned up


def test_killed_writer_temp_file_does_not_corrupt_load(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(make_row(steps=18, fid=3.0))
    # What a process killed between mkstemp and os.replace leaves behind: a partial temp file.
    full = json.dumps(make_row(steps=18, fid=99.0))
    row_dir = store.path("3f2a9c1b7d0e", 18).parent
    (row_dir / ".steps-18.json.k1ll3d.tmp").write_text(full[: len(full) // 2])
    (row_dir / ".steps-32.json.k1ll3d.tmp").write_text(full[:10])
    frame = store.load()
    assert len(frame) == 1 and frame.loc[0, "fid"] == 3.0
    assert len(store.rows()) == 1
    assert not store.has("3f2a9c1b7d0e", 32)


def test_truncated_or_garbage_row_is_skipped_with_warning(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(make_row("aaaaaaaaaaaa", 4))
    good = store.write(make_row("aaaaaaaaaaaa", 8))
    text = good.read_text()
    bad = store.path("bbbbbbbbbbbb", 4)
    bad.parent.mkdir(parents=True)
    bad.write_text(text[: len(text) // 2])  # truncated
    store.path("bbbbbbbbbbbb", 8).write_bytes(b"\x00\xff garbage")  # not even UTF-8
    store.path("bbbbbbbbbbbb", 16).write_text("[1, 2, 3]")  # valid JSON, not a row
    with pytest.warns(RuntimeWarning, match="bbbbbbbbbbbb") as record:
        frame = store.load()
    assert len(record) == 3
    assert sorted(frame["num_steps"]) == [4, 8]
    assert set(frame["config_hash"]) == {"aaaaaaaaaaaa"}
    with pytest.warns(RuntimeWarning):
        assert store.get("bbbbbbbbbbbb", 4) is None


def test_empty_store(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "does-not-exist-yet")
    assert store.rows() == []
    frame = store.load()
    assert isinstance(frame, pd.DataFrame) and frame.empty


def test_load_unions_columns_and_orders_rows(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(make_row("bbbbbbbbbbbb", 8, fid=2.0))
    store.write(make_row("aaaaaaaaaaaa", 32))
    store.write(make_row("aaaaaaaaaaaa", 4, fd_raw=5.0))
    frame = store.load()
    assert list(zip(frame["config_hash"], frame["num_steps"])) == [
        ("aaaaaaaaaaaa", 4), ("aaaaaaaaaaaa", 32), ("bbbbbbbbbbbb", 8)]
    assert {"fid", "fd_raw"} <= set(frame.columns)
    assert frame["fid"].isna().sum() == 2


def test_repeats_are_separate_rows_and_old_rows_are_repeat_zero(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    # A row of a store written before repeats existed: same file name as repeat 0, no `repeat` key.
    old = store.write(make_row(steps=4, fid=3.0))
    assert old.name == "steps-4.json"
    assert store.write(make_row(steps=4, fid=2.0, repeat=2)).name == "steps-4-r2.json"
    assert store.write(make_row(steps=32, fid=1.0, repeat=1)).name == "steps-32-r1.json"
    assert store.get("3f2a9c1b7d0e", 4)["fid"] == 3.0 and store.get("3f2a9c1b7d0e", 4, 0)["repeat"] == 0
    assert store.get("3f2a9c1b7d0e", 4, 2)["fid"] == 2.0
    assert not store.has("3f2a9c1b7d0e", 4, 1) and store.has("3f2a9c1b7d0e", 32, 1)
    frame = store.load()
    assert list(zip(frame["num_steps"], frame["repeat"], frame["fid"])) == [(4, 0, 3.0), (4, 2, 2.0), (32, 1, 1.0)]
    # Writing repeat 0 explicitly replaces the old row rather than adding one.
    store.write(make_row(steps=4, fid=5.0, repeat=0))
    assert len(store.rows()) == 3 and store.get("3f2a9c1b7d0e", 4)["fid"] == 5.0


@pytest.mark.parametrize("bad", [-1, 1.5, "two", True])
def test_bad_repeat_rejected(tmp_path: Path, bad) -> None:
    with pytest.raises(ValueError, match="repeat"):
        ResultsStore(tmp_path).write(make_row(repeat=bad))
    assert all_files(tmp_path) == []


def test_atomic_write_text_helper(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    atomic_write_text(target, "hello\n")
    atomic_write_text(target, "world\n")
    assert target.read_text() == "world\n"
    assert all_files(tmp_path) == [target]


# -- concurrency ---------------------------------------------------------------------------------

def _writer(root: str, worker: int, n: int, shared_keys: bool) -> None:
    store = ResultsStore(root)
    for i in range(n):
        h = "shared000000" if shared_keys else f"w{worker}{i:010d}"[:12]
        store.write(make_row(h, steps=i if shared_keys else 18, worker=worker, payload="x" * 2000))


def _run_writers(root: Path, shared_keys: bool) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(root), w, 50, shared_keys)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_concurrent_writers_distinct_rows(tmp_path: Path) -> None:
    _run_writers(tmp_path, shared_keys=False)
    store = ResultsStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any unreadable row would fail the test
        frame = store.load()
    assert len(frame) == 200
    assert frame["config_hash"].nunique() == 200
    assert frame.groupby("worker").size().to_dict() == {0: 50, 1: 50, 2: 50, 3: 50}
    assert not any(f.name.endswith(".tmp") for f in all_files(tmp_path))


def test_concurrent_writers_same_rows(tmp_path: Path) -> None:
    # All four processes race on the same 50 files: every file must end up one writer's complete row.
    _run_writers(tmp_path, shared_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = ResultsStore(tmp_path).load()
    assert len(frame) == 50
    assert sorted(frame["num_steps"]) == list(range(50))
    assert set(frame["worker"]) <= {0, 1, 2, 3}
    assert (frame["payload"].str.len() == 2000).all()
    assert not any(f.name.endswith(".tmp") for f in all_files(tmp_path))


# -- a store that checks what it reads -------------------------------------------------------------

@pytest.mark.parametrize("missing", ["nfe", "label"])
def test_write_requires_every_key_a_reader_requires(tmp_path: Path, missing: str) -> None:
    row = make_row()
    del row[missing]
    with pytest.raises(ValueError, match=missing):
        ResultsStore(tmp_path).write(row)


@pytest.mark.parametrize("content,reason", [
    ("{}", "missing required keys"),
    ('{"a": 1}', "missing required keys"),
    ('{"config_hash": "3f2a9c1b7d0e", "num_steps": "18", "nfe": 35, "label": "x"}', "num_steps='18' is not a int"),
    ("[1, 2]", "not a JSON object"),
])
def test_unusable_row_is_moved_aside_and_reported_missing(tmp_path: Path, content: str, reason: str) -> None:
    store = ResultsStore(tmp_path)
    path = store.path("3f2a9c1b7d0e", 18)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="skipping result row .*steps-18.json: " + reason):
        assert store.rows() == []  # the report's reader: skipped, left in place
    assert path.exists()
    with pytest.warns(RuntimeWarning, match=f"{path}.*{reason}.*moved to steps-18.json.rejected-"):
        assert store.get("3f2a9c1b7d0e", 18) is None
    (aside,) = path.parent.glob("steps-18.json.rejected-*")
    assert aside.read_text() == content and not path.exists()  # kept for inspection, never deleted
    store.write(make_row(fid=1.0))  # the recomputed point
    assert store.get("3f2a9c1b7d0e", 18)["fid"] == 1.0 and len(store.rows()) == 1


def test_row_copied_from_another_configuration_is_not_used(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    source = store.write(make_row("aaaaaaaaaaaa", 18, fid=1.0))
    copy = store.path("bbbbbbbbbbbb", 18)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(source.read_bytes())
    wrong_steps = store.path("aaaaaaaaaaaa", 9)
    wrong_steps.write_bytes(source.read_bytes())
    wrong_repeat = store.path("aaaaaaaaaaaa", 18, repeat=2)
    wrong_repeat.write_bytes(source.read_bytes())
    with pytest.warns(RuntimeWarning) as record:
        rows = store.rows()
    assert [(r["config_hash"], r["num_steps"], r["repeat"]) for r in rows] == [("aaaaaaaaaaaa", 18, 0)]
    assert sorted(Path(str(w.message).split(": ")[0].split()[-1]).name for w in record) == \
        ["steps-18-r2.json", "steps-18.json", "steps-9.json"]
    assert all("copied from elsewhere" in str(w.message) for w in record)
    with pytest.warns(RuntimeWarning, match="bbbbbbbbbbbb"):
        assert store.get("bbbbbbbbbbbb", 18) is None


def test_report_ignores_unusable_rows(tmp_path: Path) -> None:
    from edm_lab.report.report import write_report

    store = ResultsStore(tmp_path / "results")
    store.write(make_row("aaaaaaaaaaaa", 4))
    store.write(make_row("aaaaaaaaaaaa", 8))
    junk = store.path("cccccccccccc", 4)
    junk.parent.mkdir(parents=True)
    junk.write_text('{"a": 1}')
    with pytest.warns(RuntimeWarning, match="cccccccccccc"):
        write_report(store.load(), tmp_path / "reports")
    frame = pd.read_csv(tmp_path / "reports" / "results.csv")
    assert len(frame) == 2 and set(frame["config_hash"]) == {"aaaaaaaaaaaa"} and "a" not in frame.columns


def test_stale_temp_files_of_killed_writers_are_removed_but_not_live_ones(tmp_path: Path) -> None:
    from edm_lab.atomic import atomic_file

    store = ResultsStore(tmp_path)
    store.write(make_row(steps=4))
    row_dir = store.path("3f2a9c1b7d0e", 4).parent
    # A writer killed with SIGKILL mid-write: its temp file stays, with nobody holding its lock.
    code = ("import os, sys; from edm_lab.atomic import atomic_file\n"
            f"with atomic_file({str(row_dir / 'steps-9.json')!r}) as fh:\n"
            "    fh.write(b'{\"half'); fh.flush(); os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9
    (dead,) = row_dir.glob(".steps-9.json.*.tmp")
    assert store.remove_stale_temp_files() == []  # too young: its writer may not have locked it yet
    old = time.time() - 60
    os.utime(dead, (old, old))
    with atomic_file(row_dir / "steps-18.json") as fh:  # a live writer, mid-write
        fh.write(b"{")
        (live,) = [p for p in row_dir.glob(".steps-18.json.*.tmp")]
        os.utime(live, (old, old))
        assert store.remove_stale_temp_files() == [dead]
        assert live.exists() and not dead.exists()
    assert sorted(p.name for p in row_dir.iterdir()) == ["steps-18.json", "steps-4.json"]


def test_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultsStore(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        store.write(make_row(steps=4))
    path = store.path("3f2a9c1b7d0e", 4)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in str(info.value) and not any(path.parent.iterdir())


def test_rows_are_strict_json(tmp_path: Path) -> None:
    """Non-finite numbers are spelled "NaN"/"Infinity" so that any JSON parser reads a row; they read back as floats."""
    store = ResultsStore(tmp_path)
    path = store.write(make_row(fid=math.nan, fd_raw=-math.inf, nested=[math.inf, 1.0]))

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert (raw["S_max"], raw["fid"], raw["fd_raw"], raw["nested"]) == ("Infinity", "NaN", "-Infinity", ["Infinity", 1.0])
    back = store.get("3f2a9c1b7d0e", 18)
    assert back["S_max"] == math.inf and math.isnan(back["fid"]) and back["nested"] == [math.inf, 1.0]
    # Rows written before, with bare Infinity/NaN, still read.
    path.write_text(path.read_text().replace('"Infinity"', "Infinity"))
    assert store.get("3f2a9c1b7d0e", 18)["S_max"] == math.inf
