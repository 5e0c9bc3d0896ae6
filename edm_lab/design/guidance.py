"""Guidance: a denoiser made of two evaluations, for the sampler to use like any other denoiser.

Both wrappers here follow the convention of Karras et al. 2024 ("Guiding a diffusion model with a bad
version of itself", the EDM2 autoguidance paper): with weight w,

    D_w(x; sigma, c) = D_0(x; sigma, c) + w (D_1(x; sigma, c) - D_0(x; sigma, c)),

so w = 1 is the model D_1 unguided, w = 0 is D_0 alone, and w > 1 extrapolates away from D_0.

* Classifier-free guidance (Ho & Salimans 2022): D_1 = D(.; c), D_0 = D(.; no class). Ho & Salimans
  write eps~ = (1 + w') eps(z, c) - w' eps(z), i.e. w = 1 + w' (their w' = 0 is no guidance). The weights
  of both forms sum to one, and D = x - sigma eps, so the combination is the same in D, eps or the score.
* Autoguidance (Karras et al. 2024): D_1 = the main network, D_0 = a weaker "guide" network of the same
  model family conditioned on the same c.

Cost: the wrapper calls only the networks whose coefficient is nonzero: w = 1 is one call of D_1, w = 0
one call of D_0, any other w one call of each (two calls, never one batched call, so that each network sees
the batch shapes it sees unguided). `evaluations_per_call` (1 or 2) says so, and the sampler's NFE
(`edm_lab.design.sampler.CountingDenoiser`) counts network evaluations, i.e. calls of either network.

The wrappers know nothing of configs: `net` and `guide` are any denoisers D(x, sigma, class_labels) with
the sampler's interface (sigma_min, sigma_max, round_sigma; all optional, as for the sampler).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from edm_lab.design.sampler import round_sigma


def _identity(net: Any) -> dict[str, Any]:
    """What names a network in results: its `provenance` (set by the model factories) or its type."""
    provenance = getattr(net, "provenance", None)
    return dict(provenance) if provenance else {"network": type(net).__name__}


def _sample_shape(net: Any) -> tuple[int, ...] | None:
    """The shape of one sample the network denoises, where it says (None: unknown)."""
    shape = getattr(net, "sample_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    channels, resolution = getattr(net, "img_channels", None), getattr(net, "img_resolution", None)
    if channels is not None and resolution is not None:
        return int(channels), int(resolution), int(resolution)
    return None


def _rounding_probe(sigma_min: float, sigma_max: float) -> Tensor:
    """Noise levels (float64) spanning [sigma_min, sigma_max] (an unbounded end replaced by 1e-3 or 1e3)."""
    lo = sigma_min if sigma_min > 0 else min(1e-3, sigma_max / 2)
    hi = sigma_max if math.isfinite(sigma_max) else max(1e3, 2 * lo)
    inner = torch.logspace(math.log10(lo), math.log10(hi), 513, dtype=torch.float64)
    return torch.cat([torch.tensor([lo, hi], dtype=torch.float64), inner, (inner[1:] * inner[:-1]).sqrt()])


class Guidance(nn.Module):
    """Base of the guided denoisers: D_w = D_0 + w (D_1 - D_0) with D_1 = `net` (module docstring).

    Exposes what the sampler and the sampling task read off a denoiser: sigma_min, sigma_max, round_sigma,
    label_dim (class labels are drawn for it), `evaluations_per_call`, `provenance` (the main network's,
    plus the guidance keys) and `describe()`.
    """

    kind: str = ""

    def __init__(self, net: Any, weight: float) -> None:
        super().__init__()
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"guidance weight must be finite, got {weight}")
        self.net, self.weight = net, weight
        self.sigma_min = float(getattr(net, "sigma_min", 0.0))
        self.sigma_max = float(getattr(net, "sigma_max", math.inf))

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations per call: 1 when w is 1 or 0 (one network alone), else 2."""
        return 1 if self.weight in (0.0, 1.0) else 2

    @property
    def label_dim(self) -> int:
        return int(getattr(self.net, "label_dim", 0) or 0)

    @property
    def img_channels(self) -> int | None:
        return getattr(self.net, "img_channels", None)

    @property
    def img_resolution(self) -> int | None:
        return getattr(self.net, "img_resolution", None)

    def round_sigma(self, sigma: Tensor) -> Tensor:
        """The main network's rounding of sigma (the guide's is checked to agree)."""
        return round_sigma(self.net, sigma)

    def combine(self, d0: Tensor, d1: Tensor) -> Tensor:
        """D_0 + w (D_1 - D_0)."""
        return d0 + self.weight * (d1 - d0)

    def describe(self) -> dict[str, Any]:
        """The guidance as data: kind, weight (this module's convention and Ho & Salimans'), cost, networks."""
        return {"guidance": self.kind, "weight": self.weight, "ho_salimans_weight": self.weight - 1.0,
                "evaluations_per_call": self.evaluations_per_call, "network": _identity(self.net),
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    @property
    def provenance(self) -> dict[str, Any]:
        """The main network's provenance plus flat guidance keys (result rows take provenance as columns)."""
        return {**_identity(self.net), "guidance": self.kind, "guidance_weight": self.weight}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class ClassifierFreeGuidance(Guidance):
    """D_w(x; sigma, c) = D(x; sigma, none) + w (D(x; sigma, c) - D(x; sigma, none)) (Ho & Salimans 2022).

    "None" is a zero row of the one-hot labels [N, label_dim]: what class-label dropout in training feeds
    the network (`edm_lab.nets.layers` zeroes a dropped row) and what the preconditioners pass when no
    labels are given. The network must have been trained with label dropout for D(.; none) to mean the
    unconditional denoiser; `describe()` reports the inner network's `label_dropout` as built, where it has
    one (a loaded checkpoint's training setting only if its spec records it).
    Class labels are required (except at w = 1, a plain call of the network).
    """

    kind = "cfg"

    def __init__(self, net: Any, weight: float) -> None:
        super().__init__(net, weight)
        label_dim = getattr(net, "label_dim", None)
        if label_dim is not None and int(label_dim) == 0:
            raise ValueError("classifier-free guidance needs a class-conditional network; this one has label_dim=0")

    def unconditional_labels(self, class_labels: Tensor) -> Tensor:
        """The "no class" labels of the batch: zero one-hot rows."""
        return torch.zeros_like(class_labels)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs) -> Tensor:
        if self.weight == 1.0:
            return self.net(x, sigma, class_labels, **kwargs)
        if class_labels is None:
            raise ValueError(f"classifier-free guidance (weight {self.weight}) needs class labels: got None")
        if class_labels.ndim != 2 or (self.label_dim and class_labels.shape[1] != self.label_dim):
            raise ValueError(f"class labels must be one-hot rows [N, {self.label_dim or 'label_dim'}], got shape "
                             f"{tuple(class_labels.shape)}")
        none = self.unconditional_labels(class_labels)
        if self.weight == 0.0:
            return self.net(x, sigma, none, **kwargs)
        return self.combine(self.net(x, sigma, none, **kwargs), self.net(x, sigma, class_labels, **kwargs))

    def describe(self) -> dict[str, Any]:
        label_dropout = getattr(getattr(self.net, "model", None), "label_dropout", None)
        return {**super().describe(), "unconditional": "zero one-hot labels",
                "label_dropout": None if label_dropout is None else float(label_dropout)}


