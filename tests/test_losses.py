"""Training axes: noise distributions against the reference's draws (KS), weightings exactly, the recipe."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp

from edm_lab.design.losses import (DenoisingLoss, EDMNoise, EDMWeighting, IDDPMNoise, InverseSquareWeighting,
                                   UniformWeighting, VENoise, VPNoise)
from edm_lab.design.precond import IDDPMPrecond
from edm_lab.train.recipe import clean_gradients, ema_beta, lr_at, update_ema
from tests.conftest import GoldenCase, counterpart, load_reference, reference_cases

NOISE = {"vp": VPNoise(), "ve": VENoise(), "edm": EDMNoise()}
WEIGHTING = {"vp": InverseSquareWeighting(), "ve": InverseSquareWeighting(), "edm": EDMWeighting()}


def check_noise_distribution(name: str, case: dict) -> None:
    """Our draws of loss `name` ('vp', 'VELoss', ...) pass a KS test against the reference's; another's fail it."""
    noise = counterpart(name, NOISE, "training loss", suffix="loss")
    ours = noise(20000, generator=torch.Generator().manual_seed(0))
    result = ks_2samp(ours.log().numpy(), case["sigma"].log().numpy())
    assert result.pvalue > 0.01, (name, result)
    # and against a clearly different distribution the same test does reject
    other = NOISE["edm" if noise is not NOISE["edm"] else "ve"](20000, generator=torch.Generator().manual_seed(0))
    assert ks_2samp(other.log().numpy(), case["sigma"].log().numpy()).pvalue < 1e-6


def check_weighting(name: str, case: dict) -> None:
    """lambda(sigma) of loss `name` equals the reference's weights at its own draws."""
    weighting = counterpart(name, WEIGHTING, "training loss", suffix="loss")
    torch.testing.assert_close(weighting(case["sigma"]), case["weight"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("golden", reference_cases("loss_cases.pt"))
def test_noise_distribution_matches_reference_draws(golden: GoldenCase):
    _, case = golden.load()
    check_noise_distribution(golden.key, case)


@pytest.mark.parametrize("golden", reference_cases("loss_cases.pt"))
def test_weighting_matches_reference_exactly(golden: GoldenCase):
    _, case = golden.load()
    check_weighting(golden.key, case)


@pytest.mark.golden  # reads the real golden file
def test_regenerated_loss_cases_are_checked_case_by_case(tmp_path):
    """A subset keyed by class name runs the same checks; a loss with no counterpart here fails naming it."""
    cases = load_reference("loss_cases.pt")["cases"]
    torch.save({"cases": {"EDMLoss": cases["edm"], "VELoss": cases["ve"]}}, tmp_path / "loss_cases.pt")
    params = reference_cases("loss_cases.pt", directory=tmp_path)
    assert [p.id for p in params] == ["EDMLoss", "VELoss"]
    for param in params:
        _, case = param.values[0].load()
        check_noise_distribution(param.values[0].key, case)
        check_weighting(param.values[0].key, case)
    with pytest.raises(AssertionError):  # the draws of another loss are told apart
        check_noise_distribution("EDMLoss", cases["ve"])
    with pytest.raises(AssertionError):
        check_weighting("VELoss", cases["edm"])
    with pytest.raises(pytest.fail.Exception, match="training loss 'iddpm' has no counterpart.*edm, ve, vp"):
        check_weighting("iddpm", cases["edm"])


def test_noise_ranges_and_iddpm_levels():
    g = torch.Generator().manual_seed(1)
    vp = VPNoise()(5000, generator=g)
    assert vp.min() >= 0.0009 and vp.max() <= 152.2
    ve = VENoise(0.02, 100)(5000, generator=g)
    assert ve.min() >= 0.02 and ve.max() <= 100
    edm = EDMNoise(-1.2, 1.2)(20000, generator=g).log()
    assert edm.mean().item() == pytest.approx(-1.2, abs=0.03) and edm.std().item() == pytest.approx(1.2, abs=0.03)
    iddpm = IDDPMNoise()(5000, generator=g)
    u = IDDPMPrecond().u
    assert torch.isin(iddpm, u[:-1]).all() and (iddpm > 0).all()
    assert len(torch.unique(iddpm)) > 900  # j ~ U{0..M-1} covers the table


def test_uniform_weighting_and_bad_values():
    assert torch.equal(UniformWeighting()(torch.tensor([0.1, 5.0])), torch.ones(2))
    for make, key in [(lambda: EDMNoise(P_std=0), "noise.P_std"), (lambda: VENoise(1, 0.5), "noise.sigma_min"),
                      (lambda: VPNoise(epsilon_t=0), "noise.epsilon_t"), (lambda: EDMWeighting(0), "weighting.sigma_data")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            make()


def test_denoising_loss_formula():
    """lambda(sigma) (D(y + n) - y)^2 with the drawn sigma and noise, and augmentation labels passed on."""
    seen = {}

    def denoiser(x, sigma, class_labels=None, augment_labels=None):
        seen.update(x=x, sigma=sigma, augment_labels=augment_labels)
        return torch.zeros_like(x)

    def augment(images):
        return images.flip(3), torch.ones(images.shape[0], 9)

    images = torch.randn(4, 1, 4, 4)
    torch.manual_seed(0)
    loss = DenoisingLoss(EDMNoise(), EDMWeighting())(denoiser, images, augment_pipe=augment)
    torch.manual_seed(0)
    sigma = EDMNoise()(4).reshape(-1, 1, 1, 1)
    y = images.flip(3)
    n = torch.randn_like(y) * sigma
    torch.testing.assert_close(seen["x"], y + n)
    torch.testing.assert_close(seen["sigma"], sigma.flatten())
    assert torch.equal(seen["augment_labels"], torch.ones(4, 9))
    torch.testing.assert_close(loss, EDMWeighting()(sigma) * y ** 2)


def test_learning_rate_warmup_in_images():
    assert lr_at(0, 1e-3, 10_000) == 0
    assert lr_at(5_000_000, 1e-3, 10_000) == pytest.approx(5e-4)
    assert lr_at(20_000_000, 1e-3, 10_000) == 1e-3
    assert lr_at(1, 1e-3, 0) == 1e-3


def test_ema_beta_halflife_and_rampup():
    # Without ramp-up: after halflife images the old weights count one half.
    beta = ema_beta(10**9, 512, 500, None)
    assert beta ** (500_000 / 512) == pytest.approx(0.5, rel=1e-9)
    # Ramp-up caps the half-life at 5 % of the images seen; at 0 images the EMA copies the net.
    assert ema_beta(100_000, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 5_000))
    assert ema_beta(0, 512, 500, 0.05) == 0.0


def test_update_ema_and_clean_gradients():
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, net, 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * before + 0.25 * net.weight.detach())
    net.weight.grad = torch.tensor([[math.nan, math.inf], [-math.inf, 1.0]])
    clean_gradients(net)
    assert net.weight.grad.tolist() == [[0.0, 1e5], [-1e5, 1.0]]
