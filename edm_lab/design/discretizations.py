"""Time discretization: the noise levels sigma_0 > ... > sigma_{N-1} a sampler visits (Table 1).

Each discretization knows its default noise range; `noise_range` fills in the defaults and
clamps them to what the denoiser supports, as the reference sampler does. `OptimizedDiscretization`
is the exception: its levels were learned for one range (`edm_lab.evaluate.learned_steps`), so a
denoiser that does not support all of it is refused rather than clamped.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edm_lab.design.schedules import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_S, VPSchedule


def _fractions(num_steps: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """i / (N - 1) for i < N; a single step sits at sigma_max.

    Exactly the reference's `step_indices / (num_steps - 1)`, so that the levels built on it agree
    bit for bit (the reference divides by zero at N = 1).
    """
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    return step_indices / max(num_steps - 1, 1)


def _check_range(sigma_min: float | None, sigma_max: float | None) -> None:
    if sigma_min is not None and sigma_min <= 0:
        raise ValueError(f"discretization.sigma_min must be > 0, got {sigma_min}")
    if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
        raise ValueError(f"discretization.sigma_min ({sigma_min}) must be < discretization.sigma_max ({sigma_max})")


class Discretization:
    """Base: an optional user noise range over the discretization's own defaults."""

    default_sigma_min: float
    default_sigma_max: float

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        _check_range(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def noise_range(self, net_sigma_min: float = 0.0, net_sigma_max: float = math.inf) -> tuple[float, float]:
        """(sigma_min, sigma_max): defaults filled in, then clamped to the denoiser's range."""
        sigma_min = self.default_sigma_min if self.sigma_min is None else self.sigma_min
        sigma_max = self.default_sigma_max if self.sigma_max is None else self.sigma_max
        sigma_min, sigma_max = max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"noise range [{sigma_min}, {sigma_max}] is empty after clamping to the "
                             f"denoiser's [{net_sigma_min}, {net_sigma_max}]")
        return sigma_min, sigma_max

    def sigma_steps(self, num_steps: int, sigma_min: float, sigma_max: float,
                    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """The N noise levels, decreasing from sigma_max to sigma_min (before rounding)."""
        raise NotImplementedError


class VPDiscretization(Discretization):
    """Uniform in t from 1 down to epsilon_s, through the VP schedule fitted to the range."""

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None,
                 epsilon_s: float = VP_EPSILON_S) -> None:
        super().__init__(sigma_min, sigma_max)
        if not 0 < epsilon_s < 1:
            raise ValueError(f"discretization.epsilon_s must lie in (0, 1), got {epsilon_s}")
        self.epsilon_s = epsilon_s
        default = VPSchedule(VP_BETA_D, VP_BETA_MIN)
        self.default_sigma_min = default.sigma(epsilon_s)
        self.default_sigma_max = default.sigma(1.0)

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        orig_t_steps = 1 + _fractions(num_steps, dtype, device) * (self.epsilon_s - 1)
        return VPSchedule.from_range(sigma_min, sigma_max, self.epsilon_s).sigma(orig_t_steps)


class VEDiscretization(Discretization):
    """Geometric in sigma^2 (= t of the VE schedule) from sigma_max^2 to sigma_min^2."""

    default_sigma_min = 0.02
    default_sigma_max = 100.0

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** _fractions(num_steps, dtype, device))
        return orig_t_steps.sqrt()


def iddpm_noise_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """The iDDPM table u_0 > ... > u_M = 0 of noise levels of the cosine schedule (a fresh tensor)."""
    return _iddpm_table(M, C_1, C_2, dtype, torch.device(device)).clone()


