"""Guidance (edm_lab/design/guidance.py) on a two-class Gaussian mixture, whose class-conditional and
unconditional denoisers are known in closed form, and on a tiny class-conditional network."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from edm_lab.design.churn import Churn
from edm_lab.design.discretizations import EDMDiscretization
from edm_lab.design.guidance import Autoguidance, ClassifierFreeGuidance
from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, VEPrecond
from edm_lab.design.sampler import PerSampleNoise, noise_levels, sample
from edm_lab.design.solvers import RK45, Euler
from edm_lab.evaluate.sampling import sample_seeds
from edm_lab.nets.denoisers import build_denoiser, network_spec
from tests.conftest import net_preset

DIM = 3
MEANS = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)  # class k: N(MEANS[k], STD^2 I)
STD = 0.3
WEIGHTS = [-0.5, 0.5, 2.0, 3.7]


class MixtureDenoiser:
    """The ideal denoisers of data y ~ N(MEANS[k], std^2 I), k = 0 or 1 with probability 1/2 each.

    Given class k (a one-hot row): D_k(x; sigma) = MEANS[k] + std^2 / (std^2 + sigma^2) (x - MEANS[k]).
    Given no class (a zero row, or no labels): the posterior mean sum_k r_k(x) D_k(x; sigma), with r_k the
    posterior of k given x ~ N(MEANS[k], (std^2 + sigma^2) I). `noise_levels` lends a noise range and rounding.
    `calls` lists the batch sizes of the calls.
    """

    label_dim = 2
    sample_shape = (DIM,)

    def __init__(self, std: float = STD, noise_levels=None, dim: int = DIM) -> None:
        self.std, self.noise_levels, self.sample_shape = std, noise_levels, (dim,)
        self.means = torch.zeros(2, dim, dtype=torch.float64)
        self.means[:, :DIM] = MEANS[:, :dim]
        self.sigma_min = float(getattr(noise_levels, "sigma_min", 0.0))
        self.sigma_max = float(getattr(noise_levels, "sigma_max", math.inf))
        self.calls: list[int] = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma) if self.noise_levels is None else self.noise_levels.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append(len(x))
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        total = self.std ** 2 + sigma ** 2
        deviation = x[:, None, :] - self.means[None]  # [N, class, DIM]
        per_class = self.means[None] + self.std ** 2 / total * deviation
        log_r = -deviation.square().sum(-1) / (2 * total[:, :, 0])  # equal priors and variances
        unconditional = (log_r.softmax(-1)[:, :, None] * per_class).sum(1)
        if class_labels is None:
            return unconditional
        labels = class_labels.to(torch.float64).expand(len(x), -1)
        given = labels.sum(1, keepdim=True)
        conditional = (labels[:, :, None] * per_class).sum(1) / given.clamp(min=1)
        return torch.where(given > 0, conditional, unconditional)


def inputs(n: int = 12, seed: int = 0):
    """x at noise levels from 0.01 to 80 (one per sample) and one-hot labels."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(-2, math.log10(80), n, dtype=torch.float64)
    classes = torch.randint(2, (n,), generator=gen)
    x = MEANS[classes] + (STD ** 2 + sigma[:, None] ** 2).sqrt() * torch.randn(n, DIM, generator=gen,
                                                                               dtype=torch.float64)
    return x, sigma, torch.eye(2, dtype=torch.float64)[classes]


def test_weight_one_is_the_conditional_denoiser_and_zero_the_unconditional():
    net = MixtureDenoiser()
    x, sigma, labels = inputs()
    assert torch.equal(ClassifierFreeGuidance(net, 1.0)(x, sigma, labels), net(x, sigma, labels))
    assert torch.equal(ClassifierFreeGuidance(net, 1.0)(x, sigma, None), net(x, sigma, None))
    unconditional = ClassifierFreeGuidance(net, 0.0)(x, sigma, labels)
    assert torch.equal(unconditional, net(x, sigma, None))  # a zero one-hot row: the mixture's posterior mean
    assert not torch.allclose(unconditional, net(x, sigma, labels))


@pytest.mark.parametrize("w", WEIGHTS)
def test_other_weights_extrapolate_as_the_formula_says(w):
    """D_w = D(none) + w (D(c) - D(none)); with w = 1 + w' it is Ho & Salimans' (1 + w') eps(c) - w' eps(none),
    the same combination in the noise prediction eps = (x - D) / sigma."""
    net = MixtureDenoiser()
    x, sigma, labels = inputs()
    guided = ClassifierFreeGuidance(net, w)(x, sigma, labels)
    conditional, unconditional = net(x, sigma, labels), net(x, sigma, None)
    torch.testing.assert_close(guided, unconditional + w * (conditional - unconditional), rtol=0, atol=0)
    eps = [(x - d) / sigma[:, None] for d in (guided, conditional, unconditional)]
    torch.testing.assert_close(eps[0], w * eps[1] - (w - 1) * eps[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 5])
