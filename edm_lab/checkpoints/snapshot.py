"""This project's own checkpoints: tensors in safetensors, the network spec in its metadata.

Nothing executable is stored: loading rebuilds the modules from the spec through allow-lists
(`edm_lab.nets.denoisers.build_denoiser`) and copies the tensors by name (strict), so a
checkpoint loads back to bit-identical outputs and a hostile file cannot run code.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from edm_lab.atomic import atomic_write_bytes
from edm_lab.design.precond import PRECISIONS
from edm_lab.nets import count_parameters
from edm_lab.nets.denoisers import build_denoiser, precond_choice

FORMAT = "edm-lab-checkpoint/1"


def save_checkpoint(denoiser: nn.Module, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `denoiser` (built from a spec, e.g. by `network_denoiser`) atomically to `path`."""
    spec = getattr(denoiser, "build_spec", None)
    if spec is None:
        raise ValueError(f"{type(denoiser).__name__} has no build_spec: only denoisers built from a network spec "
                         "(model=network, training, imported snapshots) can be saved")
    tensors = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    metadata = {"format": FORMAT, "spec": json.dumps(spec), "extra": json.dumps(dict(extra or {}), default=str)}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, extra) of a checkpoint file, without building anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is not a safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    return json.loads(metadata["spec"]), json.loads(metadata.get("extra", "{}"))


def load_checkpoint(path: str | Path) -> nn.Module:
    """The denoiser stored in `path`, in eval mode."""
    path = Path(path)
    spec, extra = read_checkpoint(path)
    try:
        denoiser = build_denoiser(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: cannot rebuild its network ({exc})") from exc
    try:
        result = denoiser.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as exc:  # strict=False still refuses tensors shaped unlike the network's
        raise ValueError(f"checkpoint {path} does not match its network: {exc}") from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its network: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    denoiser.checkpoint_extra = extra
    return denoiser.eval()


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
