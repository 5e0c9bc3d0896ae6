"""Vetting a training checkpoint before Lightning resumes from it (`task.resume=<file>`).

Lightning's checkpoints are torch.save pickles. Read with `weights_only=True`, torch's restricted
unpickler refuses any global outside its allow-list, but its error then recommends retrying
with `weights_only=False`, which would run the file's payload. `check_resume_checkpoint` reads
the file the same safe way (memory-mapped, so tensor data is not read) and replaces torch's
message with one that names the file and offers no unsafe retry.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

TRAINING_CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "loops", "cur_nimg")
"""Entries every training checkpoint of this project has (Lightning's own, and
`edm_lab.train.module.DiffusionModule.on_save_checkpoint`'s `cur_nimg`)."""

_ZIP_MAGIC = b"PK\x03\x04"


class ResumeCheckpointError(ValueError):
    """A `task.resume` file that is missing, unreadable, unsafe or not a training checkpoint."""


def check_resume_checkpoint(path: str | Path) -> None:
    """Refuse (`ResumeCheckpointError`, naming `path`) anything but a training checkpoint of this project.

    The file is read with torch's weights-only unpickler, so nothing in it is executed; the
    tensors of a zip-format file are memory-mapped, not read, so even a large file costs little.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeCheckpointError(f"{path} does not exist or is not a regular file")
    try:
        with open(path, "rb") as handle:
            # mmap needs the zip format; torch.save's legacy format (and plain pickles) are read whole.
            zip_format = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol: noise here
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as exc:  # noqa: BLE001 - a hostile or corrupt file fails in many ways; all are refusals
        reason = _reason(exc)
        raise ResumeCheckpointError(
            f"{path} was refused: it cannot be read as a weights-only torch checkpoint"
            + (f" ({reason})" if reason else "") + ". Nothing in it was executed. A training checkpoint of "
            "this project holds only tensors and plain values; a file with objects outside torch's "
            "weights-only allow-list is not one") from None
    if not isinstance(checkpoint, dict):
        raise ResumeCheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a training checkpoint of "
                                    "this project (a dict written by the training task's Lightning trainer)")
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ResumeCheckpointError(f"{path} is not a training checkpoint of this project: it lacks {missing} "
                                    f"(has {sorted(map(str, checkpoint))[:10]})")
    if not isinstance(checkpoint["state_dict"], dict):
        raise ResumeCheckpointError(f"{path} is not a training checkpoint of this project: its state_dict is a "
                                    f"{type(checkpoint['state_dict']).__name__}")


def _reason(exc: Exception) -> str:
    """torch's specific complaint (e.g. "Unsupported global: GLOBAL posix.system"), without its advice.

    Lines mentioning `weights_only` or allow-listing are dropped: both amount to "trust the
    file", which is exactly what this check must not suggest.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\. Please use|\n\n|$)",
                      text, flags=re.DOTALL)
    for line in [found.group(1)] if found else text.splitlines():
        line = line.strip().split(". ")[0].rstrip(".")
        if line and not re.search(r"weights.only|safe_globals|documentation", line, flags=re.IGNORECASE):
            return line if isinstance(exc, pickle.UnpicklingError) else f"{type(exc).__name__}: {line}"
    return type(exc).__name__