@functools.lru_cache(maxsize=None)
def _iddpm_table(M: int, C_1: float, C_2: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Memoised: the sequential recursion costs ~0.2 s and the sampler asks for the table on every
    # batch (inside its timed region). Never handed out itself: callers get a clone.
    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for j in range(M, 0, -1):  # u_{j-1} from u_j, as the recursion runs downward
        u[j - 1] = ((u[j] ** 2 + 1) / (iddpm_alpha_bar(j - 1, M, C_2) / iddpm_alpha_bar(j, M, C_2)).clip(min=C_1) - 1).sqrt()
    return u


def iddpm_alpha_bar(j, M: int, C_2: float) -> Tensor:
    """abar_j = sin^2(pi/2 * j / (M (C_2 + 1)))."""
    j = torch.as_tensor(j)
    return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2


class IDDPMDiscretization(Discretization):
    """N levels picked at evenly rounded positions of the iDDPM table inside the range."""

    default_sigma_min = 0.002
    default_sigma_max = 81.0

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> None:
        super().__init__(sigma_min, sigma_max)
        if M < 1:
            raise ValueError(f"discretization.M must be >= 1, got {M}")
        self.C_1, self.C_2, self.M = C_1, C_2, M

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        u = iddpm_noise_levels(self.M, self.C_1, self.C_2, dtype=dtype, device=device)
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(u_filtered) == 0:
            raise ValueError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
        # The reference's order, (L-1)/(N-1) * i as a Python float times float64 indices: (L-1) * (i/(N-1))
        # rounds differently at some half-way positions (e.g. N=59, step 29). Float64 whatever `dtype`,
        # since these are table positions, not noise levels.
        step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
        positions = ((len(u_filtered) - 1) / max(num_steps - 1, 1) * step_indices).round().to(torch.int64)
        return u_filtered[positions]


class EDMDiscretization(Discretization):
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""

    default_sigma_min = 0.002
    default_sigma_max = 80.0

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0) -> None:
        super().__init__(sigma_min, sigma_max)
        if not rho > 0:
            raise ValueError(f"discretization.rho must be > 0, got {rho}")
        self.rho = rho

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        rho = self.rho
        return (sigma_max ** (1 / rho) + _fractions(num_steps, dtype, device)
                * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


OPTIMIZED_FORMAT = "edm_lab.learned_steps"
OPTIMIZED_VERSION = 1
OPTIMIZED_KEY = "discretization.path"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_optimized_levels(text: str | bytes, where: str) -> dict[str, Any]:
    """The validated content of a learned-steps file (see `OptimizedDiscretization`); `where` names it in errors.

    Returns the document with `steps` keyed by int step count; every entry keeps its provenance.
    Raises ValueError for anything that is not such a file.
    """
    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}; write the file with edm_lab.evaluate.learned_steps."
                          "optimize_time_steps(...).save(path)")

    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not a JSON file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != OPTIMIZED_FORMAT:
        raise bad(f"not a learned-steps file (expected \"format\": \"{OPTIMIZED_FORMAT}\")")
    if type(doc.get("version")) is not int or doc["version"] != OPTIMIZED_VERSION:
        raise bad(f"version {doc.get('version')!r}, this code reads version {OPTIMIZED_VERSION}")
    sigma_min, sigma_max = doc.get("sigma_min"), doc.get("sigma_max")
    if not (_is_real(sigma_min) and _is_real(sigma_max) and 0 < sigma_min < sigma_max):
        raise bad(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: expected finite numbers 0 < sigma_min < sigma_max")
    steps = doc.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise bad("no \"steps\": expected an object mapping step counts to their levels")
    parsed: dict[int, dict[str, Any]] = {}
    for key, entry in steps.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 2 and str(int(key)) == key):
            raise bad(f"step count {key!r}: expected an integer >= 2")
        num_steps = int(key)
        levels = entry.get("levels") if isinstance(entry, dict) else None
        if not isinstance(levels, list) or len(levels) != num_steps or not all(_is_real(v) for v in levels):
            raise bad(f"steps[{key}].levels: expected a list of {num_steps} finite numbers")
        if not all(v > 0 for v in levels) or not all(a > b for a, b in zip(levels, levels[1:])):
            raise bad(f"steps[{key}].levels={levels}: expected positive, strictly decreasing levels")
        if levels[0] != sigma_max or levels[-1] != sigma_min:
            raise bad(f"steps[{key}].levels run from {levels[0]} to {levels[-1]}: expected the file's sigma_max="
                      f"{sigma_max} to sigma_min={sigma_min}")
        parsed[num_steps] = {**entry, "levels": [float(v) for v in levels]}
    return {**doc, "sigma_min": float(sigma_min), "sigma_max": float(sigma_max), "steps": dict(sorted(parsed.items()))}


