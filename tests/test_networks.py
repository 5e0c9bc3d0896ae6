"""The paper's networks (DDPM++, NCSN++, ADM) against the reference implementation, and their presets.

The golden cases are the reference NVlabs/edm networks at initialisation inside EDMPrecond /
VPPrecond. Their output layers start at (near) zero, so beyond the golden comparison the tests
below randomise all weights wherever the output must depend on the whole network.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, Precond, VEPrecond, VPPrecond
from edm_lab.nets import NETWORKS, DhariwalUNet, SongUNet, build_network, count_parameters
from edm_lab.nets.layers import Conv2d, attention_weights
from tests.conftest import (NET_PRESETS, GoldenCase, case_label, counterpart, golden_unavailable, load_reference,
                            net_preset, precond_class, reference_cases, reference_dir)

PRECONDS = {"VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "IDDPMPrecond": IDDPMPrecond, "EDMPrecond": EDMPrecond}
SMALL = ["ddpmpp_small", "ncsnpp_small", "adm_small"]


def build_preset(name: str, img_resolution: int, channels: int = 1, label_dim: int = 0, out_channels: int | None = None,
                 **overrides) -> torch.nn.Module:
    kwargs = net_preset(name) | overrides
    kwargs = {k: v for k, v in kwargs.items() if k != "model_type"}
    return build_network(net_preset(name)["model_type"], img_resolution=img_resolution, in_channels=channels,
                         out_channels=out_channels or channels, label_dim=label_dim, **kwargs)


def randomize_(net: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised output layers no longer hide the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def one_hot(n: int, label_dim: int, seed: int = 0) -> torch.Tensor:
    return torch.eye(label_dim)[torch.randint(label_dim, (n,), generator=torch.Generator().manual_seed(seed))]


# ---------------------------------------------------------------------------------------------
# Golden cases: state_dict compatibility and outputs of the reference networks.

def check_network_case(case: dict) -> None:
    """One case of network_cases.pt: parameter names, shapes and outputs of the reference network."""
    kwargs = dict(case["network_kwargs"])
    net = build_network(counterpart(kwargs.pop("model_type"), {name: name for name in NETWORKS}, "network"), **kwargs)
    precond = precond_class(case["precond_class"])(model=net)
    reference_state = case["state_dict"]

    ours = precond.state_dict()
    assert set(ours) == set(reference_state), set(ours) ^ set(reference_state)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference_state.items()}
    precond.load_state_dict(reference_state, strict=True)
    precond.eval()

    with torch.no_grad():
        out = precond(case["x"], case["sigma"], case["class_labels"], augment_labels=case["augment_labels"])
        inner = net(case["x"], case["inner_noise_labels"], case["class_labels"], case["augment_labels"])
    assert out.dtype == torch.float32 and out.shape == case["output"].shape
    torch.testing.assert_close(out, case["output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inner, case["inner_output"], atol=1e-5, rtol=1e-5)
    # The inner outputs are ~1e-5 at initialisation, so 1e-5 alone would pass almost anything:
    # also demand float32 round-off relative to their scale (exactly zero for ADM's zero out_conv).
    scale = case["inner_output"].abs().max().item()
    torch.testing.assert_close(inner, case["inner_output"], atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("golden", reference_cases("network_cases.pt"))
def test_matches_reference_network(golden: GoldenCase):
    _, case = golden.load()
    check_network_case(case)


@pytest.mark.golden
@pytest.mark.parametrize("model_type", sorted(NETWORKS))
def test_every_network_has_a_golden_case(model_type):
    """A golden set without some network leaves it unchecked: skipped locally, a failure under CI."""
    cases = load_reference("network_cases.pt")["cases"]
    covered = [case_label(i, c) for i, c in enumerate(cases) if c["network_kwargs"]["model_type"] == model_type]
    if not covered:
        golden_unavailable(reference_dir() / "network_cases.pt",
                           f"no case builds {model_type}, so it goes unchecked against the reference")


@pytest.mark.golden  # reads the real golden file
def test_regenerated_network_cases_are_checked_case_by_case(tmp_path):
    """A subset of the cases, with the class name spelled otherwise, runs the same check; unknown names fail clearly."""
    cases = load_reference("network_cases.pt")["cases"]
    adm_vp = next(c for c in cases if c["network_kwargs"]["model_type"] == "DhariwalUNet" and c["precond"] == "vp")
    torch.save({"cases": [dict(adm_vp, precond_class="vpPrecond")]}, tmp_path / "network_cases.pt")
    [param] = reference_cases("network_cases.pt", directory=tmp_path)
    assert param.id == "adm-vp-vpPrecond"
    _, case = param.values[0].load()
    check_network_case(case)
    with pytest.raises(AssertionError):
        check_network_case(dict(case, output=case["output"] * 1.001 + 1e-4))
    with pytest.raises(pytest.fail.Exception, match="preconditioner 'FancyPrecond' has no counterpart"):
        check_network_case(dict(case, precond_class="FancyPrecond"))
    with pytest.raises(pytest.fail.Exception, match="network 'UNet3000' has no counterpart"):
        check_network_case(dict(case, network_kwargs=dict(case["network_kwargs"], model_type="UNet3000")))


# ---------------------------------------------------------------------------------------------
# Registry and presets.

def test_build_network_rejects_unknown_model_type():
    with pytest.raises(ValueError, match=r"'UNet3000'.*DhariwalUNet.*SongUNet"):
        build_network("UNet3000", img_resolution=8, in_channels=1, out_channels=1)


def test_registry_and_network_attributes():
    assert NETWORKS == {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
    for name in SMALL:
        net = build_preset(name, 16, channels=3, label_dim=10, out_channels=6, augment_dim=9)
        assert (net.img_resolution, net.in_channels, net.out_channels, net.label_dim, net.augment_dim) == \
            (16, 3, 6, 10, 9)


def test_presets_name_the_architecture_only():
    data_keys = {"img_resolution", "in_channels", "out_channels", "label_dim"}
    for name in NET_PRESETS:
        preset = net_preset(name)
        assert preset["model_type"] in NETWORKS, name
        assert not data_keys & set(preset), name


# Parameter counts of the official configurations (built on the meta device: no memory, no init cost).
# ddpmpp_cifar10 reproduces the reference's 55,733,891 (unconditional, augment_dim=9); the ADM count is
# the paper's 295.9M.
OFFICIAL = {
    "ddpmpp_cifar10": (32, 0, 55_733_891),
    "ncsnpp_cifar10": (32, 0, 56_397_827),
    "ddpmpp_ffhq64": (64, 0, 61_805_571),
    "ncsnpp_ffhq64": (64, 0, 62_761_091),
    "ddpmpp_afhqv2_64": (64, 0, 61_805_571),
    "ncsnpp_afhqv2_64": (64, 0, 62_761_091),
    "adm_imagenet64": (64, 1000, 295_899_267),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_preset_parameter_counts(name):
    resolution, label_dim, expected = OFFICIAL[name]
    with torch.device("meta"):
        net = build_preset(name, resolution, channels=3, label_dim=label_dim)
    count = count_parameters(net)
    print(f"{name}: {count:,} parameters")
    assert count == expected
    if "cifar10" in name:
        assert abs(count - 56e6) < 0.01 * 56e6


def test_official_preset_settings_follow_the_reference_training_table():
    assert net_preset("ddpmpp_cifar10")["dropout"] == 0.13 and net_preset("ddpmpp_cifar10")["channel_mult"] == [2, 2, 2]
    assert net_preset("ncsnpp_ffhq64")["dropout"] == 0.05 and net_preset("ncsnpp_ffhq64")["channel_mult"] == [1, 2, 2, 2]
    assert net_preset("ddpmpp_afhqv2_64")["dropout"] == 0.25
    assert net_preset("ncsnpp_cifar10")["resample_filter"] == [1, 3, 3, 1]
    assert net_preset("ncsnpp_cifar10")["encoder_type"] == "residual"
    adm = net_preset("adm_imagenet64")
    assert (adm["model_channels"], adm["channel_mult"], adm["num_blocks"], adm["attn_resolutions"], adm["dropout"]) \
        == (192, [1, 2, 3, 4], 3, [32, 16, 8], 0.10)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("resolution", [8, 16])
def test_small_presets_run_with_class_and_augment_labels(name, resolution):
    torch.manual_seed(0)
    net = build_preset(name, resolution, channels=1, label_dim=10, augment_dim=9)
    assert count_parameters(net) < 600_000  # adm_small needs 64 channels for one 64-channel attention head
    n_attn = sum(getattr(m, "num_heads", 0) > 0 for m in net.modules())
    assert n_attn >= 1, "small presets attend at the lowest resolution"
    x = torch.randn(4, 1, resolution, resolution)
    y = net(x, torch.randn(4), one_hot(4, 10), torch.randn(4, 9))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_train_step(name):
    """Every parameter of a small preset gets a finite gradient (timings: bench/network_throughput.py)."""
    torch.manual_seed(0)
    net = build_preset(name, 8, channels=1, label_dim=10).train()
    x, labels = torch.randn(64, 1, 8, 8), one_hot(64, 10)
    net(x, torch.randn(64), labels).square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Label dropout, reduced precision.

@pytest.mark.parametrize("name", ["ddpmpp_small", "adm_small"])
def test_label_dropout_only_in_training(name):
    torch.manual_seed(0)
    net = randomize_(build_preset(name, 8, channels=1, label_dim=10, dropout=0.0, label_dropout=0.5))
    x, noise, labels = torch.randn(32, 1, 8, 8), torch.randn(32), one_hot(32, 10)
    with torch.no_grad():
        net.eval()
        conditional = net(x, noise, labels)
        unconditional = net(x, noise, torch.zeros_like(labels))
        assert torch.equal(net(x, noise, labels), conditional)  # eval: labels always kept
        net.train()
        torch.manual_seed(1)
        dropped = net(x, noise, labels)
    per_row = lambda a, b: (a - b).flatten(1).abs().amax(1)
    assert (per_row(conditional, unconditional) > 1e-3).all()
    kept = per_row(dropped, conditional) < 1e-5
    zeroed = per_row(dropped, unconditional) < 1e-5
    assert (kept ^ zeroed).all(), "every row is either conditioned or has its labels dropped"
    assert kept.any() and zeroed.any()


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inner_network(name, dtype):
    torch.manual_seed(0)
    net = randomize_(build_preset(name, 8, channels=1, label_dim=10, augment_dim=9), scale=0.05).eval()
    x, noise, labels, aug = torch.randn(8, 1, 8, 8), torch.randn(8), one_hot(8, 10), torch.randn(8, 9)
    with torch.no_grad():
        reference = net(x, noise, labels, aug)
        try:
            low = net(x.to(dtype), noise, labels, aug)
        except RuntimeError as err:  # some CPU builds lack fp16 kernels
            pytest.skip(f"{dtype} not supported on this device: {err}")
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert all(p.dtype == torch.float32 for p in net.parameters()), "master weights stay float32"
    error = (low.float() - reference).norm() / reference.norm()
    assert error < 0.05, f"relative error {error:.3g}"


def test_attention_weights_in_float32_and_backward():
    torch.manual_seed(0)
    q, k = torch.randn(6, 16, 10, requires_grad=True), torch.randn(6, 16, 12, requires_grad=True)
    w = attention_weights(q, k)
    expected = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(16), dim=2)
    torch.testing.assert_close(w, expected)
    grad = torch.randn_like(w)
    dq, dk = torch.autograd.grad(w, (q, k), grad)
    edq, edk = torch.autograd.grad(expected, (q, k), grad)
    torch.testing.assert_close(dq, edq)
    torch.testing.assert_close(dk, edk)
    # Half inputs: float32 arithmetic inside, output in the input's dtype.
    w_half = attention_weights(q.detach().to(torch.bfloat16), k.detach().to(torch.bfloat16))
    assert w_half.dtype == torch.bfloat16
    torch.testing.assert_close(w_half.float(), expected.detach(), atol=1e-2, rtol=2e-2)


def test_box_filter_resampling_is_average_pool_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    # The [1,3,3,1] filter preserves constants away from the border and halves/doubles the size.
    smooth_down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert smooth_down(x).shape == (2, 3, 4, 4)
    torch.testing.assert_close(smooth_down(torch.ones(1, 1, 8, 8).expand(1, 3, 8, 8))[..., 1:-1, 1:-1],
                               torch.ones(1, 3, 2, 2))
    fused = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    fused_up = Conv2d(3, 5, kernel=3, up=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    assert fused(x).shape == (2, 5, 4, 4) and fused_up(x).shape == (2, 5, 16, 16)
    # With the box filter, fused upsampling + conv is nearest upsampling followed by the conv.
    torch.manual_seed(0)
    fused_box = Conv2d(3, 5, kernel=3, up=True, resample_filter=[1, 1], fused_resample=True, init_bias=1)
    unfused_box = Conv2d(3, 5, kernel=3, up=True, resample_filter=[1, 1])
    unfused_box.load_state_dict(fused_box.state_dict())
    torch.testing.assert_close(fused_box(x), unfused_box(x))
    assert "resample_filter" in down.state_dict() and "resample_filter" not in Conv2d(3, 3, 3).state_dict()


# ---------------------------------------------------------------------------------------------
# Networks inside the preconditioners.

@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("precond_name", sorted(PRECONDS))
def test_networks_plug_into_every_preconditioner(name, precond_name):
    torch.manual_seed(0)
    iddpm = precond_name == "IDDPMPrecond"
    net = build_preset(name, 8, channels=1, label_dim=10, out_channels=2 if iddpm else 1, augment_dim=9)
    precond = PRECONDS[precond_name](model=randomize_(net), **({"img_channels": 1} if iddpm else {})).eval()
    assert (precond.img_resolution, precond.img_channels, precond.label_dim) == (8, 1, 10)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([max(precond.sigma_min, 0.01), 1.0, min(precond.sigma_max, 50.0)])
    with torch.no_grad():
        out = precond(x, sigma, one_hot(3, 10), augment_labels=torch.randn(3, 9))
        unlabelled = precond(x, sigma)  # zero labels [1, label_dim], broadcast over the batch
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert unlabelled.shape == x.shape and torch.isfinite(unlabelled).all()


@pytest.mark.parametrize("name", SMALL)
def test_preconditioned_output_is_c_skip_x_plus_c_out_F(name):
    torch.manual_seed(0)
    net = randomize_(build_preset(name, 8, channels=1, label_dim=10, augment_dim=9)).eval()
    precond = EDMPrecond(model=net)
    x, sigma, labels, aug = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.3, 40.0]), one_hot(3, 10), torch.randn(3, 9)
    with torch.no_grad():
        out = precond(x, sigma, labels, augment_labels=aug)
        c_skip, c_out, c_in, c_noise = precond.coefficients(sigma.reshape(-1, 1, 1, 1))
        F_x = net(c_in * x, c_noise.flatten(), labels, aug)
    assert F_x.abs().max() > 1e-2, "randomised network must not be trivially zero"
    torch.testing.assert_close(out, c_skip * x + c_out * F_x)


def test_iddpm_precond_keeps_the_first_img_channels():
    torch.manual_seed(0)
    net = randomize_(build_preset("adm_small", 8, channels=2, out_channels=4)).eval()
    precond = IDDPMPrecond(model=net, img_channels=2)
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        out = precond(x, sigma)
        c_skip, c_out, c_in, c_noise = precond.coefficients(sigma.reshape(-1, 1, 1, 1))
        F_x = net(c_in * x, c_noise.flatten(), None)
    assert F_x.shape[1] == 4
    torch.testing.assert_close(out, c_skip * x + c_out * F_x[:, :2])


def test_precond_label_handling():
    calls = []

    def inner(x, c_noise, class_labels=None):
        calls.append(class_labels)
        return x

    inner.label_dim = 3
    precond = EDMPrecond(model=inner)
    x, sigma = torch.randn(2, 1, 4, 4), torch.ones(2)
    precond(x, sigma)
    assert torch.equal(calls[-1], torch.zeros(1, 3))
    precond(x, sigma, torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.int64))
    assert calls[-1].dtype == torch.float32 and calls[-1].shape == (2, 3)
    EDMPrecond(model=inner, label_dim=0)(x, sigma, torch.ones(2, 3))
    assert calls[-1] is None  # unconditional: labels are not passed on


def test_precond_precision_settings():
    torch.manual_seed(0)
    net = randomize_(build_preset("ddpmpp_small", 8, channels=1), scale=0.05).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        full = EDMPrecond(model=net)(x, sigma)
        for precision in ("fp16", "bf16"):
            precond = EDMPrecond(model=net, precision=precision)
            assert precond.model_dtype(x) == torch.float32  # reduced precision only on CUDA, as the reference
            assert precond.model_dtype(x.to("meta"), force_fp32=True) == torch.float32
            torch.testing.assert_close(precond(x, sigma), full)
            torch.testing.assert_close(precond(x, sigma, force_fp32=True), full)
    with pytest.raises(ValueError, match="precision"):
        EDMPrecond(model=net, precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the reduced-precision preconditioner path runs on CUDA only")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precond_reduced_precision_on_cuda(precision):
    torch.manual_seed(0)
    net = randomize_(build_preset("adm_small", 8, channels=1, label_dim=10), scale=0.05).eval().cuda()
    x, sigma = torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor([0.1, 1.0, 5.0, 20.0], device="cuda")
    with torch.no_grad():
        full = EDMPrecond(model=net)(x, sigma)
        low = EDMPrecond(model=net, precision=precision)(x, sigma)
        forced = EDMPrecond(model=net, precision=precision)(x, sigma, force_fp32=True)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).norm() / full.norm() < 0.05
    torch.testing.assert_close(forced, full)


def test_precond_without_network_keeps_noise_level_interface():
    for cls in PRECONDS.values():
        precond = cls()
        assert isinstance(precond, Precond)
        assert precond.img_resolution is None and precond.img_channels is None and precond.label_dim == 0
        assert precond.sigma_min < precond.sigma_max
        rounded = precond.round_sigma(torch.tensor([1.0]))
        if cls is IDDPMPrecond:  # the nearest table level
            assert rounded.item() in precond.u.tolist() and abs(rounded.item() - 1.0) < 1e-3
        else:
            assert torch.equal(rounded, torch.tensor([1.0]))
