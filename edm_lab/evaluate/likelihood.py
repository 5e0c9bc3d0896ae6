"""Negative log-likelihood (nats, bits/dim) through the probability-flow ODE. Pure torch.

The probability-flow ODE of the paper (Eq. 4 with s(t) = 1, sigma(t) = t),

    dx/dsigma = f(x, sigma) = (x - D(x; sigma)) / sigma,

carries p_{sigma_min} to p_{sigma_max}. Its solution map in x/s against sigma is the same for every
schedule and scaling, so integrating in sigma loses nothing. Along a solution, the instantaneous change
of variables (Chen et al. 2018, Thm. 1; Song et al. 2021, App. D.2) gives d log p_sigma(x(sigma)) / dsigma
= -div_x f, so

    log p_{sigma_min}(x) = log p_prior(x(sigma_max)) + integral_{sigma_min}^{sigma_max} div_x f(x(sigma), sigma) dsigma,

where div_x f = (d - div_x D) / sigma in d dimensions. The state (x, running integral) is integrated
from sigma_min up to sigma_max in float64 with an adaptive Dormand-Prince 5(4) pair (the tableau and
step control of scipy's RK45, Hairer, Norsett & Wanner Sec. II.4-5) with rtol = atol = 1e-5 by default,
as Song et al.'s likelihood evaluation. Every sample has its own sigma, step size and error norm (RMS
over its own d + 1 state elements): a denoiser call evaluates only the samples still integrating, each
at its own sigma, so a sample's result does not depend on the rest of its batch (integrating the
flattened batch with one step control, as score_sde does with solve_ivp, would make it depend on it).

The prior is N(0, sigma_max^2 I) by default. It neglects the data's own mean m and covariance: the true
p_{sigma_max} is p_data * N(0, sigma_max^2 I). For Gaussian data N(m, diag(v)) the error of log p is, exactly,
log N(x_T; m, v + S^2) - log N(x_T; 0, S^2) with x_T = x(sigma_max), S = sigma_max, bounded per dimension by

    (v_i + m_i^2 + 2 |m_i x_T,i|) / (2 S^2) + v_i x_T,i^2 / (2 S^4)  ~  |m_i| |z_i| / S + O(1 / S^2),  z = x_T / S,

which vanishes as sigma_max grows: for data in [-1, 1] and S = 80, ~|m_i| |z_i| / 80 ~ 1e-2 nats per dimension
for one sample, and ~m^2 / (2 S^2) <= 8e-5 nats per dimension on average over the data (the KL of the two). A given
Gaussian `prior` = (mean, variance), or any log-density, replaces it (the exact prior of Gaussian data or of a
Gaussian mixture, in the tests).

The divergence is exact (d vector-Jacobian products per evaluation, batched in chunks of copies of the
state) up to `EXACT_MAX_DIM` dimensions and Hutchinson's estimator (Hutchinson 1989; Grathwohl et al. 2019)
otherwise: div_x D ~ mean_k eps_k^T (dD/dx) eps_k over `probes` Rademacher or Gaussian probes, one vector-
Jacobian product each, drawn once per sample from its seed's generator and fixed for the whole integration
(so the estimate of the integral is unbiased). The identity part of div f = (d - div D) / sigma is exact.
The cost of one right-hand side is one denoiser call on d (exact) or `probes` copies of the state and one
backward pass; `nfe` counts right-hand sides.

Stiffness: for the ideal denoiser of a finite data set (a Gaussian mixture at every sigma), a point far from
every data point is carried across the boundaries between the mixture's components at small sigma, where the
posterior switches within ~sigma^3 / |y_i - y_j|^2: tens of thousands of evaluations at sigma_min = 0.002 and
rtol = 1e-5, and a loose rtol gives a wrong value (not an error). Trained networks are smooth there.

Discrete data (Ho et al. 2020; Song et al. 2021): 8-bit pixels k in {0..255}^d are dequantised as
y = k + u, u ~ U[0, 1)^d, and mapped to the model's space by x = 2 y / 256 - 1 (dx/dy = 1/128 per
dimension). The model density of y is p_y(y) = p_x(x) (1/128)^d, and by Jensen
-log P(k) <= E_u[-log p_y(k + u)] = E_u[-log p_x(x)] + d log 128, so the discrete NLL bound in bits/dim is

    bits/dim = -log p_x(x) / (d ln 2) + 7    (7 = log2 128 = -log2(2/256)),

one u per image (its mean over a data set is unbiased for the bound). A uniform density on [-1, 1]^d
(p_x = 2^-d) gives exactly 8 bits/dim. For float data the continuous -log p_x(x) / (d ln 2) is given.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edm_lab.design.solvers import RK45

__all__ = ["EXACT_MAX_DIM", "LikelihoodResult", "bits_per_dim", "dequantize", "log_likelihood",
           "mean_bits_per_dim"]

EXACT_MAX_DIM = 64  # divergence="auto": exact up to this many dimensions, Hutchinson above
BITS_OFFSET_8BIT = math.log2(128)  # -log2 |dx/dy| per dimension of y in [0, 256) -> x = 2 y / 256 - 1

Denoiser = Callable[..., Tensor]  # D(x, sigma, class_labels=None) -> x's shape
# (mean, variance) of a Gaussian, broadcastable to a sample, or a callable: x (N, ...) float64 -> log density (N,)
Prior = tuple[Tensor | float, Tensor | float] | Callable[[Tensor], Tensor]

# Dormand-Prince 5(4) and scipy's step control, as the sampler's RK45: nodes, stages, 5th-order weights,
# 5th minus 4th order weights; the augmented state (x, log-density change) needs its own integration loop.
_C, _A, _B, _E = RK45.C, RK45.A, RK45.B, RK45.E
_SAFETY, _MIN_FACTOR, _MAX_FACTOR, _EXPONENT = RK45.SAFETY, RK45.MIN_FACTOR, RK45.MAX_FACTOR, RK45.EXPONENT


@dataclass
class LikelihoodResult:
    """Per-sample results (float64 / int64, one per sample).

    log_p: log p_{sigma_min}(x) in nats; prior_log_p: log p_prior(x(sigma_max)); delta_log_p: the integral
    of div f (log_p = prior_log_p + delta_log_p); x_max: x(sigma_max); nfe: evaluations of the ODE's
    right-hand side, each one denoiser evaluation of the state together with its divergence (the exact
    divergence evaluates D on d copies of the state in that call, Hutchinson's on `probes` copies);
    dim: d; divergence: "exact" or "hutchinson".
    """

    log_p: Tensor
    prior_log_p: Tensor
    delta_log_p: Tensor
    x_max: Tensor
    nfe: Tensor
    dim: int
    divergence: str

    @property
    def nll(self) -> Tensor:
        """-log p in nats."""
        return -self.log_p

    @property
    def bits_per_dim(self) -> Tensor:
        """-log2 p / d of the continuous density (no dequantisation term)."""
        return -self.log_p / (self.dim * math.log(2))


def generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per seed (as `PerSampleNoise`: seed mod 2^32), so draws are device-independent."""
    return [torch.Generator().manual_seed(int(seed) % (1 << 32)) for seed in seeds]


def dequantize(images: Tensor, seeds: Sequence[int] | None = None, *,
               gens: Sequence[torch.Generator] | None = None) -> Tensor:
    """uint8 (N, ...) pixels k -> x = 2 (k + u) / 256 - 1 in [-1, 1) (float64), u ~ U[0, 1) per element from
    sample i's generator (seed i), drawn in float64 on the host: sample i depends on seed i alone."""
    if images.dtype != torch.uint8:
        raise ValueError(f"dequantize takes uint8 pixels, got {images.dtype}")
    gens = _resolve_generators(len(images), seeds, gens, "dequantisation")
    u = torch.stack([torch.rand(images.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return (images.to(torch.float64) + u.to(images.device)) / 128 - 1


def log_likelihood(denoiser: Denoiser, x: Tensor, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   prior: Prior | None = None, divergence: str = "auto",
                   probes: int = 1, probe_dist: str = "rademacher", seeds: Sequence[int] | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, class_labels: Tensor | None = None,
                   max_rows: int = 4096, gens: Sequence[torch.Generator] | None = None) -> LikelihoodResult:
    """log p_{sigma_min}(x) in nats for float samples x (N, ...) in the model's space, through the ODE.

    prior: the density at sigma_max: (mean, variance) of a Gaussian, broadcastable to a sample, or a callable
    giving log p_prior(x) (N,) for x (N, ...) float64; None: N(0, sigma_max^2 I).
    divergence: "exact", "hutchinson" (`probes` probes, `probe_dist` "rademacher" or "gaussian", drawn from
    sample i's generator of `seeds`[i]; seeds are required) or "auto" (exact up to EXACT_MAX_DIM dimensions).
    max_rows bounds the rows of one batched denoiser call (copies of the state for the divergence).
    `gens` (instead of seeds): per-sample generators to continue drawing from (see `bits_per_dim`).
    """
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    n, shape = len(x), tuple(x.shape[1:])
    dim = math.prod(shape)
    if divergence == "auto":
        divergence = "exact" if dim <= EXACT_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    if class_labels is not None and len(class_labels) != n:
        raise ValueError(f"{len(class_labels)} class labels for {n} samples")

    probe_vectors = None
    if divergence == "hutchinson":
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        gens = _resolve_generators(n, seeds, gens, "Hutchinson probes")
        probe_vectors = _draw_probes(gens, probes, dim, probe_dist).to(x.device)  # (N, K, d), fixed throughout

    x = x.detach().to(torch.float64)
    field = _AugmentedField(denoiser, shape, class_labels, probe_vectors, max(1, int(max_rows)))
    with torch.no_grad():
        state = torch.cat([x.reshape(n, dim), torch.zeros(n, 1, dtype=torch.float64, device=x.device)], 1)
        state, nfe = _dopri5(field, state, sigma_min, sigma_max, rtol, atol)
        x_max, delta = state[:, :dim], state[:, dim]
        x_max = x_max.reshape(n, *shape)
        if callable(prior):
            prior_log_p = prior(x_max).to(torch.float64).reshape(n)
        else:
            mean, var = (0.0, sigma_max ** 2) if prior is None else prior
            prior_log_p = _gaussian_log_density(x_max, mean, var)
    return LikelihoodResult(log_p=prior_log_p + delta, prior_log_p=prior_log_p, delta_log_p=delta,
                            x_max=x_max, nfe=nfe, dim=dim, divergence=divergence)


def bits_per_dim(denoiser: Denoiser, images: Tensor, *, seeds: Sequence[int], dequantize: bool | None = None,
                 with_nfe: bool = False, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample bits/dim (float64, (N,)); with `with_nfe`, also each sample's NFE (int64, (N,)).

    uint8 images (N, C, H, W) in [0, 255] (dequantize None or True): the discrete NLL bound
    -log p_x(2 (k + u) / 256 - 1) / (d ln 2) + 7 with u drawn from seed i's generator (which then goes on to
    draw sample i's Hutchinson probes). Float images in the model's space (dequantize None or False): the
    continuous -log p_x(x) / (d ln 2). kwargs go to `log_likelihood`.
    """
    discrete = images.dtype == torch.uint8
    if dequantize is None:
        dequantize = discrete
    if dequantize != discrete:
        raise ValueError("dequantize=True takes uint8 pixels and dequantize=False float samples in the model's "
                         f"space; got {images.dtype} with dequantize={dequantize}")
    gens = _resolve_generators(len(images), seeds, None, "bits_per_dim")
    x = _dequantize(images, gens=gens) if discrete else images
    result = log_likelihood(denoiser, x, gens=gens, **kwargs)
    bits = result.bits_per_dim + (BITS_OFFSET_8BIT if discrete else 0.0)
    return (bits, result.nfe) if with_nfe else bits


def mean_bits_per_dim(denoiser: Denoiser, images: Tensor, *, seeds: Sequence[int], batch_size: int = 64,
                      **kwargs) -> tuple[float, float, float]:
    """Mean bits/dim over `images` (in batches; sample i uses seeds[i]), its standard error (nan for one image)
    and the mean NFE per image."""
    if len(seeds) != len(images):
        raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
    labels = kwargs.pop("class_labels", None)
    bits, nfe = zip(*(bits_per_dim(denoiser, images[i:i + batch_size], seeds=seeds[i:i + batch_size], with_nfe=True,
                                   class_labels=None if labels is None else labels[i:i + batch_size], **kwargs)
                      for i in range(0, len(images), batch_size)))
    bits = torch.cat(bits)
    sem = float(bits.std() / math.sqrt(len(bits))) if len(bits) > 1 else math.nan
    return float(bits.mean()), sem, float(torch.cat(nfe).to(torch.float64).mean())


_dequantize = dequantize  # `bits_per_dim` has a parameter of the same name


def _resolve_generators(n: int, seeds: Sequence[int] | None, gens: Sequence[torch.Generator] | None,
                        what: str) -> list[torch.Generator]:
    if gens is None:
        if seeds is None:
            raise ValueError(f"{what} need one seed per sample (seeds=...): results must not depend on the batch")
        gens = generators(seeds)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} seeds for a batch of {n}")
    return list(gens)


def _draw_probes(gens: Sequence[torch.Generator], probes: int, dim: int, dist: str) -> Tensor:
    if dist == "rademacher":
        draw = [torch.randint(0, 2, (probes, dim), generator=g).to(torch.float64) * 2 - 1 for g in gens]
    elif dist == "gaussian":
        draw = [torch.randn(probes, dim, generator=g, dtype=torch.float64) for g in gens]
    else:
        raise ValueError(f"probe_dist must be 'rademacher' or 'gaussian', got {dist!r}")
    return torch.stack(draw)


def _gaussian_log_density(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """sum over a sample's elements of log N(x; mean, var), per sample."""
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    var = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    if (var <= 0).any():
        raise ValueError("the prior's variance must be > 0")
    log_density = -0.5 * ((x - mean).square() / var + torch.log(2 * math.pi * var))
    return log_density.reshape(len(x), -1).sum(1)


class _AugmentedField:
    """The right-hand side of the augmented ODE on rows (x_flat, integral): ((x - D) / sigma, (d - div D) / sigma)."""

    def __init__(self, denoiser: Denoiser, shape: tuple[int, ...], class_labels: Tensor | None,
                 probes: Tensor | None, max_rows: int) -> None:
        self.denoiser, self.shape, self.labels, self.probes = denoiser, shape, class_labels, probes
        self.dim, self.max_rows = math.prod(shape), max_rows

    def __call__(self, state: Tensor, sigma: Tensor, rows: Tensor) -> Tensor:
        x = state[:, :self.dim]
        quad, denoised = self._quadratic_forms(x, sigma, rows)
        div_d = quad if self.probes is None else quad / self.probes.shape[1]
        s = sigma.unsqueeze(1)
        return torch.cat([(x - denoised) / s, (self.dim - div_d).unsqueeze(1) / s], 1)

    def _vector_chunks(self, rows: Tensor, per_chunk: int) -> Iterator[Tensor]:
        """(b, m, d) chunks of the vectors v of sum_v v^T (dD/dx) v: the basis (exact) or the probes."""
        b, d = len(rows), self.dim
        if self.probes is None:
            eye = torch.eye(d, dtype=torch.float64, device=rows.device)
            for start in range(0, d, per_chunk):
                yield eye[start:start + per_chunk].unsqueeze(0).expand(b, -1, -1)
        else:
            probes = self.probes[rows]
            for start in range(0, probes.shape[1], per_chunk):
                yield probes[:, start:start + per_chunk]

    def _quadratic_forms(self, x: Tensor, sigma: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(sum_v v^T (dD/dx) v per row, D(x; sigma)): one vector-Jacobian product per vector v, on copies of x."""
        b, d = x.shape
        per_chunk = max(1, self.max_rows // b)
        labels = None if self.labels is None else self.labels[rows]
        quad = torch.zeros(b, dtype=torch.float64, device=x.device)
        denoised = None
        for v in self._vector_chunks(rows, per_chunk):
            m = v.shape[1]
            copies = x.detach().unsqueeze(1).expand(b, m, d).reshape(b * m, *self.shape).clone().requires_grad_(True)
            with torch.enable_grad():
                out = self.denoiser(copies, sigma.repeat_interleave(m),
                                    None if labels is None else labels.repeat_interleave(m, dim=0))
                out = out.to(torch.float64)
                if out.shape != copies.shape:
                    raise ValueError(f"the denoiser returned shape {tuple(out.shape)} for input {tuple(copies.shape)}")
                if out.requires_grad:
                    (vjp,) = torch.autograd.grad(out, copies, grad_outputs=v.reshape(out.shape))
                    quad += (vjp.reshape(b, m, d) * v).sum((1, 2))
            if denoised is None:
                denoised = out.detach().reshape(b, m, d)[:, 0]
        return quad, denoised


def _rms(x: Tensor) -> Tensor:
    return x.square().mean(1).sqrt()


def _combine(weights: Sequence[float], k: list[Tensor]) -> Tensor:
    return sum(w * k_j for w, k_j in zip(weights, k) if w)


def _dopri5(fun: Callable[[Tensor, Tensor, Tensor], Tensor], y: Tensor, t0: float, t1: float,
            rtol: float, atol: float) -> tuple[Tensor, Tensor]:
    """Integrate dy/dt = fun(y, t, rows) for every row of y (N, m) from t0 up to t1 > t0, each row with its own
    t, step size and error norm (scipy's RK45 step control, per row). fun gets the rows still integrating
    (`rows` their indices) and their own t. Returns y(t1) and each row's number of evaluations of fun."""
    n = len(y)
    device = y.device
    nfe = torch.zeros(n, dtype=torch.int64, device=device)

    def f_of(y_a: Tensor, t_a: Tensor, rows: Tensor) -> Tensor:
        nfe[rows] += 1
        out = fun(y_a, t_a, rows)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"likelihood ODE: a non-finite drift near sigma={float(t_a.max()):.6g} "
                               "(the denoiser's output is not finite?)")
        return out

    y = y.clone()
    t = torch.full((n,), float(t0), dtype=torch.float64, device=device)
    all_rows = torch.arange(n, device=device)
    f = f_of(y, t, all_rows)

    # Initial step (scipy's select_initial_step, Hairer et al. Sec. II.4), per row: one evaluation.
    interval = t1 - t
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(f / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).minimum(interval)
    f1 = f_of(y + h0.unsqueeze(1) * f, t + h0, all_rows)
    d2 = _rms((f1 - f) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), (h0 * 1e-3).clamp(min=1e-6),
                     (0.01 / d1.maximum(d2)) ** (-_EXPONENT))
    h = (100 * h0).minimum(h1).minimum(interval)

    active = torch.ones(n, dtype=torch.bool, device=device)
    rejected = torch.zeros(n, dtype=torch.bool, device=device)
    while active.any():
        rows = active.nonzero().squeeze(1)
        t_a, h_a, y_a, f_a = t[rows], h[rows], y[rows], f[rows]
        min_step = 10 * (torch.nextafter(t_a, torch.full_like(t_a, math.inf)) - t_a)
        if (rejected[rows] & (h_a < min_step)).any():
            raise RuntimeError(f"likelihood ODE: the step size fell below float resolution near sigma="
                               f"{float(t_a.min()):.6g}; too stiff for rtol={rtol:g}, atol={atol:g}")
        t_new = (t_a + h_a.maximum(min_step)).minimum(torch.full_like(t_a, t1))  # the last step lands on t1
        step = (t_new - t_a).unsqueeze(1)
        k = [f_a]
        for c, a in zip(_C[1:], _A[1:]):
            k.append(f_of(y_a + step * _combine(a, k), t_a + c * step.squeeze(1), rows))
        y_new = y_a + step * _combine(_B, k)
        f_new = f_of(y_new, t_new, rows)
        k.append(f_new)
        error = _rms(step * _combine(_E, k) / (atol + rtol * y_a.abs().maximum(y_new.abs())))
        if not torch.isfinite(error).all():
            raise RuntimeError(f"likelihood ODE: a non-finite error estimate near sigma={float(t_a.min()):.6g}")
        accept = error < 1
        grow = _SAFETY * error ** _EXPONENT  # error 0 -> inf, clamped to the maximum growth
        factor = torch.where(accept, grow.clamp(max=_MAX_FACTOR), grow.clamp(min=_MIN_FACTOR))
        factor = torch.where(accept & rejected[rows], factor.clamp(max=1), factor)
        h[rows], rejected[rows] = (t_new - t_a) * factor, ~accept
        done = rows[accept]
        y[done], t[done], f[done] = y_new[accept], t_new[accept], f_new[accept]
        active[done] = t_new[accept] < t1
    return y, nfe