class OptimizedDiscretization(Discretization):
    """Noise levels learned for a denoiser, solver and step count, read from a JSON file.

    The file is written by `edm_lab.evaluate.learned_steps.optimize_time_steps(...).save(path)`:
    `{"format": "edm_lab.learned_steps", "version": 1, "sigma_min": ..., "sigma_max": ...,
    "steps": {"<N>": {"levels": [sigma_0, ..., sigma_{N-1}], <provenance>}, ...}}`. Every entry runs
    from the file's sigma_max to its sigma_min (those are `default_sigma_min/max`), strictly
    decreasing; the provenance (solver, schedule, denoiser, seeds, errors before and after) is kept
    in `entries` and not interpreted. The file is read and checked once, here: a missing, unreadable
    or malformed file is refused naming `discretization.path`. `fingerprint` is the SHA-256 of its
    bytes, to identify the levels in results (the path alone does not).

    The levels are fixed: there is no sigma_min/sigma_max override, and `sigma_steps` refuses a step
    count the file does not hold. The denoiser's range is not clamped into: levels learned over a
    range the denoiser does not fully support are refused (`noise_range`), since moving the end
    points would change every level the optimiser chose. A denoiser that rounds sigma (iDDPM's table)
    still rounds them in the sampler, as for every discretization; the optimiser refuses such a
    denoiser, so files it writes hold levels that no rounding moves.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = str(path)
        where = f"{OPTIMIZED_KEY}={self.path}"
        try:
            raw = Path(self.path).expanduser().read_bytes()
        except FileNotFoundError as exc:
            raise ValueError(f"{where}: no such file; write it with edm_lab.evaluate.learned_steps."
                             "optimize_time_steps(...).save(path)") from exc
        except OSError as exc:
            raise ValueError(f"{where}: cannot read the file ({exc.strerror or exc})") from exc
        doc = parse_optimized_levels(raw, where)
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.default_sigma_min, self.default_sigma_max = doc["sigma_min"], doc["sigma_max"]
        self.entries: dict[int, dict[str, Any]] = doc["steps"]
        self.levels: dict[int, tuple[float, ...]] = {n: tuple(e["levels"]) for n, e in self.entries.items()}

    @property
    def step_counts(self) -> list[int]:
        """The step counts the file holds levels for, ascending."""
        return list(self.levels)

    def noise_range(self, net_sigma_min: float = 0.0, net_sigma_max: float = math.inf) -> tuple[float, float]:
        """The file's (sigma_min, sigma_max); refused where the denoiser does not support all of it."""
        lo, hi = self.default_sigma_min, self.default_sigma_max
        if lo < net_sigma_min or hi > net_sigma_max:
            raise ValueError(f"{OPTIMIZED_KEY}={self.path}: the learned levels span [{lo:g}, {hi:g}], outside the "
                             f"denoiser's range [{net_sigma_min:g}, {net_sigma_max:g}]; learned levels are not "
                             "clamped: learn them for this denoiser")
        return lo, hi

    def sigma_steps(self, num_steps, sigma_min, sigma_max, dtype=torch.float64, device="cpu"):
        if num_steps not in self.levels:
            raise ValueError(f"{OPTIMIZED_KEY}={self.path} holds learned levels for num_steps in "
                             f"{self.step_counts}, not {num_steps}: pick one of those (nfe.steps) or learn levels "
                             f"for {num_steps} steps")
        for name, asked, stored in (("sigma_min", sigma_min, self.default_sigma_min),
                                    ("sigma_max", sigma_max, self.default_sigma_max)):
            if not math.isclose(asked, stored, rel_tol=1e-12, abs_tol=0.0):
                raise ValueError(f"{OPTIMIZED_KEY}={self.path}: the learned levels have {name}={stored!r}, "
                                 f"not {asked!r}; they cannot be moved to another range")
        return torch.tensor(self.levels[num_steps], dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"OptimizedDiscretization(path={self.path!r})"
