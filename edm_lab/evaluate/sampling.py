"""Sampling through Lightning: `predict` over a dataset of seeds, so image i always comes from seed i."""
from __future__ import annotations

import functools
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import EDMDiscretization
from edm_lab.design.sampler import PerSampleNoise, SampleResult, sample, time_steps
from edm_lab.design.schedules import LinearSchedule, NoScaling
from edm_lab.design.solvers import SecondOrder

Sampler = Callable[..., SampleResult]


class SeedDataset(Dataset):
    """Seeds first, first + 1, ..., one per sample."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return self.first + i


class SamplingModule(L.LightningModule):
    """Wraps a denoiser and a sampler: `sample` with its design axes and step count bound."""

    def __init__(self, net: nn.Module, sample_shape: tuple[int, ...], sampler: Sampler) -> None:
        super().__init__()
        self.net, self.sample_shape, self.sampler = net, tuple(sample_shape), sampler

    def predict_step(self, seeds: Tensor, batch_idx: int) -> dict[str, Any]:
        result = sample_seeds(self.net, self.sample_shape, self.sampler, seeds.tolist(), self.device)
        return {"seeds": seeds.cpu(), "samples": result.x.cpu(), "nfe": result.nfe}


def sample_seeds(net: nn.Module, sample_shape: tuple[int, ...], sampler: Sampler, seeds: list[int],
                 device: torch.device | str = "cpu") -> SampleResult:
    """Sample i from seed i: latents, then class labels (if any), then churn noise, all from that seed."""
    noise = PerSampleNoise(seeds, device=device)
    latents = noise.randn((len(seeds), *sample_shape), device=device)
    class_labels = None
    label_dim = getattr(net, "label_dim", 0)
    if label_dim:  # drawn from each seed's generator after its latents, as the reference does
        class_labels = torch.eye(label_dim, device=device)[noise.randint(label_dim, size=[len(seeds)], device=device)]
    return sampler(net, latents, class_labels=class_labels, randn_like=noise.randn_like)


def generate(trainer: L.Trainer, module: SamplingModule, first_seed: int, num_samples: int,
             batch_size: int) -> tuple[Tensor, int]:
    """(samples in seed order, NFE per sample) from `num_samples` consecutive seeds."""
    loader = DataLoader(SeedDataset(first_seed, num_samples), batch_size=batch_size, shuffle=False)
    outputs = trainer.predict(module, dataloaders=loader)
    samples = torch.cat([o["samples"] for o in outputs])
    nfe = {o["nfe"] for o in outputs}
    if len(nfe) != 1:
        raise RuntimeError(f"batches disagree on NFE: {sorted(nfe)}")
    return samples, nfe.pop()


def start_sigma(net: nn.Module, num_steps: int, schedule, discretization) -> float:
    """The noise level sigma(t_0) a sampler starts from (after clamping and rounding)."""
    t_steps, fitted = time_steps(net, num_steps, schedule, discretization)
    return float(fitted.sigma(t_steps[0]))


def reference_sampler(sigma_start: float, num_steps: int = 512, sigma_min: float = 0.002) -> Sampler:
    """A high-accuracy solver of the same ODE: Heun, EDM discretization, many steps, from sigma_start.

    The ODE's solution map, seen in x/s against sigma, is the same for every schedule and
    scaling (paper, Section 3), so one reference serves every sampler that starts at sigma_start.
    """
    disc = EDMDiscretization(sigma_min=min(sigma_min, sigma_start / 2), sigma_max=sigma_start)
    return functools.partial(sample, num_steps=num_steps, schedule=LinearSchedule(), scaling=NoScaling(),
                             discretization=disc, solver=SecondOrder(alpha=1.0), churn=Churn())


def rms_error(samples: Tensor, reference: Tensor) -> float:
    """Root-mean-square difference per element: the sampler's measured truncation error."""
    return float((samples.to(torch.float64) - reference.to(torch.float64)).square().mean().sqrt())