def test_nfe_counts_both_networks_calls(steps):
    """Heun's 2N - 1 calls of the guided denoiser are 2 (2N - 1) network evaluations; w = 1 or 0 calls one."""
    for make in (lambda net, w: ClassifierFreeGuidance(net, w), lambda net, w: Autoguidance(net, MixtureDenoiser(0.6), w)):
        for w, per_call in ((3.0, 2), (1.0, 1), (0.0, 1), (-1.0, 2)):
            guided = make(MixtureDenoiser(), w)
            inner = [guided.net] + ([guided.guide] if isinstance(guided, Autoguidance) else [])
            labels = torch.eye(2)[torch.arange(5) % 2]
            heun = sample(guided, torch.randn(5, DIM), steps, class_labels=labels)
            assert heun.nfe == per_call * (2 * steps - 1) == sum(len(n.calls) for n in set(inner))
            euler = sample(guided, torch.randn(5, DIM), steps, solver=Euler(), class_labels=labels)
            assert euler.nfe == per_call * steps


def test_adaptive_solver_counts_both_networks_per_sample():
    """RK45 evaluates each sample its own number of times: each evaluation of a guided sample costs 2."""
    net = MixtureDenoiser()
    labels = torch.eye(2)[torch.arange(6) % 2]
    result = sample(ClassifierFreeGuidance(net, 2.5), torch.randn(6, DIM, generator=torch.Generator().manual_seed(0)),
                    8, solver=RK45(rtol=1e-4, atol=1e-4), class_labels=labels)
    per_sample = result.nfe_per_sample
    assert per_sample is not None and (per_sample % 2 == 0).all() and int(per_sample.max()) == result.nfe
    assert int(per_sample.sum()) == sum(net.calls)  # rows the network evaluated, both calls counted
    assert len(set(per_sample.tolist())) > 1  # the samples did take their own steps


