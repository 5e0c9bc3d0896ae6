"""Denoisers and networks: the ideal denoiser of a finite dataset and the paper's U-Nets.

`SongUNet` (DDPM++ / NCSN++) and `DhariwalUNet` (ADM) are parameter-compatible with the
reference NVlabs/edm networks (same state_dict names, shapes and numerics). `NETWORKS` is the
allow-list that `build_network` constructs from. The paper's sizes and small CPU-sized ones are
the presets of the `net` config group (conf/net/), as constructor kwargs without the
data-dependent `img_resolution`, `in_channels`, `out_channels` and `label_dim`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from edm_lab.nets.dhariwal_unet import DhariwalUNet
from edm_lab.nets.song_unet import SongUNet

NETWORKS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def build_network(model_type: str, **kwargs: Any) -> nn.Module:
    """An instance of the allow-listed network `model_type` built with `kwargs`."""
    if model_type not in NETWORKS:
        raise ValueError(f"unknown model_type {model_type!r} (known: {sorted(NETWORKS)})")
    return NETWORKS[model_type](**kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as resampling filters and Fourier frequencies excluded)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["NETWORKS", "DhariwalUNet", "SongUNet", "build_network", "count_parameters"]