class Autoguidance(Guidance):
    """D_w(x; sigma, c) = D_guide(x; sigma, c) + w (D_net(x; sigma, c) - D_guide(x; sigma, c)) (Karras et al. 2024).

    The guide is a weaker network of the same model (smaller, or trained less) for the same data: same
    sample shape, same class labels, same rounding of sigma. The noise range is the intersection of both
    networks' ranges. A mismatch is refused with a ValueError. With guide = net, D_w = D_net for any w.
    """

    kind = "autoguidance"

    def __init__(self, net: Any, guide: Any, weight: float) -> None:
        super().__init__(net, weight)
        self.guide = guide
        shapes = _sample_shape(net), _sample_shape(guide)
        if None not in shapes and shapes[0] != shapes[1]:
            raise ValueError(f"autoguidance: the guide denoises samples of shape {shapes[1]}, the network {shapes[0]}")
        labels = getattr(net, "label_dim", None), getattr(guide, "label_dim", None)
        if None not in labels and int(labels[0]) != int(labels[1]):
            raise ValueError(f"autoguidance: the guide has label_dim={labels[1]}, the network label_dim={labels[0]} "
                             "(the guide must be conditioned on the same classes)")
        self.sigma_min = max(self.sigma_min, float(getattr(guide, "sigma_min", 0.0)))
        self.sigma_max = min(self.sigma_max, float(getattr(guide, "sigma_max", math.inf)))
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"autoguidance: the networks' noise ranges [{getattr(net, 'sigma_min', 0.0)}, "
                             f"{getattr(net, 'sigma_max', math.inf)}] and [{getattr(guide, 'sigma_min', 0.0)}, "
                             f"{getattr(guide, 'sigma_max', math.inf)}] do not overlap")
        probe = _rounding_probe(self.sigma_min, self.sigma_max)
        rounded = [torch.as_tensor(round_sigma(n, probe)).to(torch.float64).cpu() for n in (net, guide)]
        if not torch.equal(*rounded):
            raise ValueError(f"autoguidance: the guide ({type(guide).__name__}) rounds sigma differently from the "
                             f"network ({type(net).__name__}), e.g. a discrete iDDPM network and a continuous one")

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs) -> Tensor:
        if self.weight == 1.0:
            return self.net(x, sigma, class_labels, **kwargs)
        if self.weight == 0.0:
            return self.guide(x, sigma, class_labels, **kwargs)
        return self.combine(self.guide(x, sigma, class_labels, **kwargs), self.net(x, sigma, class_labels, **kwargs))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "guide": _identity(self.guide)}

    @property
    def provenance(self) -> dict[str, Any]:
        return {**super().provenance, **{f"guide_{k}": v for k, v in _identity(self.guide).items()}}
