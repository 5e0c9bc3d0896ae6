"""Likelihood through the probability-flow ODE (edm_lab.evaluate.likelihood) against closed forms: Gaussian
data (every marginal is Gaussian), uniform data (exactly 8 bits/dim after dequantisation) and the digits'
ideal denoiser (every marginal is a Gaussian mixture of the training points)."""
from __future__ import annotations

import math

import pytest
import torch

from edm_lab.data.datasets import ArrayDataset, digits
from edm_lab.evaluate.likelihood import (
    bits_per_dim,
    dequantize,
    log_likelihood,
    mean_bits_per_dim,
)
from edm_lab.nets.ideal import ideal_denoiser

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
TIGHT = {"rtol": 1e-7, "atol": 1e-7}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_flushing_denormals():
    """The ideal denoiser's softmax produces subnormal float64 weights: ~10x slower on x86 unless flushed, and the
    flag is the calling thread's (intra-op worker threads keep their own), so these small ops run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


class GaussianData:
    """N(mean, cov) data of shape `shape`: D(x; sigma) = mean + cov (cov + sigma^2 I)^-1 (x - mean), and every
    marginal N(mean, cov + sigma^2 I) in closed form. Optional per-class means (mean + class_shift * label)."""

    def __init__(self, mean, cov, shape=None, class_shift=0.0):
        self.mean, self.cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
        self.dim = len(self.mean)
        self.shape = shape or (self.dim,)
        self.class_shift = class_shift

    def _mean(self, labels, n):
        if labels is None:
            return self.mean.expand(n, -1)
        return self.mean + self.class_shift * labels.to(torch.float64).reshape(-1, 1)

    def __call__(self, x, sigma, class_labels=None):
        n = len(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(n, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        gain = self.cov @ torch.linalg.inv(self.cov + sigma ** 2 * eye)  # (n, d, d)
        mean = self._mean(class_labels, n)
        flat = x.reshape(n, -1).to(torch.float64)
        return (mean + (gain @ (flat - mean).unsqueeze(2)).squeeze(2)).reshape(x.shape)

    def log_density(self, x, sigma, class_labels=None):
        flat = x.reshape(len(x), -1).to(torch.float64)
        cov = self.cov + sigma ** 2 * torch.eye(self.dim, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self._mean(class_labels, len(x)), covariance_matrix=cov)
        return dist.log_prob(flat)

    def prior(self, sigma, class_labels=None):
        return lambda x: self.log_density(x, sigma, class_labels)

    def sample(self, n, seed):
        z = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (self.mean + z @ torch.linalg.cholesky(self.cov).T).reshape(n, *self.shape)


DIAG_MEAN = torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64)
DIAG_VAR = torch.tensor([0.05, 0.3, 1.0, 0.01], dtype=torch.float64)


def diagonal_gaussian() -> GaussianData:
    return GaussianData(DIAG_MEAN, torch.diag(DIAG_VAR))


def full_gaussian() -> GaussianData:
    """Correlated data in 6 dimensions, so that Hutchinson's estimate has a spread with either kind of probe."""
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return GaussianData(torch.linspace(-0.5, 0.5, 6, dtype=torch.float64), 0.1 * a @ a.T + 0.02 * torch.eye(6))


