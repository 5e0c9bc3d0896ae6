"""Denoisers built from a network spec: a preconditioner around one of the paper's networks.

A spec is plain data, `{"precond": {"class": "EDMPrecond", "kwargs": {...}},
"network": {"model_type": "SongUNet", "kwargs": {...}}}`, and is only ever turned into modules
through the allow-lists below, so a spec read from a file cannot name arbitrary code.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
from torch import nn

from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, Precond, VEPrecond, VPPrecond
from edm_lab import nets

PRECONDS: dict[str, type[Precond]] = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, IDDPMPrecond, EDMPrecond)}


def build_denoiser(spec: Mapping[str, Any]) -> Precond:
    """Modules from a spec (allow-listed classes only); weights are freshly initialised."""
    precond_name = spec["precond"]["class"]
    if precond_name not in PRECONDS:
        raise ValueError(f"unknown preconditioner {precond_name!r} (known: {sorted(PRECONDS)})")
    network = dict(spec["network"])
    net = nets.build_network(network["model_type"], **network["kwargs"])
    denoiser = PRECONDS[precond_name](model=net, **spec["precond"]["kwargs"])
    denoiser.build_spec = {"precond": dict(spec["precond"]), "network": network}
    return denoiser


def network_spec(precond: Callable[..., Precond], net: Mapping[str, Any], img_resolution: int, img_channels: int,
                 label_dim: int = 0) -> dict[str, Any]:
    """The spec of `net` (a preset: model_type + kwargs) sized for the data, inside `precond`.

    Like the reference, an iDDPM preconditioner gets a network with 2x output channels
    (the learned variance), of which it keeps the first `img_channels`.
    """
    if not isinstance(precond, functools.partial):
        raise TypeError("precond must be a partial of a preconditioner class (Hydra `_partial_: true`)")
    kwargs = dict(net)
    model_type = kwargs.pop("model_type")
    iddpm = precond.func is IDDPMPrecond
    network_kwargs = dict(img_resolution=img_resolution, in_channels=img_channels,
                          out_channels=img_channels * (2 if iddpm else 1), label_dim=label_dim, **kwargs)
    precond_kwargs = dict(precond.keywords) | ({"img_channels": img_channels} if iddpm else {})
    return {"precond": {"class": precond.func.__name__, "kwargs": precond_kwargs},
            "network": {"model_type": model_type, "kwargs": network_kwargs}}


def network_denoiser(dataset, precond: Callable[..., Precond], net: Mapping[str, Any], seed: int = 0,
                     class_conditional: bool = False) -> Precond:
    """A randomly initialised network (seeded) for the data set's image shape, inside `precond`."""
    if not dataset.is_image:
        raise ValueError(f"model=network needs image data (N, C, H, W); data={dataset.name} has samples of shape "
                         f"{dataset.sample_shape}")
    channels, resolution = dataset.sample_shape[0], dataset.sample_shape[-1]
    label_dim = dataset.num_classes if class_conditional else 0
    spec = network_spec(precond, net, resolution, channels, label_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = build_denoiser(spec)
    denoiser.provenance = {"network": spec["network"]["model_type"], "checkpoint": None,
                           "parameters": nets.count_parameters(denoiser)}
    return denoiser.eval()


def precond_choice(denoiser: nn.Module) -> str:
    """The `precond=` option a preconditioner module corresponds to (edm, vp, ve, iddpm)."""
    return type(denoiser).__name__.removesuffix("Precond").lower()
