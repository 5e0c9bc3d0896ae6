"""CounterNoise: per-seed noise drawn for the whole batch at once, identical to the per-seed loop.

The protocol (sample i depends only on seed i and on the sequence of calls, whatever the batch) is
checked bit for bit against single-seed draws, permuted and split batches, and a pure-Python model of
the hash; the distribution by deterministic statistical tests with bounds of ~5 standard errors.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import pytest
import torch
from scipy import stats

from edm_lab.design.churn import Churn
from edm_lab.design.noise import CounterNoise, pcg_hash, pcg_hash_int
from edm_lab.design.sampler import sample
from edm_lab.design.solvers import EulerMaruyama, PredictorCorrector, SecondOrder

M32 = 0xFFFFFFFF
SEEDS = [0, 1, 2, 7, 1000, 2 ** 32 - 1, 123456789, 5]


# --- a plain model of the construction, one seed and one element at a time (Python ints and math) ---

def pcg(x: int) -> int:
    """Jarzynski & Olano's 32-bit PCG hash, written out independently of the module."""
    state = (x * 747796405 + 2891336453) & M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & M32
    return (word >> 22) ^ word


def model_keys(seed: int, counter: int) -> tuple[int, int, int, int]:
    ck = pcg((counter & M32) ^ pcg((counter >> 32) & M32))
    a = pcg((seed % 2 ** 32) ^ ck)
    b = pcg(a ^ pcg(ck ^ 0x9E3779B9))
    return a, b, pcg(b ^ 0x85EBCA6B), pcg(b ^ 0xC2B2AE35)


