"""Sampling through Lightning: `predict` over a dataset of seeds, so image i always comes from seed i.

Under DDP every rank samples whole batches of consecutive seeds (batch j on rank j % world size),
so a batch holds the same seeds whatever the world size. Each rank turns its samples into what
the metrics need (features, squared errors against a reference) on its own device; `generate`
then gathers the per-seed results of all ranks in seed order, so the numbers computed from them
do not depend on the world size.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import EDMDiscretization
from edm_lab.design.noise import CounterNoise
from edm_lab.design.sampler import PerSampleNoise, SampleResult, noise_levels, sample
from edm_lab.design.schedules import LinearSchedule, NoScaling
from edm_lab.design.solvers import RK45, SecondOrder
from edm_lab.evaluate.features import FlattenFeatures, FrechetDistance

Sampler = Callable[..., SampleResult]
BatchHook = Callable[[list[int], Tensor], None]


class SeedDataset(Dataset):
    """Seeds first, first + 1, ..., one per sample."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return self.first + i


class SeedShards(DistributedSampler):
    """This rank's indices: whole batches of `batch_size` consecutive indices, batch j to rank j % world size.

    Unlike Lightning's own predict sampler (interleaved indices), every batch holds the same seeds
    whatever the world size. Being a DistributedSampler, Lightning leaves it in place. With fewer
    batches than ranks, a rank left without one repeats batch rank % batches (Lightning refuses an
    empty loader); the gather keeps each seed once.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        count, self.batch_size = len(dataset), int(batch_size)
        starts = list(range(self.batch_size * rank, count, self.batch_size * num_replicas))
        if not starts and count:
            starts = [self.batch_size * (rank % math.ceil(count / self.batch_size))]
        self.indices = [i for start in starts for i in range(start, min(start + self.batch_size, count))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SamplingModule(L.LightningModule):
    """Samples seeds with a sampler and keeps, per seed, what the evaluation needs.

    Per predict batch, on the rank's device: the samples; each one's NFE; their features (`extractor`, in chunks
    of `feature_batch_size`, inputs cast to `feature_dtype`, autocast off so the trainer's
    precision cannot change the metric); the sum of squared differences to `reference` (a CPU
    tensor of the samples of seeds first_seed, first_seed + 1, ...); the samples themselves for
    the first `keep_samples` seeds (None: all). `on_batch(seeds, samples)` sees every batch
    (image export). `generate` gathers all ranks' parts.
    """

    def __init__(self, net: nn.Module, sample_shape: Sequence[int], sampler: Sampler, first_seed: int = 0,
                 extractor: nn.Module | None = None, feature_batch_size: int = 512,
                 feature_dtype: torch.dtype = torch.float32, reference: Tensor | None = None,
                 keep_samples: int | None = None, on_batch: BatchHook | None = None,
                 noise: str = "generators") -> None:
        super().__init__()
        self.net, self.sample_shape, self.sampler = net, tuple(sample_shape), sampler
        self.first_seed = int(first_seed)
        self.extractor = extractor
        self.num_features = int(extractor.num_features) if extractor is not None else 0
        self.feature_batch_size, self.feature_dtype = int(feature_batch_size), feature_dtype
        self.reference, self.keep_samples, self.on_batch = reference, keep_samples, on_batch
        self.noise = noise
        self.reset()

    def reset(self) -> None:
        """Forget the parts of an earlier predict run."""
        self.parts: list[dict[str, Tensor]] = []
        self.nfe: set[int] = set()  # denoiser calls per batch
        self.nfe_varies = False  # a batch reported per-sample NFE (an adaptive solver)
        self.sampling_seconds = 0.0

    def predict_step(self, seeds: Tensor, batch_idx: int) -> int:
        """Sample one batch of seeds and keep its parts; returns the batch's size (the parts stay here)."""
        seed_list = seeds.tolist()
        start = time.perf_counter()
        result = sample_seeds(self.net, self.sample_shape, self.sampler, seed_list, self.device, self.noise)
        _synchronize(self.device)
        self.sampling_seconds += time.perf_counter() - start
        self.nfe.add(result.nfe)
        nfe = result.nfe_per_sample
        if nfe is None:
            nfe = torch.full((len(seed_list),), result.nfe, dtype=torch.int64)
        else:
            self.nfe_varies = True
        x = result.x.to(torch.float64)
        offsets = torch.tensor(seed_list, dtype=torch.int64) - self.first_seed
        part = {"offset": offsets, "nfe": nfe.cpu()}
        if self.extractor is not None:
            part["features"] = self._features(x).cpu()
        if self.reference is not None:
            reference = self.reference[offsets].to(device=x.device, dtype=torch.float64)
            part["squared_error"] = (x - reference).square().flatten(1).sum(1).cpu()
        keep = offsets < self.keep_samples if self.keep_samples is not None else torch.ones_like(offsets, dtype=torch.bool)
        part["kept_offset"], part["samples"] = offsets[keep], x[keep.to(x.device)].cpu()
        if self.on_batch is not None:
            self.on_batch(seed_list, x)
        self.parts.append(part)
        return len(seed_list)

    @torch.no_grad()
    def _features(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            chunks = [self.extractor(x[i:i + self.feature_batch_size].to(self.feature_dtype))
                      for i in range(0, len(x), self.feature_batch_size)]
        # float64 is exact for any extractor dtype, and gives every rank the same gather dtype.
        return torch.cat(chunks).to(torch.float64)


@dataclass
class Generated:
    """What `generate` gathered from every rank, in seed order (index i: the module's first_seed + i).

    `nfe` is the NFE of a sample: the exact int where every batch reported one for all its samples
    (fixed-step solvers, which must agree), else the mean over the samples of their own NFE (a float).
    """

    nfe: int | float
    nfe_per_sample: Tensor        # (N,) int64: each sample's denoiser evaluations
    features: Tensor | None       # (N, num_features) float64, when the module had an extractor
    squared_error: Tensor | None  # (N,) float64 sums over each sample's elements, when it had a reference
    samples: Tensor               # (K, *sample_shape) float64: the first K seeds' samples (keep_samples)
    sampling_seconds: float       # the slowest rank's time in the sampler (synchronized)


NOISE_SOURCES = {"generators": PerSampleNoise, "counter": CounterNoise}  # the `seed_noise` key


def sample_seeds(net: nn.Module, sample_shape: tuple[int, ...], sampler: Sampler, seeds: list[int],
                 device: torch.device | str = "cpu", noise: str = "generators") -> SampleResult:
    """Sample i from seed i: latents, then class labels (if any), then churn noise, all from that seed.

    `noise`: "generators" draws from one generator per seed (the reference's bits, a loop over the batch),
    "counter" from a counter-based hash of (seed, draw, element) for the whole batch at once."""
    noise = NOISE_SOURCES[noise](seeds, device=device)
    latents = noise.randn((len(seeds), *sample_shape), device=device)
    class_labels = None
    label_dim = getattr(net, "label_dim", 0)
    if label_dim:  # drawn from each seed's generator after its latents, as the reference does
        class_labels = torch.eye(label_dim, device=device)[noise.randint(label_dim, size=[len(seeds)], device=device)]
    return sampler(net, latents, class_labels=class_labels, randn_like=noise.randn_like)


def generate(trainer: L.Trainer, module: SamplingModule, num_samples: int, batch_size: int) -> Generated:
    """Run `module` over `num_samples` consecutive seeds from its first_seed on every rank; every rank gets
    all ranks' results.

    Every rank must call it (it is collective under DDP); it checks that each seed was sampled exactly once.
    """
    dataset = SeedDataset(module.first_seed, num_samples)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        sampler=SeedShards(dataset, batch_size, trainer.world_size, trainer.global_rank))
    module.reset()
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    # Gathered here rather than in a predict hook: the process group outlives predict, and all
    # ranks reach this point whatever their number of batches.
    strategy, device, parts = trainer.strategy, trainer.strategy.root_device, module.parts
    main = {"offset": _cat(parts, "offset", (), torch.int64), "nfe": _cat(parts, "nfe", (), torch.int64)}
    if module.extractor is not None:
        main["features"] = _cat(parts, "features", (module.num_features,), torch.float64)
    if module.reference is not None:
        main["squared_error"] = _cat(parts, "squared_error", (), torch.float64)
    main = _gather_by_offset(strategy, device, main)
    kept = _gather_by_offset(strategy, device, {"offset": _cat(parts, "kept_offset", (), torch.int64),
                                                "samples": _cat(parts, "samples", module.sample_shape, torch.float64)})
    _check_offsets(main["offset"], num_samples, "every seed")
    num_kept = num_samples if module.keep_samples is None else min(module.keep_samples, num_samples)
    _check_offsets(kept["offset"], num_kept, "the kept samples' seeds")
    per_rank = _all_objects(strategy, (sorted(module.nfe), module.nfe_varies, module.sampling_seconds))
    nfe = point_nfe(main["nfe"], {n for rank_nfe, _, _ in per_rank for n in rank_nfe},
                    any(varies for _, varies, _ in per_rank))
    return Generated(nfe, main["nfe"], main.get("features"), main.get("squared_error"), kept["samples"],
                     max(seconds for _, _, seconds in per_rank))