def test_exact_on_gaussian_data_with_the_exact_prior():
    """With the true marginal N(mu, v + sigma_max^2) as the prior, the ODE gives log N(x; mu, v + sigma_min^2):
    exact divergence, different variances per dimension, points up to 3 standard deviations out."""
    data = diagonal_gaussian()
    x = data.sample(8, seed=0)
    x[0] += 3 * DIAG_VAR.sqrt()
    exact = data.log_density(x, SIGMA_MIN)
    result = log_likelihood(data, x, prior=(DIAG_MEAN, DIAG_VAR + SIGMA_MAX ** 2), **TIGHT)
    assert result.divergence == "exact" and result.log_p.dtype == torch.float64
    error = (result.log_p - exact).abs()
    assert (error <= 1e-4 * exact.abs().clamp(min=1)).all(), (error, exact)  # measured max 4e-6 nats
    assert torch.allclose(result.log_p, result.prior_log_p + result.delta_log_p)
    # The solution map is the closed form x(sigma) = mu + sqrt((v + sigma^2) / (v + sigma_min^2)) (x - mu).
    x_max = DIAG_MEAN + ((DIAG_VAR + SIGMA_MAX ** 2) / (DIAG_VAR + SIGMA_MIN ** 2)).sqrt() * (x - DIAG_MEAN)
    assert torch.allclose(result.x_max, x_max, rtol=1e-5)
    # At the default tolerances (Song et al.'s 1e-5) the error is ~1e-4 nats (measured 1.6e-4).
    default = log_likelihood(data, x, prior=(DIAG_MEAN, DIAG_VAR + SIGMA_MAX ** 2))
    assert (default.log_p - exact).abs().max() < 1e-3
    assert (default.nfe < result.nfe).all() and (default.nfe > 0).all()
    # The same with a correlated covariance and the prior given as a log-density.
    data = full_gaussian()
    x = data.sample(4, seed=1)
    result = log_likelihood(data, x, prior=data.prior(SIGMA_MAX), **TIGHT)
    exact = data.log_density(x, SIGMA_MIN)
    assert ((result.log_p - exact).abs() <= 1e-4 * exact.abs().clamp(min=1)).all()


def test_default_prior_error_is_the_neglected_data_moments():
    """With the default N(0, sigma_max^2 I) prior the error is exactly log N(x_T; mu, v + S^2) - log N(x_T; 0, S^2)
    at x_T = x(sigma_max), within the docstring's bound sum_i (v + mu^2 + 2 |mu x_T|) / (2 S^2) + v x_T^2 / (2 S^4)."""
    data = diagonal_gaussian()
    x = data.sample(8, seed=2)
    exact = data.log_density(x, SIGMA_MIN)
    result = log_likelihood(data, x, **TIGHT)
    x_t = result.x_max
    true_prior = (-0.5 * ((x_t - DIAG_MEAN) ** 2 / (DIAG_VAR + SIGMA_MAX ** 2)
                          + torch.log(2 * math.pi * (DIAG_VAR + SIGMA_MAX ** 2)))).sum(1)
    assert torch.allclose(result.log_p + (true_prior - result.prior_log_p), exact, atol=1e-5, rtol=0)
    bound = ((DIAG_VAR + DIAG_MEAN ** 2 + 2 * (DIAG_MEAN * x_t).abs()) / (2 * SIGMA_MAX ** 2)
             + DIAG_VAR * x_t ** 2 / (2 * SIGMA_MAX ** 4)).sum(1)
    error = (result.log_p - exact).abs()
    assert (error <= bound + 1e-5).all(), (error, bound)
    assert error.max() < 0.05  # a few 1e-3 nats here (4 dimensions, |mu| <= 0.5)


