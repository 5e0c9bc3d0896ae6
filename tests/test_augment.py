"""The non-leaky augmentation pipe (edm_lab.train.augment) against the reference's semantics.

Conventions under test (reference NVlabs/edm training/augment.py): coordinates in pixels from the
image centre, x right, y down; a general geometric transform with inverse matrix A shows, at output
pixel x, the input at A x; label layout of the paper's setting:
[xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso w cos r, aniso w sin r, translate x, translate y].
"""
from __future__ import annotations

import math

import pytest
import torch

from edm_lab.train.augment import AugmentPipe, _mirror_index

PAPER = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # reference train.py
EVERYTHING = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
                  translate_frac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def run(pipe: AugmentPipe, images: torch.Tensor, seed: int = 0):
    """The pipe on the global generator seeded with `seed`, without disturbing other tests' RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return pipe(images)


def pattern(n: int, c: int, r: int) -> torch.Tensor:
    """Deterministic structured images in about [-1, 1], different per image and channel."""
    i = torch.arange(r, dtype=torch.float32)
    y, x = torch.meshgrid(i, i, indexing="ij")
    k = torch.arange(n * c, dtype=torch.float32).view(n, c, 1, 1)
    return torch.sin(0.37 * x + 0.23 * y * (1 + k % 3) + k) * torch.cos(0.11 * x * y / r + 0.5 * k)


def centred_coords(r: int):
    c = (r - 1) / 2
    y, x = torch.meshgrid(torch.arange(r) - c, torch.arange(r) - c, indexing="ij")
    return x.double(), y.double()


def blob(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A compact, smooth, asymmetric test function (off-centre ellipse), ~0 at a 32x32 image's border."""
    return torch.exp(-((x - 1.3) ** 2 / (2 * 3.0 ** 2) + (y + 0.7) ** 2 / (2 * 2.0 ** 2)))


def warped_blob(inv: torch.Tensor, r: int = 32) -> torch.Tensor:
    """blob(A x) at every output pixel x, for A = inv [N, 3, 3] (float64)."""
    x, y = centred_coords(r)
    pts = torch.stack([x.flatten(), y.flatten(), torch.ones(r * r, dtype=torch.float64)])  # [3, P]
    src = inv.double() @ pts
    return blob(src[:, 0], src[:, 1]).view(-1, 1, r, r)


def blob_batch(n: int, r: int = 32) -> torch.Tensor:
    x, y = centred_coords(r)
    return blob(x, y).float().expand(n, 1, r, r).contiguous()


def rot(a: torch.Tensor) -> torch.Tensor:
    c, s, z, o = a.cos(), a.sin(), torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).view(-1, 3, 3).double()


def diag(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], -1).view(-1, 3, 3).double()


# ----------------------------------------------------------------------------------------------


def test_paper_setting_has_the_references_nine_label_layout():
    pipe = AugmentPipe(p=0.12, **PAPER)
    assert pipe.label_dim == 9
    assert pipe.label_names == ["xflip", "yflip", "scale", "rotate_frac_cos", "rotate_frac_sin", "aniso_cos",
                                "aniso_sin", "translate_frac_x", "translate_frac_y"]
    assert AugmentPipe(**EVERYTHING).label_dim == 19 and AugmentPipe().label_dim == 0
    assert AugmentPipe(p=0.12, **PAPER).init_kwargs["xflip"] == 1e8
    _, labels = run(AugmentPipe(), torch.zeros(3, 1, 8, 8))  # nothing enabled: no labels at all
    assert labels.shape == (3, 0)


@pytest.mark.parametrize("kwargs", [PAPER, EVERYTHING], ids=["paper", "everything"])
def test_p_zero_is_the_identity_with_zero_labels(kwargs):
    pipe = AugmentPipe(p=0, **kwargs)
    images = pattern(8, 3, 16)
    out, labels = run(pipe, images)
    assert torch.equal(out, images)
    assert labels.shape == (8, pipe.label_dim) and labels.dtype == torch.float32
    assert not labels.any()


