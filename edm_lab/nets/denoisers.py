"""Denoisers built from a network spec: a preconditioner around one of the paper's networks.

A spec is plain data, `{"precond": {"class": "EDMPrecond", "kwargs": {...}},
"network": {"model_type": "SongUNet", "kwargs": {...}}}`, and is only ever turned into modules
through the allow-lists below, so a spec read from a file cannot name arbitrary code. Its
structural integers are bounded (`SPEC_BOUNDS`), and `check_spec_against` compares the tensors
a file holds with those the spec's network would have, on the meta device, so a file cannot
make the loader allocate (or spend minutes initialising) a network larger than the file.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, Mapping

import torch
from torch import nn

from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, Precond, VEPrecond, VPPrecond
from edm_lab import nets
from edm_lab.bounds import SPEC_BOUNDS

PRECONDS: dict[str, type[Precond]] = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, IDDPMPrecond, EDMPrecond)}

class SpecError(ValueError):
    """A network spec that is malformed, out of bounds, cannot be built, or does not match tensors."""


def check_spec(spec: Any) -> None:
    """Refuse (`SpecError`) a spec that is not well-formed, names a class outside the allow-lists
    or exceeds `SPEC_BOUNDS`; builds nothing."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"network spec is a {type(spec).__name__}, expected a mapping with 'precond' and 'network'")
    for part, name_key in (("precond", "class"), ("network", "model_type")):
        entry = spec.get(part)
        if not (isinstance(entry, Mapping) and isinstance(entry.get(name_key), str)
                and isinstance(entry.get("kwargs"), Mapping)):
            raise SpecError(f"network spec lacks {part!r}: {{{name_key!r}: <name>, 'kwargs': {{...}}}} "
                            f"(got {entry!r:.200})")
    precond_name, model_type = spec["precond"]["class"], spec["network"]["model_type"]
    if precond_name not in PRECONDS:
        raise SpecError(f"network spec: unknown preconditioner {precond_name!r} (known: {sorted(PRECONDS)})")
    if model_type not in nets.NETWORKS:
        raise SpecError(f"network spec: unknown model_type {model_type!r} (known: {sorted(nets.NETWORKS)})")
    for part in ("precond", "network"):
        kwargs = spec[part]["kwargs"]
        for key, (low, high) in SPEC_BOUNDS.items():
            name = key.removeprefix("len(").removesuffix(")").removesuffix("[i]")
            if name not in kwargs:
                continue
            value = kwargs[name]
            if key == name:
                _check_bound(part, name, value, low, high)
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise SpecError(f"network spec: {part} kwarg {name}={value!r:.80} is not a list")
            if key.startswith("len("):
                _check_bound(part, key, len(value), low, high)
            else:
                for i, item in enumerate(value):
                    _check_bound(part, f"{name}[{i}]", item, low, high)


def _check_bound(part: str, name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"network spec: {part} kwarg {name}={value!r:.80} is outside [{low}, {high}] "
                        "(edm_lab.bounds.SPEC_BOUNDS)")


def spec_state_layout(spec: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every state_dict entry of the spec's denoiser, without allocating it.

    The network is built on the meta device (shapes only, no storage, no random draws); the
    preconditioner around it is real, as it computes floats from its buffers (iDDPM's table).
    """
    check_spec(spec)
    network = spec["network"]
    try:
        with torch.device("meta"):
            net = nets.build_network(network["model_type"], **network["kwargs"])
        denoiser = PRECONDS[spec["precond"]["class"]](model=net, **spec["precond"]["kwargs"])
    except Exception as exc:  # noqa: BLE001 - bad kwargs from a file fail in many ways; all are spec errors
        raise SpecError(f"network spec: cannot build {network['model_type']} inside {spec['precond']['class']} "
                        f"({type(exc).__name__}: {exc})") from exc
    return {name: (tuple(value.shape), value.dtype) for name, value in denoiser.state_dict().items()}


def check_spec_against(spec: Mapping[str, Any], shapes: Mapping[str, Sequence[int]],
                       dtypes: Mapping[str, torch.dtype | str] | None = None) -> None:
    """Refuse (`SpecError`) a spec whose denoiser's state_dict is not exactly `shapes` (and `dtypes`).

    Meant for loaders, before they build the network for real: the comparison allocates
    nothing, so tensors that do not fit the spec (e.g. a tiny file whose spec asks for a huge
    network) are refused at the cost of a meta build. The message lists the first mismatches.
    """
    layout = spec_state_layout(spec)
    problems = []
    missing = [name for name in layout if name not in shapes]
    unexpected = [name for name in shapes if name not in layout]
    if missing:
        problems.append(f"missing {len(missing)} tensors {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors {unexpected[:5]}")
    misshaped = [f"{name!r} is {tuple(shapes[name])} in the file, {shape} in the network"
                 for name, (shape, _) in layout.items() if name in shapes and tuple(shapes[name]) != shape]
    if misshaped:
        problems.append(f"{len(misshaped)} shapes differ: " + "; ".join(misshaped[:5]))
    if dtypes is not None:
        mistyped = [f"{name!r} is {dtypes[name]} in the file, {dtype} in the network"
                    for name, (_, dtype) in layout.items() if name in dtypes and dtypes[name] != dtype]
        if mistyped:
            problems.append(f"{len(mistyped)} dtypes differ: " + "; ".join(mistyped[:5]))
    if problems:
        spec_values = sum(math.prod(shape) for shape, _ in layout.values())
        file_values = sum(math.prod(shape) for shape in shapes.values())
        raise SpecError(f"tensors do not match the network its spec describes ({len(layout)} tensors, "
                        f"{spec_values:,} values; the file has {len(shapes)} tensors, {file_values:,} values): "
                        + "; ".join(problems))


def build_denoiser(spec: Mapping[str, Any]) -> Precond:
    """Modules from a spec (allow-listed classes only, `SPEC_BOUNDS` checked); weights are freshly initialised.

    Loaders call `check_spec_against` first, so that only networks matching their tensors get built.
    """
    check_spec(spec)
    network = dict(spec["network"])
    net = nets.build_network(network["model_type"], **network["kwargs"])
    denoiser = PRECONDS[spec["precond"]["class"]](model=net, **spec["precond"]["kwargs"])
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