@pytest.mark.parametrize("probe_dist", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_and_seeded(probe_dist):
    """The mean of Hutchinson's estimate over many seeds matches the exact divergence's result within its
    standard error (the probe is fixed along the path, so the estimate of the integral is unbiased)."""
    data = full_gaussian()
    x0 = data.sample(1, seed=4)
    exact = log_likelihood(data, x0, prior=data.prior(SIGMA_MAX), divergence="exact")
    n = 256
    result = log_likelihood(data, x0.expand(n, -1), prior=data.prior(SIGMA_MAX), divergence="hutchinson",
                            probes=1, probe_dist=probe_dist, seeds=range(1000, 1000 + n))
    assert result.divergence == "hutchinson"
    estimates = result.log_p
    spread = float(estimates.std())
    sem = spread / math.sqrt(n)
    assert spread > 1e-3, spread  # a real spread (the covariance is not diagonal)
    assert abs(float(estimates.mean() - exact.log_p)) < 4 * sem + 1e-4, (float(estimates.mean()), exact.log_p, sem)
    # More probes per sample shrink the spread as 1 / sqrt(probes).
    more = log_likelihood(data, x0.expand(64, -1), prior=data.prior(SIGMA_MAX), divergence="hutchinson",
                          probes=16, probe_dist=probe_dist, seeds=range(64))
    assert float(more.log_p.std()) < 0.5 * spread
    # Deterministic, and sample i depends on seed i alone (not on its batch or position).
    x = data.sample(3, seed=5)
    batch = log_likelihood(data, x, divergence="hutchinson", probe_dist=probe_dist, seeds=[7, 8, 9])
    again = log_likelihood(data, x, divergence="hutchinson", probe_dist=probe_dist, seeds=[7, 8, 9])
    alone = log_likelihood(data, x[1:2], divergence="hutchinson", probe_dist=probe_dist, seeds=[8])
    swapped = log_likelihood(data, x.flip(0), divergence="hutchinson", probe_dist=probe_dist, seeds=[9, 8, 7])
    assert torch.equal(batch.log_p, again.log_p)
    assert torch.allclose(batch.log_p[1:2], alone.log_p, atol=1e-8, rtol=0)
    assert torch.allclose(batch.log_p, swapped.log_p.flip(0), atol=1e-8, rtol=0)
    other = log_likelihood(data, x[1:2], divergence="hutchinson", probe_dist=probe_dist, seeds=[10])
    assert not torch.allclose(alone.log_p, other.log_p)


def test_divergence_choice_and_arguments():
    """auto = exact up to 64 dimensions; Hutchinson needs seeds; bits_per_dim checks the data's kind."""
    small = GaussianData(torch.zeros(64), 0.1 * torch.eye(64))
    big = GaussianData(torch.zeros(65), 0.1 * torch.eye(65))
    x_small, x_big = small.sample(2, seed=0), big.sample(2, seed=0)
    assert log_likelihood(small, x_small, sigma_min=0.5, sigma_max=5.0).divergence == "exact"
    with pytest.raises(ValueError, match="seed"):
        log_likelihood(big, x_big, sigma_min=0.5, sigma_max=5.0)
    # Rademacher probes on a diagonal Jacobian are exact: the estimate equals the exact divergence's result.
    auto = log_likelihood(big, x_big, sigma_min=0.5, sigma_max=5.0, seeds=[0, 1])
    exact = log_likelihood(big, x_big, sigma_min=0.5, sigma_max=5.0, divergence="exact", max_rows=50)
    assert auto.divergence == "hutchinson" and exact.divergence == "exact"
    assert torch.allclose(auto.log_p, exact.log_p, atol=1e-6, rtol=0)
    for bad in ({"divergence": "trace"}, {"sigma_min": 0.0}, {"sigma_min": 90.0}, {"rtol": 0.0}):
        with pytest.raises(ValueError):
            log_likelihood(small, x_small, **bad)
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(small, x_small, seeds=[0, 1], dequantize=True)
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(small, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), seeds=[0, 1], dequantize=False)
    # Float data: the continuous density's bits/dim, -log p / (d ln 2).
    bits = bits_per_dim(small, x_small, seeds=[0, 1], sigma_min=0.5, sigma_max=5.0)
    assert torch.allclose(bits, -log_likelihood(small, x_small, sigma_min=0.5, sigma_max=5.0).log_p / (64 * math.log(2)))


def test_class_labels_reach_each_sample():
    """Conditional data (the mean moves with the label): each sample is evaluated under its own label, also while
    the samples take their own steps and leave the batch one by one."""
    data = GaussianData(torch.zeros(3), torch.diag(torch.tensor([0.2, 0.05, 0.5])), class_shift=0.7)
    labels = torch.tensor([0, 3, 1, 2])
    x = data.sample(4, seed=6) + 0.7 * labels.reshape(-1, 1)
    x[2] += 1.5  # an outlier takes more steps than the others
    result = log_likelihood(data, x, class_labels=labels, prior=data.prior(SIGMA_MAX, labels), **TIGHT)
    exact = data.log_density(x, SIGMA_MIN, labels)
    assert ((result.log_p - exact).abs() <= 1e-4 * exact.abs().clamp(min=1)).all()
    assert len(set(result.nfe.tolist())) > 1  # the samples took their own steps