def model_randn(seed: int, counter: int, num: int) -> list[float]:
    a, b, k2, k3 = model_keys(seed, counter)
    values = []
    for p in range((num + 1) // 2):
        w1 = pcg(pcg((a + p) & M32) ^ b)
        w2 = pcg(w1 ^ k2)
        w3 = pcg(w2 ^ k3)
        u1 = (((w1 << 21) | (w2 >> 11)) + 1) * 2.0 ** -53
        radius, angle = math.sqrt(-2.0 * math.log(u1)), w3 * (2 * math.pi / 2 ** 32)
        values += [radius * math.cos(angle), radius * math.sin(angle)]
    return values[:num]


def model_randint(seed: int, counter: int, low: int, high: int, num: int) -> list[int]:
    a, b, _, _ = model_keys(seed, counter)
    return [low + ((pcg(pcg((a + e) & M32) ^ b) * (high - low)) >> 32) for e in range(num)]


# --- the calls a sampler makes: latents, class labels, then the solver's noise like its float64 state ---

def draw_sequence(noise: CounterNoise, batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    latents = noise.randn((batch, *shape), dtype=dtype)
    labels = noise.randint(10, size=[batch])
    state = torch.zeros(batch, 3, 5, dtype=torch.float64)  # another shape, odd number of elements
    return [latents, labels, *(noise.randn_like(state) for _ in range(3)), noise.randint(-3, 4, size=(batch, 6))]


def per_seed_loop(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """The reference protocol: one seed at a time, rows concatenated."""
    draws = [draw_sequence(CounterNoise([seed]), 1, shape, dtype) for seed in seeds]
    return [torch.cat(rows) for rows in zip(*draws)]


def assert_all_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and torch.equal(g, e), f"call {k} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 8, 8), (5,), (), (2, 3, 7)])
def test_batch_draws_equal_the_per_seed_loop(shape, dtype):
    batch = draw_sequence(CounterNoise(SEEDS), len(SEEDS), shape, dtype)
    assert batch[0].shape == (len(SEEDS), *shape) and batch[0].dtype == dtype
    assert_all_equal(batch, per_seed_loop(SEEDS, shape, dtype))


def test_permuted_seeds_give_permuted_rows():
    perm = torch.randperm(len(SEEDS), generator=torch.Generator().manual_seed(0))
    whole = draw_sequence(CounterNoise(SEEDS), len(SEEDS), (3, 4, 4), torch.float32)
    permuted = draw_sequence(CounterNoise([SEEDS[i] for i in perm]), len(SEEDS), (3, 4, 4), torch.float32)
    assert_all_equal(permuted, [x[perm] for x in whole])


def test_split_batches_give_the_same_rows():
    whole = draw_sequence(CounterNoise(range(8)), 8, (3, 4, 4), torch.float32)
    halves = [draw_sequence(CounterNoise(seeds), 4, (3, 4, 4), torch.float32) for seeds in (range(4), range(4, 8))]
    assert_all_equal(whole, [torch.cat(rows) for rows in zip(*halves)])
    assert torch.equal(CounterNoise([3, 3]).randn((2, 9))[0], CounterNoise([3, 3]).randn((2, 9))[1])


def test_matches_the_plain_model_of_the_hash():
    noise = CounterNoise(SEEDS)
    first = noise.randn((len(SEEDS), 7), dtype=torch.float64)
    labels = noise.randint(-5, 1000, size=(len(SEEDS), 3))
    second = noise.randn((len(SEEDS), 4), dtype=torch.float64)
    for i, seed in enumerate(SEEDS):
        # log, cos and sin may differ from Python's math in the last ulp; the integer words do not.
        assert first[i].tolist() == pytest.approx(model_randn(seed, 0, 7), rel=1e-13, abs=1e-13)
        assert labels[i].tolist() == model_randint(seed, 1, -5, 1000, 3)
        assert second[i].tolist() == pytest.approx(model_randn(seed, 2, 4), rel=1e-13, abs=1e-13)


def test_pcg_hash_is_exact_in_int64():
    words = torch.tensor([0, 1, 2, 12345, 2 ** 28 - 1, 2 ** 31, 2 ** 32 - 2, M32], dtype=torch.int64)
    words = torch.cat([words, torch.randint(0, 2 ** 32, (1000,), generator=torch.Generator().manual_seed(0))])
    expected = [pcg(w) for w in words.tolist()]
    assert pcg_hash(words).tolist() == expected == [pcg_hash_int(w) for w in words.tolist()]
    # The largest intermediates, 32-bit words times the constants, stay below 2^62.
    assert M32 * 747796405 + 2891336453 < 2 ** 62 and M32 * 277803737 < 2 ** 62 and M32 * 2 ** 31 < 2 ** 63


def test_seeds_wrap_mod_2_32_and_may_be_a_tensor():
    expected = CounterNoise([2 ** 32 - 1, 0, 5, 9]).randn((4, 6))
    assert torch.equal(CounterNoise([-1, 2 ** 32, 2 ** 70 + 5, 9]).randn((4, 6)), expected)
    assert torch.equal(CounterNoise(torch.tensor([-1, 2 ** 32, 5, 9])).randn((4, 6)), expected)
    assert torch.equal(CounterNoise(torch.tensor([3, 4], dtype=torch.int32)).randn((2, 6)),
                       CounterNoise([3, 4]).randn((2, 6)))


def test_values_depend_on_the_element_index_not_the_shape():
    draws = [CounterNoise(SEEDS).randn((len(SEEDS), *shape), dtype=torch.float64) for shape in ((3, 4), (12,), (13,))]
    assert torch.equal(draws[0].flatten(1), draws[1]) and torch.equal(draws[2][:, :12], draws[1])
    rounded = CounterNoise(SEEDS).randn((len(SEEDS), 13), dtype=torch.float32)
    assert torch.equal(rounded, draws[2].to(torch.float32))  # float32: the float64 draw rounded
    assert CounterNoise(SEEDS).randn((len(SEEDS), 13)).dtype == torch.get_default_dtype()


def test_seeds_and_draws_give_different_values():
    noise = CounterNoise(range(64))
    first, second = noise.randn((64, 256), dtype=torch.float64), noise.randn((64, 256), dtype=torch.float64)
    assert not torch.equal(first[0], second[0])
    # No value repeats across seeds or draws (float64 normals from 53 + 32 random bits).
    both = torch.cat([first.flatten(), second.flatten()])
    assert both.unique().numel() == both.numel()


def test_refused_calls_raise_and_consume_no_draw():
    noise = CounterNoise([1, 2, 3])
    with pytest.raises(ValueError, match="does not match"):
        noise.randn((2, 4))
    with pytest.raises(ValueError, match="2\\^31"):
        noise.randint(0, 2 ** 31 + 1, size=(3,))
    with pytest.raises(ValueError, match="2\\^31"):
        noise.randint(5, 5, size=(3,))
    with pytest.raises(TypeError, match="floating"):
        noise.randn((3, 2), dtype=torch.int64)
    with pytest.raises(TypeError, match="bounds"):
        noise.randint(1, 2, 3, size=(3,))
    with pytest.raises(ValueError, match="layout"):
        noise.randn((3, 2), layout=torch.sparse_coo)
    with pytest.raises(TypeError, match="integers"):
        CounterNoise(torch.tensor([1.0, 2.0]))
    assert noise.draws == 0
    assert torch.equal(noise.randn((3, 4)), CounterNoise([1, 2, 3]).randn((3, 4)))
    assert noise.randint(0, 2 ** 31, size=(3, 5)).max() < 2 ** 31  # the widest range is allowed


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Tensor-to-Python conversions raise inside (on a GPU each would wait for the device)."""
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor")

    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_draws_read_nothing_back_to_the_host():
    noise = CounterNoise(range(4))
    x = torch.zeros(4, 3, 5, dtype=torch.float64)
    with no_host_reads():
        draws = [noise.randn(x.shape), noise.randint(10, size=[4]), noise.randn_like(x)]
    assert_all_equal(draws, [CounterNoise(range(4)).randn(x.shape), *draws[1:]])


class GaussianDenoiser:
    """The exact denoiser of N(0, sigma_data^2 I) data."""

    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 0.5

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)


@pytest.mark.parametrize("solver,churn", [(SecondOrder(1.0), Churn(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
                                          (EulerMaruyama(), Churn()), (PredictorCorrector(), Churn())])
def test_image_i_depends_only_on_seed_i_in_the_sampler(solver, churn):
    def run(seeds: list[int]) -> torch.Tensor:
        noise = CounterNoise(seeds)
        latents = noise.randn((len(seeds), 3, 4, 4))
        return sample(GaussianDenoiser(), latents, 6, solver=solver, churn=churn, randn_like=noise.randn_like).x

    whole = run(list(range(10, 18)))
    assert torch.equal(whole, torch.cat([run(seeds) for seeds in ([10, 11, 12], [13], [14, 15, 16, 17])]))
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_the_protocol_and_the_integer_words():
    cuda = draw_sequence(CounterNoise(SEEDS, device="cuda"), len(SEEDS), (3, 4, 4), torch.float64)
    assert all(x.device.type == "cuda" for x in cuda)
    loop = [torch.cat(rows) for rows in zip(*(draw_sequence(CounterNoise([s], device="cuda"), 1, (3, 4, 4), torch.float64)
                                             for s in SEEDS))]
    assert_all_equal(cuda, loop)
    cpu = draw_sequence(CounterNoise(SEEDS), len(SEEDS), (3, 4, 4), torch.float64)
    for c, g in zip(cpu, cuda):  # integers exactly; log/cos/sin up to an ulp or so
        assert torch.equal(c, g.cpu()) if not c.is_floating_point() else torch.allclose(c, g.cpu(), rtol=1e-13, atol=1e-13)


# --- the distribution: ~1e6 values, fixed seeds, bounds of ~5 standard errors ---

ROWS, COLS = 64, 16384  # 2^20 values per draw


@pytest.fixture(scope="module")
def draws() -> tuple[torch.Tensor, torch.Tensor]:
    noise = CounterNoise(range(ROWS))
    return noise.randn((ROWS, COLS), dtype=torch.float64), noise.randn((ROWS, COLS), dtype=torch.float64)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_moments_and_tails(draws):
    x = draws[0].flatten()
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.std()) - 1) < 5 / math.sqrt(n)
    assert abs(float(x.pow(4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis: Var(z^4) = 105 - 9
    for threshold in (3.0, 4.0):  # the tails Box-Muller must get from the 53-bit u1
        p = 2 * stats.norm.sf(threshold)
        assert abs(float((x.abs() > threshold).sum()) - n * p) < 5 * math.sqrt(n * p)


def test_kolmogorov_smirnov_against_the_normal(draws):
    assert stats.kstest(draws[0].flatten().numpy(), "norm").pvalue > 1e-3
    assert stats.kstest(draws[1][:3].flatten().numpy(), "norm").pvalue > 1e-3  # one draw of a few seeds


def test_no_correlation_between_neighbours_seeds_and_draws(draws):
    x, y = draws
    bound = 5 / math.sqrt(x.numel() // 2)
    assert abs(corr(x[:, :-1], x[:, 1:])) < bound  # neighbouring elements
    assert abs(corr(x[:, 0::2], x[:, 1::2])) < bound  # the two values of a Box-Muller pair ...
    assert abs(corr(x[:, 0::2] ** 2, x[:, 1::2] ** 2)) < bound  # ... independent, not just uncorrelated
    assert abs(corr(x[:, 1:-1:2], x[:, 2::2])) < bound  # consecutive pairs
    assert abs(corr(x[:-1], x[1:])) < bound  # seeds s and s + 1
    assert abs(corr(x, y)) < bound  # successive draws of the same seed
    assert abs(corr(x ** 2, y ** 2)) < bound


@pytest.mark.parametrize("low,high", [(0, 10), (-3, 4), (0, 1000)])
def test_randint_is_uniform(low, high):
    values = CounterNoise(range(ROWS)).randint(low, high, size=(ROWS, COLS))
    assert values.dtype == torch.int64 and int(values.min()) == low and int(values.max()) == high - 1
    counts = torch.bincount((values - low).flatten(), minlength=high - low).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_randint_widest_range_is_uniform_in_high_and_low_bits():
    values = CounterNoise(range(ROWS)).randint(0, 2 ** 31, size=(ROWS, COLS)).flatten()
    for bins in (values >> 27, values & 15):
        assert stats.chisquare(torch.bincount(bins, minlength=16).numpy()).pvalue > 1e-3
