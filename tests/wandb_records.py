"""Read a W&B offline run file (`run-<id>.wandb`) into its protobuf records, for assertions.

The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks with a
7-byte header each (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32768


def records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of the run file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: too small for a chunk header
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            payload = pending + chunk
        else:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def finished_records(path: str | Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run file's records once W&B has written its closing `exit` record: `run.finish()` can return
    (offline, silent) before W&B's service has flushed the file, which a reader must wait for."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def summarize(path: str | Path) -> dict:
    """History rows, metric definitions, run group/name and config keys of one finished run file."""
    out = {"history": [], "metrics": {}, "group": None, "name": None, "config": {}}
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "metric" and (rec.metric.name or rec.metric.glob_name):
            out["metrics"][rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == "run":
            out["group"], out["name"] = rec.run.run_group, rec.run.display_name
            for item in rec.run.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