def _classes(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def _sample_mixture(guided, n: int = 600, steps: int = 32):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    labels = torch.eye(2, dtype=torch.float64)[_classes(n)]
    return sample(guided, latents, steps, class_labels=labels).x


def test_cfg_sharpens_the_class():
    """w = 1 samples the class's Gaussian; w > 1 raises the data's posterior of the class p(c | x) and pushes the
    samples away from the other class, along the line between the means only: with equal variances
    D(c) - D(none) lies on that line, so the other coordinates are those of the unguided samples.
    (Pushed away from the other class, samples can pass their own mean: the mean distance to it is not
    monotone in w: measured 0.478, 0.475, 0.579 at w = 1, 2, 4; p(c | x) 0.99887, 1 - 2e-9, 1 - 3e-12.)"""
    net, n = MixtureDenoiser(), 600
    classes = _classes(n)
    sign = 1 - 2 * classes.to(torch.float64)  # +1 for class 0 (mean at x_0 = +1), -1 for class 1
    posterior, along, samples = [], [], {}
    for w in (1.0, 2.0, 4.0):
        x = samples[w] = _sample_mixture(ClassifierFreeGuidance(net, w), n)
        log_p = -(x[:, None, :] - MEANS[None]).square().sum(-1) / (2 * STD ** 2)
        posterior.append(log_p.softmax(1)[torch.arange(n), classes].mean().item())
        along.append((x[:, 0] * sign).mean().item())
    x = samples[1.0]  # the class's Gaussian: standard errors ~0.012 (mean), ~0.009 (std)
    assert abs(along[0] - 1) < 0.05 and abs((x - MEANS[classes]).std().item() - STD) < 0.03
    assert posterior[0] < posterior[1] < posterior[2] and posterior[0] < 0.9999 < posterior[1]
    assert along[0] + 0.1 < along[1] < along[2] - 0.1
    for w in (2.0, 4.0):
        torch.testing.assert_close(samples[w][:, 1:], samples[1.0][:, 1:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0, -2.0])
def test_autoguidance_by_the_network_itself_is_the_network(w):
    net = MixtureDenoiser()
    x, sigma, labels = inputs()
    guided = Autoguidance(net, net, w)
    assert torch.equal(guided(x, sigma, labels), net(x, sigma, labels))
    latents = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(2)[torch.tensor([0, 1, 1, 0])]
    ours, plain = sample(guided, latents, 6, class_labels=labels), sample(net, latents, 6, class_labels=labels)
    assert torch.equal(ours.x, plain.x)
    assert ours.nfe == guided.evaluations_per_call * plain.nfe


@pytest.mark.parametrize("w", [1.0, 2.0, 3.0])
def test_autoguidance_by_a_blurred_guide_contracts_each_class_as_predicted(w):
    """Main network of class std s, guide of std g > s: given the class both are linear, a(sigma) = s^2/(s^2 + sigma^2),
    and the guided ODE dx/dsigma = (x - D_w)/sigma solves in closed form: from x(T) = T z,
        x(0) = mu + (T z - mu) (s^2 / (s^2 + T^2))^(w/2) ((g^2 + T^2) / g^2)^((w-1)/2),
    a spread of about s (s/g)^(w-1): w > 1 sharpens each class by the ratio of the two networks' spreads.
    Heun converges to it at second order (max error measured 1.8e-2 at 32 steps, 4.2e-3 at 64)."""
    s, g, n = STD, 0.6, 200
    guided = Autoguidance(MixtureDenoiser(s), MixtureDenoiser(g), w)
    latents = torch.randn(n, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    classes = _classes(n)
    mu = MEANS[classes]
    errors = []
    for steps in (32, 64):
        result = sample(guided, latents, steps, class_labels=torch.eye(2, dtype=torch.float64)[classes])
        assert result.nfe == (1 if w == 1 else 2) * (2 * steps - 1)
        T = noise_levels(guided, steps, EDMDiscretization())[1][1]
        factor = (s ** 2 / (s ** 2 + T ** 2)) ** (w / 2) * ((g ** 2 + T ** 2) / g ** 2) ** ((w - 1) / 2)
        errors.append((result.x - (mu + (T * latents - mu) * factor)).abs().max().item())
    assert errors[1] < 6e-3 and 3.5 < errors[0] / errors[1] < 5, errors
    spread = (result.x - mu).std().item()
    assert abs(spread / (s * (s / g) ** (w - 1)) - 1) < 0.1  # 600 values: standard error ~3%


def test_mismatched_guides_and_misuse_are_refused():
    net = MixtureDenoiser()
    with pytest.raises(ValueError, match=r"shape \(4,\).*network \(3,\)"):
        Autoguidance(net, MixtureDenoiser(0.6, dim=4), 2.0)
    unconditional = MixtureDenoiser(0.6)
    unconditional.label_dim = 0
    with pytest.raises(ValueError, match="label_dim=0, the network label_dim=2"):
        Autoguidance(net, unconditional, 2.0)
    with pytest.raises(ValueError, match="rounds sigma differently"):  # a discrete iDDPM guide, a continuous net
        Autoguidance(net, MixtureDenoiser(0.6, noise_levels=IDDPMPrecond()), 2.0)
    with pytest.raises(ValueError, match="rounds sigma differently"):
        Autoguidance(MixtureDenoiser(noise_levels=IDDPMPrecond()), MixtureDenoiser(0.6, noise_levels=IDDPMPrecond(M=500)), 2.0)
    with pytest.raises(ValueError, match="do not overlap"):
        Autoguidance(MixtureDenoiser(noise_levels=VEPrecond(sigma_min=0.02, sigma_max=1.0)),
                     MixtureDenoiser(0.6, noise_levels=VEPrecond(sigma_min=2.0, sigma_max=100.0)), 2.0)
    with pytest.raises(ValueError, match="class-conditional network"):
        ClassifierFreeGuidance(unconditional, 2.0)
    with pytest.raises(ValueError, match="needs class labels"):
        ClassifierFreeGuidance(net, 2.0)(*inputs()[:2], None)
    with pytest.raises(ValueError, match="one-hot rows"):
        ClassifierFreeGuidance(net, 2.0)(*inputs()[:2], torch.arange(12) % 2)
    with pytest.raises(ValueError, match="finite"):
        ClassifierFreeGuidance(net, float("nan"))


def test_noise_range_and_rounding_are_the_networks():
    """Autoguidance's range is the intersection of both networks'; rounding is theirs (iDDPM's table)."""
    guided = Autoguidance(MixtureDenoiser(noise_levels=VEPrecond(sigma_min=0.02, sigma_max=100.0)),
                          MixtureDenoiser(0.6, noise_levels=VEPrecond(sigma_min=0.002, sigma_max=80.0)), 2.0)
    assert (guided.sigma_min, guided.sigma_max) == (0.02, 80.0)
    iddpm = IDDPMPrecond()
    guided = Autoguidance(MixtureDenoiser(noise_levels=iddpm), MixtureDenoiser(0.6, noise_levels=IDDPMPrecond()), 2.0)
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0], dtype=torch.float64)
    assert torch.equal(guided.round_sigma(sigma), iddpm.round_sigma(sigma))
    assert (guided.sigma_min, guided.sigma_max) == (iddpm.sigma_min, iddpm.sigma_max)
    cfg = ClassifierFreeGuidance(MixtureDenoiser(noise_levels=iddpm), 2.0)
    assert torch.equal(cfg.round_sigma(sigma), iddpm.round_sigma(sigma)) and cfg.sigma_max == iddpm.sigma_max
    assert cfg.label_dim == guided.label_dim == 2