def test_dequantize_draws_within_each_bin_per_seed():
    images = torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = dequantize(images, seeds=range(5))
    low = images.to(torch.float64) / 128 - 1
    assert x.dtype == torch.float64 and (x >= low).all() and (x < low + 1 / 128).all()
    assert torch.equal(dequantize(images[2:3], seeds=[2]), x[2:3])
    assert torch.equal(dequantize(images, seeds=range(5)), x)
    assert not torch.equal(dequantize(images[2:3], seeds=[3]), x[2:3])


def _pixel_gaussian(mean: float, var: float, shape: tuple[int, ...]) -> GaussianData:
    d = math.prod(shape)
    return GaussianData(torch.full((d,), mean), var * torch.eye(d), shape=shape)


def test_dequantised_bits_per_dim_of_a_gaussian_model():
    """uint8 images under N(m, v) per pixel in [-1, 1]: per sample, bits/dim = -log N(x; m, v + sigma_min^2) / (d ln 2)
    + 7 at the dequantised x of its seed; over seeds, the mean matches the closed form of E_u over the bins."""
    mean, var, shape = 0.1, 0.2, (1, 2, 2)
    data = _pixel_gaussian(mean, var, shape)
    prior = (mean, var + SIGMA_MAX ** 2)
    images = torch.tensor([[[[0, 64], [128, 255]]], [[[30, 200], [100, 140]]]], dtype=torch.uint8)
    seeds = [11, 12]
    bits = bits_per_dim(data, images, seeds=seeds, prior=prior, **TIGHT)
    x = dequantize(images, seeds=seeds)
    closed = -data.log_density(x, SIGMA_MIN) / (4 * math.log(2)) + 7
    assert torch.allclose(bits, closed, atol=1e-5, rtol=0), (bits, closed)  # measured 1e-6
    # Monte Carlo over the dequantisation noise of one image against E_u in closed form: with
    # x = c + w (u - 1/2), w = 1/128, c the bin's centre, E (x - m)^2 = (c - m)^2 + w^2 / 12.
    n = 400
    image = images[1:2].expand(n, -1, -1, -1)
    bits = bits_per_dim(data, image, seeds=range(n), prior=prior)
    total_var = var + SIGMA_MIN ** 2
    centre = (images[1].to(torch.float64) + 0.5) / 128 - 1
    expected_nats = 0.5 * (((centre - mean) ** 2 + (1 / 128) ** 2 / 12) / total_var + math.log(2 * math.pi * total_var))
    expected = float(expected_nats.mean()) / math.log(2) + 7
    sem = float(bits.std()) / math.sqrt(n)
    assert abs(float(bits.mean()) - expected) < 4 * sem + 1e-5, (float(bits.mean()), expected, sem)
    mean_bits, mean_sem, _ = mean_bits_per_dim(data, image[:40], seeds=list(range(40)), batch_size=16, prior=prior)
    assert mean_bits == pytest.approx(float(bits[:40].mean()), abs=1e-9) and mean_sem > 0


class UniformData:
    """U[-1, 1] per element: D(x; sigma) = x + sigma (phi(a) - phi(b)) / (Phi(b) - Phi(a)), a, b = (-1 - x, 1 - x) / sigma
    (the mean of the truncated normal), and p_sigma(x) = prod (Phi(b) - Phi(a)) / 2."""

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        a, b = (-1 - x) / sigma, (1 - x) / sigma
        phi = lambda z: torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        mass = torch.special.ndtr(b) - torch.special.ndtr(a)
        return x + sigma * (phi(a) - phi(b)) / mass