def point_nfe(per_sample: Tensor, batch_nfe: set[int], varies: bool) -> int | float:
    """A point's NFE: the exact int every batch reported (fixed-step solvers, which must agree), or with
    per-sample counts (`varies`: an adaptive solver) their mean over the samples."""
    if varies:
        return float(per_sample.to(torch.float64).mean())
    if len(batch_nfe) != 1:
        raise RuntimeError(f"batches disagree on NFE: {sorted(batch_nfe)}")
    return next(iter(batch_nfe))


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the timer would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cat(parts: list[dict[str, Tensor]], key: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The rank's parts of `key` in one tensor (an empty one of the right shape if it has none)."""
    if not parts:
        return torch.empty((0, *shape), dtype=dtype)
    return torch.cat([p[key] for p in parts])


def _distributed(strategy) -> bool:
    return (strategy.world_size > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _gather_by_offset(strategy, device: torch.device, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every rank's rows of `values` (keyed by `values["offset"]`), on the CPU, sorted by offset, each offset once.

    Ranks may hold different counts: each pads to the longest with offset -1 (dropped after the gather).
    """
    if _distributed(strategy):
        longest = int(_all_gather(torch.tensor([len(values["offset"])], device=device)).max())

        def pad(t: Tensor, fill: float) -> Tensor:
            out = torch.full((longest, *t.shape[1:]), fill, dtype=t.dtype, device=device)
            out[:len(t)] = t.to(device)
            return out

        values = {k: _all_gather(pad(v, -1 if k == "offset" else 0)).cpu() for k, v in values.items()}
    offsets = values["offset"]
    order = torch.argsort(offsets, stable=True)
    ordered = offsets[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]  # a seed sampled twice (a rank repeating a batch) counts once
    first &= ordered >= 0
    keep = order[first]
    return {k: v[keep] for k, v in values.items()}


def _all_gather(tensor: Tensor) -> Tensor:
    """Equal-shaped tensors of every rank, concatenated in rank order."""
    out = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def _check_offsets(offsets: Tensor, count: int, what: str) -> None:
    if len(offsets) != count or not torch.equal(offsets, torch.arange(count)):
        raise RuntimeError(f"{what} should have been sampled once: expected {count} seeds, gathered "
                           f"{len(offsets)} distinct ones")


def _all_objects(strategy, obj: Any) -> list[Any]:
    """`obj` of every rank (just [obj] without a process group)."""
    if not _distributed(strategy):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def frechet_from_features(reference_statistics: Mapping[str, Tensor], features: Tensor, batch_size: int = 512) -> float:
    """Frechet distance between cached reference statistics (`FrechetDistance.reference_statistics()`)
    and precomputed generated `features` (N, D).

    The same torchmetrics computation as FrechetDistance (float64 sums, fed in chunks of
    `batch_size` in row order): the same features in the same order give the same number.
    """
    if features.ndim != 2:
        raise ValueError(f"need features shaped (N, D), got {tuple(features.shape)}")
    distance = FrechetDistance(FlattenFeatures(features.shape[1]), batch_size=batch_size, input_dtype=torch.float64)
    distance.load_reference_statistics({k: v.detach().cpu() for k, v in reference_statistics.items()})
    return distance(features.detach().cpu())


def rms_from_squared_errors(squared_error: Tensor, elements_per_sample: int) -> float:
    """Root-mean-square error per element from per-sample sums of squared errors (summed in the given order)."""
    total = float(squared_error.to(torch.float64).sum())
    return math.sqrt(total / (len(squared_error) * elements_per_sample))


def start_sigma(net: nn.Module, num_steps: int, discretization) -> float:
    """The noise level a sampler starts from: the discretization's first level, clamped and rounded.

    Taken before the schedule's round trip sigma(sigma^-1(.)), which adds float noise (80 becomes
    80.00000000000001 through the VP schedule): every schedule starting at one level shares one
    reference solution.
    """
    return float(noise_levels(net, num_steps, discretization)[0][0])


def reference_sampler(sigma_start: float, num_steps: int = 256, tolerance: float | None = None,
                      sigma_min: float = 0.002) -> Sampler:
    """A high-accuracy solver of the same ODE from sigma_start to sigma_min (then Euler to 0, as every ODE
    solver ends): adaptive RK45 with rtol = atol = `tolerance`, or, with `tolerance=None`, Heun with
    `num_steps` steps of the EDM discretization.

    The ODE's solution map, seen in x/s against sigma, is the same for every schedule and
    scaling (paper, Section 3), so one reference serves every sampler that starts at sigma_start.
    """
    disc = EDMDiscretization(sigma_min=min(sigma_min, sigma_start / 2), sigma_max=sigma_start)
    solver, steps = (SecondOrder(alpha=1.0), num_steps) if tolerance is None else (RK45(tolerance, tolerance), 2)
    return functools.partial(sample, num_steps=steps, schedule=LinearSchedule(), scaling=NoScaling(),
                             discretization=disc, solver=solver, churn=Churn())


def rms_error(samples: Tensor, reference: Tensor) -> float:
    """Root-mean-square difference per element: the sampler's measured truncation error."""
    return float((samples.to(torch.float64) - reference.to(torch.float64)).square().mean().sqrt())