def test_describe_and_provenance_name_the_weight_and_the_guide():
    net, guide = MixtureDenoiser(), MixtureDenoiser(0.6)
    net.provenance = {"network": "main", "checkpoint": "a.pkl"}
    guide.provenance = {"network": "small", "checkpoint": "b.pkl"}
    cfg = ClassifierFreeGuidance(net, 2.5).describe()
    assert cfg["guidance"] == "cfg" and cfg["weight"] == 2.5 and cfg["ho_salimans_weight"] == 1.5
    assert cfg["evaluations_per_call"] == 2 and cfg["network"] == net.provenance
    auto = Autoguidance(net, guide, 2.5)
    assert auto.describe()["guide"] == guide.provenance and auto.describe()["guidance"] == "autoguidance"
    assert auto.provenance == {"network": "main", "checkpoint": "a.pkl", "guidance": "autoguidance",
                               "guidance_weight": 2.5, "guide_network": "small", "guide_checkpoint": "b.pkl"}
    assert ClassifierFreeGuidance(net, 1.0).describe()["evaluations_per_call"] == 1


@pytest.mark.parametrize("guidance", ["cfg", "autoguidance"])
def test_image_i_depends_only_on_seed_i(guidance):
    net = MixtureDenoiser()
    guided = ClassifierFreeGuidance(net, 3.0) if guidance == "cfg" else Autoguidance(net, MixtureDenoiser(0.6), 3.0)

    def sampler(net, latents, **kwargs):
        return sample(net, latents, 6, churn=Churn(S_churn=20), **kwargs)

    whole = sample_seeds(guided, (DIM,), sampler, list(range(10, 18)))
    parts = [sample_seeds(guided, (DIM,), sampler, seeds) for seeds in ([10, 11, 12], [13], [14, 15, 16, 17])]
    assert torch.equal(whole.x, torch.cat([p.x for p in parts]))
    assert whole.nfe == 2 * 11 and not torch.equal(whole.x[0], whole.x[1])
    # sample_seeds drew labels for the wrapper's label_dim (CFG refuses None), after each seed's latents: both
    # classes among these seeds.
    noise = PerSampleNoise(range(10, 18))
    noise.randn((8, DIM))
    assert len(set(noise.randint(2, size=[8]).tolist())) == 2


def tiny_network(label_dim: int = 10, seed: int = 0, precond=EDMPrecond):
    """A small class-conditional DDPM++ in a preconditioner, its parameters perturbed so that zero-initialised
    output layers do not hide the network (nor the labels)."""
    spec = network_spec(functools.partial(precond), net_preset("ddpmpp_small"), 8, 3, label_dim)
    torch.manual_seed(seed)
    net = build_denoiser(spec).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return net


def test_a_real_network_equals_the_formula_from_two_direct_calls():
    net, guide = tiny_network(seed=0), tiny_network(seed=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    labels = torch.eye(10)[torch.tensor([1, 4, 7, 9])]
    w = 2.5
    with torch.no_grad():
        conditional, none, weak = net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels)), guide(x, sigma, labels)
        assert (conditional - none).abs().max() > 1e-3 and (conditional - weak).abs().max() > 1e-3
        torch.testing.assert_close(none, net(x, sigma, None))  # the preconditioner's "no labels": zero rows
        cfg, auto = ClassifierFreeGuidance(net, w), Autoguidance(net, guide, w)
        torch.testing.assert_close(cfg(x, sigma, labels), none + w * (conditional - none), rtol=0, atol=1e-6)
        torch.testing.assert_close(auto(x, sigma, labels), weak + w * (conditional - weak), rtol=0, atol=1e-6)
        result = sample(cfg, x[:2] / 2, 2, class_labels=labels[:2])
    assert result.nfe == 2 * (2 * 2 - 1) and torch.isfinite(result.x).all()
    assert cfg.label_dim == 10 and (cfg.img_channels, cfg.img_resolution) == (3, 8)
    assert cfg.describe()["label_dropout"] == 0.0  # the preset trains without label dropout
    with pytest.raises(ValueError, match="label_dim=0, the network label_dim=10"):
        Autoguidance(net, tiny_network(label_dim=0), w)
    with pytest.raises(ValueError, match="rounds sigma differently"):
        Autoguidance(net, IDDPMPrecond(label_dim=10), w)  # the noise levels of an iDDPM network