def test_uniform_density_is_exactly_eight_bits_per_dim():
    """A uniform density on [-1, 1]^d has p_x = 2^-d: -log2 p_x / d = 1 bit, plus 7 from the map [0, 256) -> [-1, 1)
    (dx/dy = 1/128): exactly 8 bits/dim for pixels away from the edges (2..253: >= 7.8 sigma_min inside)."""
    images = torch.randint(2, 254, (3, 3, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    # p_{sigma_max} = U[-1, 1] * N(0, S^2) is N(0, S^2 + 1/3) but for its 4th cumulant: ~1e-10 nats per dimension.
    bits = bits_per_dim(UniformData(), images, seeds=[0, 1, 2], prior=(0.0, SIGMA_MAX ** 2 + 1 / 3), **TIGHT)
    assert torch.allclose(bits, torch.full_like(bits, 8.0), atol=1e-5, rtol=0), bits
    # The default prior neglects the variance 1/3: a small error, within the docstring's bound (m = 0).
    default = bits_per_dim(UniformData(), images, seeds=[0, 1, 2])
    assert (default - 8).abs().max() < 1e-3


@pytest.fixture(scope="module")
def quantised_digits():
    """64 training digits stored as uint8 pixels (raw storage) and their ideal denoiser."""
    floats = digits(limit=64).samples
    raw = ((floats.to(torch.float64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    dataset = ArrayDataset("digits-uint8", raw=raw)
    return dataset, ideal_denoiser(dataset)


def mixture_log_density(dataset: ArrayDataset, sigma: float):
    """log p_sigma of the ideal denoiser's data: (1/n) sum_i N(x; y_i, sigma^2 I)."""
    y = dataset.samples.to(torch.float64).reshape(len(dataset), -1)

    def log_density(x):
        flat = x.reshape(len(x), -1).to(torch.float64)
        d = flat.shape[1]
        dist_sq = torch.cdist(flat, y).square()
        return (torch.logsumexp(-dist_sq / (2 * sigma ** 2), 1) - math.log(len(y))
                - 0.5 * d * math.log(2 * math.pi * sigma ** 2))
    return log_density


def with_prior(result, log_prior):
    """log p of `result`'s trajectory under another prior at sigma_max (the path does not depend on the prior)."""
    return result.log_p - result.prior_log_p + log_prior(result.x_max)


def test_ideal_denoiser_of_digits(quantised_digits):
    """The digits' ideal denoiser: finite bits/dim on training digits, equal to the Gaussian-mixture closed form
    (given the mixture as the prior), and far fewer than on uniform noise images."""
    dataset, net = quantised_digits
    train, seeds = dataset.raw[:2], [0, 1]
    x = dequantize(train, seeds=seeds)
    result = log_likelihood(net, x)  # the defaults: sigma in [0.002, 80], exact divergence in 64 dimensions, 1e-5
    assert result.divergence == "exact"
    bits = result.bits_per_dim + 7
    assert torch.isfinite(bits).all() and (bits > 0).all() and (bits < 8).all(), bits  # measured ~1.8-2.3
    # With the exact prior (the mixture at sigma_max) the ODE gives the mixture at sigma_min.
    exact = mixture_log_density(dataset, SIGMA_MIN)(x)
    via_ode = with_prior(result, mixture_log_density(dataset, SIGMA_MAX))
    assert ((via_ode - exact).abs() <= 2e-4 * exact.abs()).all(), (via_ode, exact)  # measured <= 6e-5 relative
    # The default prior neglects the digits' mean and spread: ~0.01 nats per dimension here.
    assert ((result.log_p - exact).abs() < 0.05 * 64).all()

    # Noise images, far from every training digit: their ODE is stiff at small sigma (the posterior switches
    # between training points within ~sigma^3 / |y_i - y_j|^2 along the path), so train and noise are compared
    # at sigma_min = 0.2.
    noise = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sigma_min = 0.2
    x = dequantize(torch.cat([train, noise]), seeds=[0, 1, 2, 3])
    result = log_likelihood(net, x, sigma_min=sigma_min)
    bits = result.bits_per_dim + 7
    assert torch.isfinite(bits).all()
    assert bits[2:].min() > bits[:2].max() + 5, bits  # measured ~6.1 (train) vs ~18-22 (noise)
    exact = mixture_log_density(dataset, sigma_min)(x)
    via_ode = with_prior(result, mixture_log_density(dataset, SIGMA_MAX))
    error = (via_ode - exact).abs()
    assert (error <= 2e-4 * exact.abs().clamp(min=64)).all(), (via_ode, exact)  # measured <= 1e-4 relative
    assert ((result.log_p - exact).abs() < 0.05 * 64).all()


def test_per_sample_results_do_not_depend_on_the_batch(quantised_digits):
    """Each sample has its own steps and error norm: a sample gives the same result alone, in a batch, or
    in another order (to 1e-8), on the digits' ideal denoiser and on Gaussian data."""
    dataset, net = quantised_digits
    noise = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    images = torch.cat([dataset.raw[10:12], noise])
    seeds = [3, 4, 5]
    kwargs = {"sigma_min": 0.2}
    batch = bits_per_dim(net, images, seeds=seeds, **kwargs)
    order = [2, 0, 1]
    shuffled = bits_per_dim(net, images[order], seeds=[seeds[i] for i in order], **kwargs)
    assert torch.allclose(shuffled, batch[order], atol=1e-8, rtol=0)
    alone = bits_per_dim(net, images[2:], seeds=seeds[2:], **kwargs)
    assert torch.allclose(alone, batch[2:], atol=1e-8, rtol=0)

    data = diagonal_gaussian()
    x = data.sample(5, seed=9)
    x[3] *= 4
    batch = log_likelihood(data, x)
    for i in range(5):
        alone = log_likelihood(data, x[i:i + 1])
        assert torch.allclose(alone.log_p, batch.log_p[i:i + 1], atol=1e-8, rtol=0)
        assert alone.nfe.item() == batch.nfe[i].item()


def test_the_likelihood_task_writes_one_row_per_configuration_and_reuses_it(tmp_path):
    """task=likelihood: bits/dim of the data's first images under the model, one store row, reused on a rerun;
    8-bit dequantisation refused for data that are not images."""
    from edm_lab.tasks.likelihood import run_likelihood
    from edm_lab.tasks.schema import ConfigError
    from tests.test_configs import compose_cfg

    choices = {"data": "digits", "model": "ideal", "precond": "edm"}
    quick = ["task=likelihood", "task.num_images=3", "task.sigma_min=0.2", "data.limit=64", "batch_size=2",
             "logger=csv"]
    row = run_likelihood(compose_cfg(tmp_path, *quick), choices)
    assert row["num_steps"] == 0 and row["num_images"] == 3 and row["task"] == "likelihood"
    assert 0 < row["bits_per_dim"] < 16 and row["bits_per_dim_se"] > 0 and row["nfe"] > 10
    assert row["label"] == "digits/ideal/edm likelihood"
    again = run_likelihood(compose_cfg(tmp_path, *quick), choices)
    assert again["bits_per_dim"] == row["bits_per_dim"] and again["seconds"] == row["seconds"]  # the stored row
    batched = run_likelihood(compose_cfg(tmp_path, *quick, "batch_size=3", "force=true"), choices)
    assert batched["bits_per_dim"] == pytest.approx(row["bits_per_dim"], abs=1e-8)  # image i depends on seed i alone
    other = run_likelihood(compose_cfg(tmp_path, *quick, "task.dequantize=false"), choices)
    assert other["config_hash"] != row["config_hash"]
    with pytest.raises(ConfigError, match="task.dequantize=true needs 8-bit images"):
        run_likelihood(compose_cfg(tmp_path, "task=likelihood", "data=toy2d"), {**choices, "data": "toy2d"})
