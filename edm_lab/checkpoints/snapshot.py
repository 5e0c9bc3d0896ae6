"""This project's own checkpoints: tensors in safetensors, the network spec in its metadata.

Nothing executable is stored: loading rebuilds the modules from the spec through allow-lists
(`edm_lab.nets.denoisers.build_denoiser`) and copies the tensors by name (strict), so a
checkpoint loads back to bit-identical outputs and a hostile file cannot run code. Before
anything is built, the tensor names, shapes and dtypes in the file's header are compared with
those of the spec's network on the meta device (`check_spec_against`), so a small file cannot
make the loader allocate a large network.

The metadata is one key, `METADATA_KEY`, holding the sort_keys JSON of `{format, spec, extra}`:
safetensors stores metadata as a hash map whose order varies per process, so with a single
key the same weights give the same bytes (and sha256) wherever they are saved. Files of the
first layout (`format`, `spec` and `extra` as three keys) are still read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from edm_lab.atomic import atomic_write_bytes
from edm_lab.design.precond import PRECISIONS
from edm_lab.nets import count_parameters
from edm_lab.nets.denoisers import SpecError, build_denoiser, check_spec, check_spec_against, precond_choice

FORMAT = "edm-lab-checkpoint/1"
METADATA_KEY = "edm-lab-checkpoint"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
"""safetensors' dtype names (those torch has), to compare a header with a network without reading data."""


def save_checkpoint(denoiser: nn.Module, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `denoiser` (built from a spec, e.g. by `network_denoiser`) atomically to `path`.

    Identical weights, spec and extra give identical bytes, whichever process saves them.
    """
    spec = getattr(denoiser, "build_spec", None)
    if spec is None:
        raise ValueError(f"{type(denoiser).__name__} has no build_spec: only denoisers built from a network spec "
                         "(model=network, training, imported snapshots) can be saved")
    tensors = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    record = {"format": FORMAT, "spec": spec, "extra": dict(extra or {})}
    metadata = {METADATA_KEY: json.dumps(record, sort_keys=True, default=str)}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, extra) of a checkpoint file, without building anything."""
    spec, extra, _, _ = _read_header(Path(path))
    return spec, extra


def load_checkpoint(path: str | Path) -> nn.Module:
    """The denoiser stored in `path`, in eval mode.

    Every refusal is a ValueError naming the file (FileNotFoundError if it does not exist); a
    spec that does not match the file's tensors is refused before any of it is allocated.
    """
    path = Path(path)
    spec, extra, shapes, dtypes = _read_header(path)
    try:
        check_spec_against(spec, shapes, dtypes)
        denoiser = build_denoiser(spec)
    except SpecError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from exc
    denoiser.load_state_dict(load_file(str(path)), strict=True)
    denoiser.checkpoint_extra = extra
    return denoiser.eval()


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[int, ...]],
                                      dict[str, Any]]:
    """(spec, extra, shapes, dtypes) from the file's header (spec well-formed); no tensor data is read."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes, dtypes = {}, {}
            for key in handle.keys():
                view = handle.get_slice(key)
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = _DTYPES.get(view.get_dtype(), view.get_dtype())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is not a safetensors file ({exc})") from exc
    if METADATA_KEY in metadata:
        record = _json(path, METADATA_KEY, metadata[METADATA_KEY])
        if not isinstance(record, dict):
            raise ValueError(f"checkpoint {path}: metadata {METADATA_KEY!r} is a {type(record).__name__}, "
                             "expected a JSON object")
    else:  # the first layout: format, spec and extra as separate keys
        record = {"format": metadata.get("format")}
        record.update({key: _json(path, key, metadata[key]) for key in ("spec", "extra") if key in metadata})
    if record.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {record.get('format')!r}, expected {FORMAT!r} "
                         "(is it a checkpoint of this project?)")
    if "spec" not in record:
        raise ValueError(f"checkpoint {path} has no network spec")
    extra = record.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"checkpoint {path}: extra is not a JSON object (got {type(extra).__name__})")
    try:
        check_spec(record["spec"])
    except SpecError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from exc
    return record["spec"], extra, shapes, dtypes


def _json(path: Path, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's stack
        raise ValueError(f"checkpoint {path}: metadata {key!r} is not valid JSON ({exc})") from None


def file_sha256(path: str | Path) -> str:
    """Content hash: identifies the checkpoint behind a result row, whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_denoiser(dataset, precond, path: str, precision: str | None = None) -> nn.Module:
    """Model factory for `model=checkpoint`: the stored network (its own preconditioner wins).

    `precision` (fp32 | fp16 | bf16) overrides the compute dtype stored with the network.
    """
    return as_sampling_model(load_checkpoint(path), dataset, f"checkpoint {path}", path, path, precision)


def as_sampling_model(denoiser: nn.Module, dataset, what: str, path: str, file: str | Path,
                      precision: str | None) -> nn.Module:
    """A loaded network (`checkpoint_denoiser`, `official_denoiser`) made ready to sample `dataset`.

    Applies the `precision` override, checks its sample shape against the data and records the
    provenance of the result rows; `file` is the file actually read (for a URL, the cached copy).
    """
    set_precision(denoiser, precision)
    check_sample_shape(denoiser, dataset, what)
    denoiser.provenance = {"network": denoiser.build_spec["network"]["model_type"], "checkpoint": str(path),
                           "checkpoint_sha256": file_sha256(file), "parameters": count_parameters(denoiser),
                           "precond": precond_choice(denoiser)}
    return denoiser


def set_precision(denoiser: nn.Module, precision: str | None) -> nn.Module:
    """Run a loaded network's inner model in `precision` on CUDA (None keeps its own)."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"model.precision must be one of {list(PRECISIONS)}, got {precision!r}")
        denoiser.precision = precision
    return denoiser


def check_sample_shape(denoiser: nn.Module, dataset, what: str) -> None:
    """The network must produce samples shaped like the data set the metrics compare against."""
    shape = (getattr(denoiser, "img_channels", None), getattr(denoiser, "img_resolution", None),
             getattr(denoiser, "img_resolution", None))
    if None not in shape and tuple(shape) != tuple(dataset.sample_shape):
        raise ValueError(f"{what} makes samples of shape {shape} but data={dataset.name} has {dataset.sample_shape}: "
                         "choose data (and data.resolution) matching the network")