def test_golden_reference_labels_and_images():
    # Produced by the reference NVlabs/edm training/augment.py (commit 0a2ff34, CPU, torch 2.14.1)
    # for torch.manual_seed(0), AugmentPipe(p=0.5, **PAPER) and pattern(6, 3, 16): the labels match
    # because the draws are made in the same order; images to float32 rounding.
    labels_ref = [
        [0.0, 0.0, -0.8566746115684509, -0.13795697689056396, 0.5068351030349731, 0.0, 0.0, -0.007537308149039745,
         2.057591199874878],
        [1.0, 1.0, 0.0, -1.9783830642700195, -0.2068009376525879, 0.0, 0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0885837078094482, 0.06271883100271225],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.18942345678806305, 1.0992505550384521],
        [1.0, 0.0, 0.3731146454811096, 0.0, 0.0, -0.1967398077249527, 0.44115012884140015, 0.0, 0.0]]
    sums_ref = [-44.111996, -6.514745, 3.197555, 3.361103, -18.066196, -10.618172]
    squares_ref = [192.203796, 191.602402, 223.591873, 163.208603, 246.068237, 129.233582]
    pixel_ref = [0.250653, 0.413539, 0.82646, 0.043783, -0.751955, -0.34379]  # channel 1, row 5, column 9
    out, labels = run(AugmentPipe(p=0.5, **PAPER), pattern(6, 3, 16), seed=0)
    torch.testing.assert_close(labels, torch.tensor(labels_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double().sum((1, 2, 3)), torch.tensor(sums_ref, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(out.double().square().sum((1, 2, 3)),
                               torch.tensor(squares_ref, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 1, 5, 9], torch.tensor(pixel_ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,dim", [("xflip", 3), ("yflip", 2)])
def test_flips_happen_exactly_where_the_label_says(name, dim):
    images = pattern(64, 3, 8)
    out, labels = run(AugmentPipe(p=1, **{name: 1}), images, seed=1)
    assert labels.shape == (64, 1) and set(labels.flatten().tolist()) == {0.0, 1.0}
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], images[flipped].flip(dim))
    assert torch.equal(out[~flipped], images[~flipped])


def test_integer_rotation_labels_encode_the_quarter_turn():
    images = pattern(64, 1, 8)
    out, labels = run(AugmentPipe(p=1, rotate_int=1), images, seed=2)
    assert labels.shape == (64, 2)
    for img, o, (fx, fy) in zip(images, out, labels.tolist()):
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(int(fx), int(fy))]
        expected = img.flip(2) if k in (1, 2) else img
        expected = expected.flip(1) if k in (2, 3) else expected
        expected = expected.transpose(1, 2) if k in (1, 3) else expected
        assert torch.equal(o, expected)
        if k:  # a quarter turn, not a reflection: the transform is a rotation of the pixel grid
            assert torch.equal(o, torch.rot90(img, {1: 1, 2: 2, 3: -1}[k], dims=(1, 2)))


def test_integer_translation_moves_a_bright_pixel_by_the_labelled_amount():
    r, n, y0, x0 = 32, 64, 14, 17
    images = torch.zeros(n, 1, r, r)
    images[:, 0, y0, x0] = 1.0
    out, labels = run(AugmentPipe(p=1, translate_int=1, translate_int_max=0.125), images, seed=3)
    assert labels.shape == (n, 2) and labels.abs().max() <= 1
    steps = labels * (r * 0.125)  # label = shift / (size * translate_int_max)
    assert torch.allclose(steps, steps.round(), atol=1e-6)  # whole pixels
    assert steps.abs().max() == 4 and (steps != 0).any(1).float().mean() > 0.5
    for img, (tx, ty) in zip(out, steps.round().long().tolist()):
        expected = torch.zeros(1, r, r)
        expected[0, y0 - ty, x0 + tx] = 1.0  # reference convention: right by tx, up by ty
        assert torch.equal(img, expected)


def test_integer_translation_mirrors_at_the_border_without_repeating_the_edge():
    assert _mirror_index(torch.arange(-3, 9), 5).tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(16, 1, 8, 8)
    out, labels = run(AugmentPipe(p=1, translate_int=1, translate_int_max=0.25), ramp, seed=4)
    for img, tx in zip(out, (labels[:, 0] * 2).round().long().tolist()):
        assert img[0, 0].tolist() == [float(_mirror_index(torch.tensor(x - tx), 8)) for x in range(8)]


def test_isotropic_scaling_magnifies_by_two_to_the_label_times_std():
    n = 24
    out, labels = run(AugmentPipe(p=1, scale=1, scale_std=0.2), blob_batch(n), seed=5)
    assert labels.shape == (n, 1) and (labels != 0).all()
    s = torch.exp2(0.2 * labels[:, 0].double())
    expected = warped_blob(diag(1 / s, 1 / s))  # output(x) = input(x / s)
    assert (out.double() - expected).abs().amax() < 0.03
    wrong = warped_blob(diag(s, s))
    big = labels[:, 0].abs() > 0.7
    assert ((out.double() - wrong).abs().amax((1, 2, 3))[big] > 0.06).all()


def test_rotation_labels_and_angle():
    n = 24
    out, labels = run(AugmentPipe(p=1, rotate_frac=1), blob_batch(n), seed=6)
    assert labels.shape == (n, 2)
    cos, sin = labels[:, 0].double() + 1, labels[:, 1].double()
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones(n, dtype=torch.float64), atol=1e-6, rtol=0)
    angle = torch.atan2(sin, cos)
    assert angle.abs().max() <= math.pi and angle.min() < -1 and angle.max() > 1  # U(-pi, pi)
    expected = warped_blob(rot(angle))  # output(x) = input(R(angle) x)
    assert (out.double() - expected).abs().amax() < 0.05
    wrong = warped_blob(rot(-angle))
    turned = sin.abs() > 0.3
    assert ((out.double() - wrong).abs().amax((1, 2, 3))[turned] > 0.2).all()


def test_rotation_by_a_half_turn_matches_the_exact_pixel_rotation():
    # rotate_frac_max limits |angle| < pi * max; the drawn angle near +-pi is compared with the exact
    # 180-degree pixel rotation of an image whose content stays inside (mirror padding irrelevant).
    out, labels = run(AugmentPipe(p=1, rotate_frac=1), blob_batch(256), seed=7)
    half = (labels[:, 0] + 1 < -0.9999)  # cos(angle) ~ -1
    assert half.any()
    exact = blob_batch(1).flip(2, 3)
    assert (out[half] - exact).abs().max() < 0.03


def test_anisotropic_scaling_stretches_along_x_and_squeezes_along_y_without_rotation():
    n = 24
    out, labels = run(AugmentPipe(p=1, aniso=1, aniso_rotate_prob=0, aniso_std=0.2), blob_batch(n), seed=8)
    assert labels.shape == (n, 2) and not labels[:, 1].any()  # r = 0: sin part zero
    s = torch.exp2(0.2 * labels[:, 0].double())
    expected = warped_blob(diag(1 / s, s))  # magnified by s along x, shrunk by s along y
    assert (out.double() - expected).abs().amax() < 0.03


def test_anisotropic_scaling_axis_is_rotated_with_probability_aniso_rotate_prob():
    _, labels = run(AugmentPipe(p=1, aniso=1), torch.zeros(4000, 1, 8, 8), seed=9)
    w = labels.norm(dim=1)
    assert (labels[:, 1] == 0).float().mean() == pytest.approx(0.5, abs=0.04)
    assert w.square().mean() == pytest.approx(1.0, abs=0.1)  # |w| of a standard normal


def test_fractional_translation_moves_content_by_label_times_std_times_size():
    n, r = 24, 32
    out, labels = run(AugmentPipe(p=1, translate_frac=1, translate_frac_std=0.05), blob_batch(n, r), seed=10)
    assert labels.shape == (n, 2)
    t = labels.double() * 0.05 * r
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    inv = torch.stack([one, zero, -t[:, 0], zero, one, -t[:, 1], zero, zero, one], -1).view(n, 3, 3)
    expected = warped_blob(inv)  # output(x) = input(x - t): content moves by +t (x right, y down)
    assert (out.double() - expected).abs().amax() < 0.03


def test_probability_structure_at_p_012():
    n, p = 20000, 0.12
    _, labels = run(AugmentPipe(p=p, **PAPER), torch.zeros(n, 1, 8, 8), seed=11)
    fired = labels != 0
    # xflip's multiplier 1e8 makes it always eligible: label 1 for half of the images.
    assert labels[:, 0].mean() == pytest.approx(0.5, abs=0.015)
    assert fired[:, 1].float().mean() == pytest.approx(p / 2, abs=0.01)  # y-flip: p, then a fair coin
    for cols in ([2], [3, 4], [5, 6], [7, 8]):  # scale, rotation, aniso, translation: p each, independently
        assert fired[:, cols].any(1).float().mean() == pytest.approx(p, abs=0.01)
    assert fired[:, 2:].any(1).float().mean() == pytest.approx(1 - (1 - p) ** 4, abs=0.015)
    assert fired.any(1).float().mean() == pytest.approx(1 - 0.5 * (1 - p / 2) * (1 - p) ** 4, abs=0.015)
    g = labels[fired[:, 2], 2]  # scale label: standard normal when fired
    assert g.mean().abs() < 0.1 and g.std() == pytest.approx(1, abs=0.1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_and_dtypes_are_preserved(channels, size):
    images = pattern(6, channels, size)
    for kwargs in (PAPER, EVERYTHING):
        pipe = AugmentPipe(p=0.7, **kwargs)
        out, labels = run(pipe, images, seed=size)
        assert out.shape == images.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert labels.shape == (6, pipe.label_dim) and labels.dtype == torch.float32
    out, _ = run(AugmentPipe(p=0.7, **PAPER), images.double(), seed=0)
    assert out.dtype == torch.float64


def test_deterministic_under_manual_seed_and_with_a_generator():
    pipe, images = AugmentPipe(p=0.5, **EVERYTHING), pattern(8, 3, 16)
    a, la = run(pipe, images, seed=12)
    b, lb = run(pipe, images, seed=12)
    _, lc = run(pipe, images, seed=13)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)
    state = torch.get_rng_state()
    d, ld = pipe(images, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not touched
    assert torch.equal(a, d) and torch.equal(la, ld)


def test_flat_grey_image_stays_flat_mirror_padding_not_zeros():
    grey = torch.full((64, 3, 32, 32), 0.3)
    out, labels = run(AugmentPipe(p=1, **PAPER), grey, seed=14)
    assert (labels[:, 2] != 0).all()  # every image went through the resampler (scaled, at least)
    assert out.mean().item() == pytest.approx(0.3, abs=1e-4)
    assert out.std().item() < 1e-4
    assert (out - 0.3).abs().max() < 1e-3  # borders included: no dark (zero-filled) edges


def test_colour_transforms_on_grey_single_and_rgb_images():
    # Brightness only: every channel offset by label * brightness_std, RGB and single-channel alike.
    for c in (1, 3):
        images = pattern(16, c, 8)
        out, labels = run(AugmentPipe(p=1, brightness=1, brightness_std=0.2), images, seed=15)
        torch.testing.assert_close(out, images + 0.2 * labels[:, 0].view(-1, 1, 1, 1), atol=1e-6, rtol=0)
    # Luma flip mirrors RGB across the grey plane: the grey component changes sign, chroma stays.
    images = pattern(16, 3, 8)
    out, labels = run(AugmentPipe(p=1, lumaflip=1), images, seed=16)
    flip = labels[:, 0] == 1
    assert flip.any() and (~flip).any()
    grey_in, grey_out = images.mean(1, keepdim=True), out.mean(1, keepdim=True)
    torch.testing.assert_close(grey_out[flip], -grey_in[flip], atol=1e-5, rtol=0)
    torch.testing.assert_close((out - grey_out)[flip], (images - grey_in)[flip], atol=1e-5, rtol=0)
    assert torch.equal(out[~flip], images[~flip])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        AugmentPipe(p=1, hue=1)(torch.zeros(2, 2, 8, 8))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        AugmentPipe(p=-0.1)
    with pytest.raises(ValueError):
        AugmentPipe(xflip=-1)
    with pytest.raises(ValueError):
        AugmentPipe(p=1, xflip=1)(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="square"):
        AugmentPipe(p=1, rotate_int=1)(torch.zeros(2, 1, 8, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    pipe = AugmentPipe(p=0.5, **EVERYTHING)
    images = pattern(8, 3, 16).cuda()
    out, labels = pipe(images)
    assert out.is_cuda and labels.is_cuda and out.shape == images.shape and labels.shape == (8, 19)
    out, labels = AugmentPipe(p=0, **PAPER)(images)
    assert torch.equal(out, images) and not labels.any()
    grey = torch.full((16, 3, 32, 32), 0.3, device="cuda")
    out, _ = AugmentPipe(p=1, **PAPER)(grey)
    assert (out - 0.3).abs().max() < 1e-3
    g = torch.Generator(device="cuda").manual_seed(0)
    a, la = pipe(images, generator=g)
    b, lb = pipe(images, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(a, b) and torch.equal(la, lb)
