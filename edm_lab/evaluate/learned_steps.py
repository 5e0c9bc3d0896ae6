"""Learned time steps: noise levels optimised for one denoiser, solver and step count (in the spirit
of LD3, GITS and "Align Your Steps"). Pure torch: no Hydra, Lightning or W&B.

Intended use (there is no command line here; a Hydra task wraps it):

    from edm_lab.design.solvers import SecondOrder
    from edm_lab.evaluate.learned_steps import optimize_time_steps

    result = optimize_time_steps(net, num_steps=3, solver=SecondOrder(), sample_shape=(3, 32, 32),
                                 train_seeds=range(0, 256), heldout_seeds=range(100_000, 100_256))
    print(result.errors)            # RMS error against the reference, before (rho = 7) and after
    result.save("steps/heun.json")  # adds this step count to the file; one file holds several

and then sweep with `discretization=optimized discretization.path=steps/heun.json nfe.steps=[3]`
(`edm_lab.design.discretizations.OptimizedDiscretization` reads the file).

What is minimised. For each training seed, the seed's latents (drawn as `sample_seeds` draws them:
one generator per seed, class labels after the latents) are solved twice: by the reference,
`edm_lab.evaluate.sampling.reference_sampler(sigma_max, reference_steps, reference_tolerance,
sigma_min)` (Heun with 256 EDM steps by default, or RK45 at a tolerance, from sigma_max to
sigma_min, then Euler to 0), and by `edm_lab.design.sampler.sample` with the given schedule, scaling
and solver, churn off, over the levels being learned. The levels keep sigma_0 = sigma_max and
sigma_{N-1} = sigma_min fixed: the sampler starts where the reference starts and takes its last
step, Euler to sigma = 0, from the level the reference takes it from, so that only the N - 2
interior levels are learned and the error is the integration's alone. With sigma_min = 0.002 (the
EDM default, unless the denoiser's range is narrower) the reference is the very one the sample
task's `sampler_rmse` is measured against. The objective is the mean squared error over the
training seeds' elements (the RMS error's minimiser; Adam does not see the difference in scale).

Parametrisation: the N - 1 gaps between consecutive log-levels are (log sigma_max - log sigma_min)
softmax(theta), so any theta gives strictly decreasing levels between the fixed ends. theta starts
at the EDM rho = `init_rho` levels (which are also the "before" the errors are compared with:
`EDMDiscretization(sigma_min, sigma_max, rho)`, as `discretization=edm` would sample).

Gradients, `gradient=`:
- "autograd": the exact gradient of the error, back-propagated through `sample` (`time_steps`,
  `Problem` and the solvers keep the graph; the host copies of sigma only decide churn, which is
  off). The right choice for a trained network, whose sampler output is smooth in the levels.
- "smoothed": the gradient of the error averaged over Gaussian perturbations of theta of size
  `smoothing`, estimated from `directions` antithetic pairs of sampler runs (no backward pass).
  For the ideal denoiser of a finite data set (`edm_lab.nets.ideal`): at small sigma it snaps to
  the nearest training image, so each seed's final sample, and its error, is piecewise constant in
  the levels; the exact gradient is zero up to round-off (`autograd` refuses it, saying so), while
  the mean error over many seeds still depends on the levels.
Adam runs `iterations` steps with the learning rate decayed along a cosine from `lr` to lr / 10;
the exact training error is evaluated at every iterate and the best one is returned (Adam on a
rugged error oscillates). Deterministic: the latents come from the seeds and the smoothing
directions from a generator seeded with `seed`; nothing draws from the global generators.

The result records the levels, the train and held-out RMS errors before and after, and the
provenance (solver, schedule, scaling, denoiser, range, seeds, reference, optimiser) that `save`
writes. The levels suit the sampler they were learned with: the same schedule and scaling (the
file records them), churn off.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from edm_lab.atomic import atomic_write_text
from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import (OPTIMIZED_FORMAT, OPTIMIZED_VERSION, Discretization,
                                            EDMDiscretization, parse_optimized_levels)
from edm_lab.design.sampler import round_sigma, sample
from edm_lab.design.schedules import LinearSchedule, NoScaling, Scaling, Schedule
from edm_lab.design.solvers import RK45
from edm_lab.evaluate.sampling import reference_sampler, sample_seeds

GRADIENTS = ("autograd", "smoothed")
LR_FLOOR = 0.1  # the cosine decay ends at lr * LR_FLOOR
VANISHING = 1e-9  # autograd refuses a gradient norm below this times the error it is the gradient of
# A list of numbers as json.dumps(indent=...) lays it out, an element a line (never inside a string: JSON escapes
# newlines there); written on one line instead.
_NUMBER_LIST = re.compile(r"\[\n\s*(-?[0-9][-+0-9.eE]*(?:,\n\s*-?[0-9][-+0-9.eE]*)*)\n\s*\]")


@dataclass
class LearnedSteps:
    """Levels learned by `optimize_time_steps`, their errors and provenance; `save` writes them."""

    num_steps: int
    levels: list[float]  # sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min
    sigma_min: float
    sigma_max: float
    nfe: int
    errors: dict[str, dict[str, float]]  # {"train"|"heldout": {"before"|"after": RMS error}}
    provenance: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # the training RMS error of every iterate

    def entry(self) -> dict[str, Any]:
        """This step count's entry of the file."""
        return {"levels": list(self.levels), "nfe": self.nfe, "rms_error": self.errors, **self.provenance,
                "history": list(self.history)}

    def save(self, path: str | Path, merge: bool = True) -> Path:
        """Write the levels to `path` (JSON, atomically), keeping the file's other step counts when `merge`.

        A file being merged into must be a valid learned-steps file over the same noise range (one
        range per file: `OptimizedDiscretization` takes its noise range from it); this step count's
        entry replaces the one it held.
        """
        path = Path(path)
        steps: dict[int, dict[str, Any]] = {}
        if merge and path.exists():
            try:
                old = parse_optimized_levels(path.read_bytes(), f"{path}")
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot add levels to {path}: {exc}; remove it, or save with merge=False") from exc
            if (old["sigma_min"], old["sigma_max"]) != (self.sigma_min, self.sigma_max):
                raise ValueError(f"cannot add levels over [{self.sigma_min:g}, {self.sigma_max:g}] to {path}, which "
                                 f"holds levels over [{old['sigma_min']:g}, {old['sigma_max']:g}]: one noise range "
                                 "per file, use another file")
            steps = old["steps"]
        steps[self.num_steps] = self.entry()
        doc = {"format": OPTIMIZED_FORMAT, "version": OPTIMIZED_VERSION, "sigma_min": self.sigma_min,
               "sigma_max": self.sigma_max, "steps": {str(n): steps[n] for n in sorted(steps)}}
        text = json.dumps(doc, indent=1, allow_nan=False, default=str)
        text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", "", m.group(1)).replace(",", ", ") + "]", text) + "\n"
        parse_optimized_levels(text, f"{path}")  # what is written must read back
        return atomic_write_text(path, text)


