"""Shared fixtures: the reference golden vectors and a tiny Hydra config composer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = PROJECT_ROOT.parent / "shared" / "reference"


def load_reference(name: str) -> dict:
    """A golden file of ../shared/reference, or skip the test with the reason."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"golden file {path} is absent (the shared reference folder is not beside the project)")
    return torch.load(path, weights_only=True)


def net_preset(name: str) -> dict:
    """A network preset of conf/net/ (the single source of the paper's and the small sizes)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "net" / f"{name}.yaml"))


NET_PRESETS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "net").glob("*.yaml"))