class _Levels(Discretization):
    """Given levels (a tensor, possibly requiring grad) over a fixed range: the sampler's view of theta."""

    def __init__(self, levels: Tensor, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        self.levels, self.range = levels, (sigma_min, sigma_max)

    def noise_range(self, net_sigma_min: float = 0.0, net_sigma_max: float = math.inf) -> tuple[float, float]:
        return self.range

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        assert num_steps == len(self.levels)
        return self.levels.to(dtype=dtype, device=device)


@dataclass
class _Batch:
    latents: Tensor
    class_labels: Tensor | None
    reference: Tensor


def _capture(net, latents: Tensor, class_labels: Tensor | None = None, randn_like=None):
    """A 'sampler' for `sample_seeds` that returns what it is handed: the seeds' latents and labels."""
    return latents, class_labels


def _no_noise(x: Tensor) -> Tensor:
    # Churn is off: the solvers scale their fresh noise by zero. Zeros keep the global generator untouched.
    return torch.zeros_like(x)


def _seed_list(seeds: Iterable[int], name: str) -> list[int]:
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError(f"{name} must hold at least one seed")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds a seed twice")
    return out


def _levels_of(theta: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """sigma_max, the interior levels at cumulative softmax(theta) of the log range, sigma_min."""
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    fractions = torch.cumsum(torch.softmax(theta, 0), 0)[:-1]
    interior = torch.exp(log_max - (log_max - log_min) * fractions)
    return torch.cat([theta.new_tensor([sigma_max]), interior, theta.new_tensor([sigma_min])])


def describe_denoiser(net: nn.Module) -> dict[str, Any]:
    """Class, noise range, provenance and a SHA-256 of the parameters and buffers (what the levels were learned for)."""
    sigma_max = float(getattr(net, "sigma_max", math.inf))
    info: dict[str, Any] = {"class": f"{type(net).__module__}.{type(net).__qualname__}",
                            "sigma_min": float(getattr(net, "sigma_min", 0.0)),
                            "sigma_max": sigma_max if math.isfinite(sigma_max) else None}  # null: unbounded
    if isinstance(net, nn.Module):
        digest = hashlib.sha256()
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        info["content_sha256"] = digest.hexdigest()
    provenance = getattr(net, "provenance", None)
    if provenance is not None:
        info["provenance"] = provenance
    return info


def optimize_time_steps(denoiser: nn.Module, *, num_steps: int, solver, sample_shape: Sequence[int],
                        train_seeds: Iterable[int], heldout_seeds: Iterable[int],
                        schedule: Schedule | None = None, scaling: Scaling | None = None,
                        sigma_min: float | None = None, sigma_max: float | None = None, init_rho: float = 7.0,
                        iterations: int = 100, lr: float = 0.1, gradient: str = "autograd",
                        directions: int = 4, smoothing: float = 0.3, seed: int = 0,
                        reference_steps: int = 256, reference_tolerance: float | None = None,
                        batch_size: int = 256, noise: str = "generators", device: torch.device | str = "cpu",
                        description: Mapping[str, Any] | str | None = None) -> LearnedSteps:
    """Learn sigma_0 > ... > sigma_{N-1} (N = `num_steps`) for `denoiser` and `solver` (see the module docstring).

    `sigma_min`/`sigma_max` (None: EDM's 0.002 and 80) are clamped to the denoiser's range, as the
    sampler clamps them; they stay fixed as the first and last levels. `schedule`/`scaling` default
    to EDM's (sigma(t) = t, s = 1). `description` adds to the denoiser's recorded description.
    Returns the best iterate by training error, with train and held-out RMS errors before (rho =
    `init_rho`) and after.
    """
    start = time.perf_counter()
    schedule, scaling = schedule or LinearSchedule(), scaling or NoScaling()
    if not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(f"num_steps must be an integer >= 3 (sigma_0 and sigma_{{N-1}} are fixed, so fewer steps "
                         f"leave no level to learn), got {num_steps!r}")
    if getattr(solver, "stochastic", False):
        raise ValueError(f"{solver!r} is stochastic: there is no ODE solution to learn the levels against")
    if isinstance(solver, RK45):
        raise ValueError("RK45 takes its own steps (only the first and last level matter): nothing to learn")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    for name, value in (("lr", lr), ("smoothing", smoothing), ("init_rho", init_rho)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be an integer >= 1, got {directions!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    train, heldout = _seed_list(train_seeds, "train_seeds"), _seed_list(heldout_seeds, "heldout_seeds")
    if set(train) & set(heldout):
        raise ValueError(f"train_seeds and heldout_seeds share seeds {sorted(set(train) & set(heldout))[:5]}: "
                         "held-out seeds must be unseen")

    init_disc = EDMDiscretization(sigma_min, sigma_max, rho=init_rho)
    sigma_min, sigma_max = init_disc.noise_range(float(getattr(denoiser, "sigma_min", 0.0)),
                                                 float(getattr(denoiser, "sigma_max", math.inf)))
    if not sigma_min < sigma_max / 2:
        raise ValueError(f"sigma_min={sigma_min:g} must be < sigma_max / 2 = {sigma_max / 2:g}: the reference "
                         "solution ends at min(sigma_min, sigma_max / 2)")
    init = init_disc.sigma_steps(num_steps, sigma_min, sigma_max)
    if not torch.equal(round_sigma(denoiser, init), init):
        raise ValueError("the denoiser rounds sigma to a table of its own (iDDPM): levels learned as continuous "
                         "values would be moved by the rounding")

    reference = reference_sampler(sigma_max, reference_steps, reference_tolerance, sigma_min=sigma_min)
    sample_shape = tuple(int(n) for n in sample_shape)

    def draw(seeds: list[int]) -> list[_Batch]:
        batches = []
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i:i + batch_size]
            latents, labels = sample_seeds(denoiser, sample_shape, _capture, chunk, device, noise)
            ref = sample_seeds(denoiser, sample_shape, reference, chunk, device, noise).x
            batches.append(_Batch(latents, labels, ref.detach().to(torch.float64)))
        return batches

    with torch.no_grad():
        train_batches, heldout_batches = draw(train), draw(heldout)
    elements = math.prod(sample_shape)
    nfe_seen: set[int] = set()

    def run(disc: Discretization, batch: _Batch) -> Tensor:
        """The batch's summed squared error over `disc`'s levels (kept in the graph)."""
        with warnings.catch_warnings():  # `sample` reads the levels' host copies with float(): no gradient needed there
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            result = sample(denoiser, batch.latents, num_steps, schedule=schedule, scaling=scaling,
                            discretization=disc, solver=solver, churn=Churn(), class_labels=batch.class_labels,
                            randn_like=_no_noise)
        nfe_seen.add(result.nfe)
        return (result.x - batch.reference).square().sum()

    def mse(disc: Discretization, batches: list[_Batch]) -> float:
        with torch.no_grad():
            return sum(float(run(disc, b)) for b in batches) / (sum(len(b.latents) for b in batches) * elements)

    def theta_mse(theta: Tensor) -> float:
        return mse(_Levels(_levels_of(theta, sigma_min, sigma_max), sigma_min, sigma_max), train_batches)

    def autograd_step(theta: Tensor) -> float:
        total, count = 0.0, len(train) * elements
        for b in train_batches:  # levels rebuilt per batch: each backward frees its own graph
            loss = run(_Levels(_levels_of(theta, sigma_min, sigma_max), sigma_min, sigma_max), b) / count
            loss.backward()
            total += float(loss)
        return total

    generator = torch.Generator().manual_seed(int(seed))

    def smoothed_gradient(theta: Tensor) -> Tensor:
        u = torch.randn(directions, len(theta), generator=generator, dtype=torch.float64)
        u = u - u.mean(1, keepdim=True)  # softmax ignores a common shift of theta
        grad = torch.zeros_like(theta)
        for u_k in u:
            delta = theta_mse(theta + smoothing * u_k) - theta_mse(theta - smoothing * u_k)
            grad += delta / (2 * smoothing * directions) * u_k
        return grad

    theta = torch.log(-torch.diff(torch.log(init))).detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    history: list[float] = []
    best = (math.inf, theta.detach().clone(), 0)
    for it in range(iterations + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * it / iterations)))
        optimizer.zero_grad()
        if it == iterations:  # the last iterate: evaluated, not stepped from
            loss = theta_mse(theta.detach())
        elif gradient == "autograd":
            loss = autograd_step(theta)
            if it == 0 and not float(theta.grad.norm()) > VANISHING * loss:
                raise ValueError(
                    f"the error's gradient in the levels vanishes (|grad| = {float(theta.grad.norm()):.3g} at an error "
                    f"of {loss:.3g}): each seed's sample is locally constant in the levels, as with the ideal denoiser "
                    "of a finite data set, which snaps to the nearest training image at small sigma; use "
                    "gradient='smoothed'")
        else:
            loss = theta_mse(theta.detach())
            theta.grad = smoothed_gradient(theta.detach())
        history.append(math.sqrt(loss))
        if loss < best[0]:
            best = (loss, theta.detach().clone(), it)
        if it < iterations:
            optimizer.step()

    levels = [float(v) for v in _levels_of(best[1], sigma_min, sigma_max)]
    if not all(a > b for a, b in zip(levels, levels[1:])):
        raise RuntimeError(f"the learned levels collapsed ({levels}): lower lr")
    learned = _Levels(torch.tensor(levels, dtype=torch.float64), sigma_min, sigma_max)
    nfe_seen.clear()
    errors = {name: {"before": math.sqrt(mse(init_disc, batches)), "after": math.sqrt(mse(learned, batches))}
              for name, batches in (("train", train_batches), ("heldout", heldout_batches))}
    (nfe,) = nfe_seen
    denoiser_info = describe_denoiser(denoiser)
    if isinstance(description, str):
        denoiser_info["description"] = description
    elif description is not None:
        denoiser_info.update(description)
    ref_info = ({"solver": "heun", "steps": int(reference_steps)} if reference_tolerance is None
                else {"solver": "rk45", "tolerance": float(reference_tolerance)})
    provenance = {
        "solver": repr(solver), "schedule": repr(schedule), "scaling": repr(scaling), "churn": "none",
        "denoiser": denoiser_info, "sample_shape": list(sample_shape), "noise": noise,
        "train_seeds": train, "heldout_seeds": heldout,
        "reference": {**ref_info, "sigma_start": sigma_max, "sigma_end": sigma_min},
        "init": {"discretization": "edm", "rho": float(init_rho), "levels": [float(v) for v in init]},
        "optimizer": {"name": "adam", "gradient": gradient, "iterations": iterations, "lr": lr,
                      "lr_schedule": f"cosine to lr * {LR_FLOOR:g}", "best_iteration": best[2], "seed": int(seed),
                      **({"directions": directions, "smoothing": smoothing} if gradient == "smoothed" else {})},
        "created": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
    }
    provenance["seconds"] = round(time.perf_counter() - start, 3)
    return LearnedSteps(num_steps, levels, float(sigma_min), float(sigma_max), int(nfe), errors, provenance, history)
