"""Non-leaky augmentation (EDM paper, Section 5 and Appendix F.2; reference `training/augment.py`).

Each training image is transformed with probability p per transform, and the parameters drawn for
it are returned as a conditioning vector (`augment_labels`) that the network sees next to the noise
level. At sampling time the labels are zero, which asks the network for un-augmented images, so
the augmentations never leak into the samples.

`AugmentPipe` reproduces the semantics of the reference pipe (same constructor arguments, same
transforms in the same order, same probability structure and parameter distributions, same label
layout, same order of draws from the random number generator, same resampling):

* pixel blitting, exact: x-flip, y-flip, 90-degree rotation, integer translation (with the image
  mirrored at its border, without repeating the edge pixel);
* general geometric transforms, composed into one inverse affine map per image and executed once:
  isotropic scaling, arbitrary rotation, anisotropic scaling, fractional translation. The image
  is mirror-padded, upsampled 2x with the 12-tap `sym6` wavelet low-pass filter, resampled
  bilinearly (zero outside), filtered with the same filter and decimated 2x;
* colour transforms (off in the paper): brightness, contrast, luma flip, hue rotation, saturation,
  one 4x4 colour matrix per image applied to RGB (or, averaged over rows, to single-channel) images.

A transform takes part only when its probability multiplier is > 0, and only then does it draw
random numbers and append its label entries; each of its draws fires per image with probability
`multiplier * p` (multipliers >= 1/p, such as the paper's `xflip=1e8`, make it fire always). The
paper's setting (reference `train.py`: `p`, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
translate_frac=1) gives the 9 label entries

    0 xflip          1 if the image was mirrored left-right, else 0
    1 yflip          1 if the image was mirrored top-bottom, else 0
    2 scale          w ~ N(0, 1): the image was magnified by 2 ** (w * scale_std)
    3 rotate cos     cos(a) - 1  \\ a ~ U(-pi, pi) * rotate_frac_max: output pixel x samples the
    4 rotate sin     sin(a)      /  input at R(a) x (about the image centre, y down)
    5 aniso cos      w cos(r)    \\ w ~ N(0, 1): magnified by 2 ** (w * aniso_std) along the axis
    6 aniso sin      w sin(r)    /  (cos r, -sin r), shrunk by the same factor across it; r ~ U(-pi, pi)
                                    with probability aniso_rotate_prob, else 0
    7 translate x    tx ~ N(0, 1) \\ content moved by (tx W, ty H) * translate_frac_std pixels
    8 translate y    ty ~ N(0, 1) /  (x right, y down)

and zeros for an image the transform did not fire on. (As in the reference, (w, r) and (-w, r + pi)
give the same aniso label but reciprocal stretches: the label fixes the axis and |w|, not the sign,
unless r = 0.) Integer translation moves content right by tx and *up* by ty pixels (the reference's
signs), unlike the fractional one. With every transform enabled the layout is
xflip, yflip, rotate_int (2: "x-flipped", "y-flipped" parts of the 90-degree rotation), translate_int
(2: tx, ty in units of translate_int_max * size), scale, rotate_frac (2), aniso (2), translate_frac
(2), brightness, contrast, lumaflip, hue (2: cos - 1, sin), saturation. `label_dim` counts them.

Differences from the reference, none of which changes what a label means: an image on which no
general geometric (or colour) transform fired is returned bit-exact instead of after an identity
round trip through the resampler (which the reference applies to the whole batch; it changes pixels
only by float rounding, measured <= 2e-5 on [-1, 1] images up to 64x64), so p = 0 returns the input
unchanged; float64 input stays float64. Transformed images agree with the reference to ~1e-5 and the
labels exactly, for the same seed (CPU; measured against a transcription of the reference).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

# Low-pass decomposition filter of the Symlet-6 wavelet (orthonormal: sum h^2 = 1, sum h = sqrt 2).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_TAPS = len(SYM6)          # 12
_HALO = _TAPS // 4         # output pixels beyond the image border that the 2x decimation filter reads (3)
_MARGIN = 2 * _HALO        # minimal mirror padding around the transformed footprint, in pixels (6)


# ----------------------------------------------------------------------------------------------
# Batched homogeneous 2D (3x3) and colour (4x4) matrices; every argument is a tensor of shape [N].


def _mat3(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """[[a, b, c], [d, e, f], [0, 0, 1]] for each of the N images."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).reshape(*a.shape, 3, 3)


def _shift(tx: Tensor, ty: Tensor) -> Tensor:
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _mat3(one, zero, tx, zero, one, ty)


def _stretch(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _mat3(sx, zero, zero, zero, sy, zero)


def _turn(angle: Tensor) -> Tensor:
    """Rotation by `angle`: (x, y) -> (x cos - y sin, x sin + y cos)."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return _mat3(cos, -sin, zero, sin, cos, zero)


def _const3(rows: list[list[float]], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Image operations.


def _mirror_index(index: Tensor, size: int) -> Tensor:
    """Map any integer coordinate into [0, size) by mirroring at the border (edge pixel not repeated)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - index.remainder(period)).abs()


def _filter_2x_up(x: Tensor, taps: Tensor) -> Tensor:
    """Zero-stuffing 2x upsampling with `taps` along W then H: [M, 1, h, w] -> [M, 1, 2h, 2w].

    Sample j of the result is sum_i x[i] taps[j + 5 - 2 i] (the filter's geometric centre lands
    half a sample before 2 i), which is a stride-2 transposed convolution cropped by 5.
    """
    pad = (_TAPS - 2) // 2
    x = F.conv_transpose2d(x, taps.view(1, 1, 1, _TAPS), stride=(1, 2), padding=(0, pad))
    return F.conv_transpose2d(x, taps.view(1, 1, _TAPS, 1), stride=(2, 1), padding=(pad, 0))


def _filter_2x_down(x: Tensor, taps: Tensor) -> Tensor:
    """Filter with `taps` and keep every other sample, along W then H, starting one sample in.

    Output sample i is sum_t x[2 i + 1 + t] taps[t]; on the (2 (size + 6))-sample grid the
    resampler produces this is exactly the `size` samples of the output image.
    """
    x = F.conv2d(x[:, :, :, 1:], taps.view(1, 1, 1, _TAPS), stride=(1, 2))
    return F.conv2d(x[:, :, 1:, :], taps.view(1, 1, _TAPS, 1), stride=(2, 1))


def _warp(images: Tensor, inv: Tensor, margin: tuple[int, int, int, int]) -> Tensor:
    """Resample images [N, C, H, W] so that output pixel x shows the input at inv @ x.

    Coordinates are in pixels relative to the image centre ((W - 1) / 2, (H - 1) / 2), x right and
    y down. `margin` = (left, top, right, bottom) mirror padding, shared by the batch.
    """
    N, C, H, W = images.shape
    left, top, right, bottom = margin
    x = F.pad(images, [left, right, top, bottom], mode="reflect") if any(margin) else images
    Hp, Wp = x.shape[2:]
    taps = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    up = _filter_2x_up(x.reshape(N * C, 1, Hp, Wp), taps).reshape(N, C, 2 * Hp, 2 * Wp)

    # The sampling grid covers the image plus _HALO pixels on each side at twice the resolution.
    Ho, Wo = 2 * (H + 2 * _HALO), 2 * (W + 2 * _HALO)
    # Normalised output grid coordinate (align_corners=False) -> the point handed to `inv`. The
    # reference's resampler maps grid sample g (in half-pixels from the centre) to (g + 1/2) / 2,
    # i.e. a quarter pixel off the geometric position g / 2, and symmetrically on the input side.
    grid_to_pix = _const3([[Wo / 4, 0, 0.25], [0, Ho / 4, 0.25], [0, 0, 1]], images.device)
    # Input pixel (centred on the unpadded image) -> normalised coordinate of the upsampled image:
    # recentre on the padded image, then u = 2 x - 1/2 half-pixels from its centre.
    Wu, Hu = 2 * Wp, 2 * Hp
    ox, oy = (left - right) / 2, (top - bottom) / 2
    pix_to_src = _const3([[4 / Wu, 0, (4 * ox - 1) / Wu], [0, 4 / Hu, (4 * oy - 1) / Hu], [0, 0, 1]],
                         images.device)
    theta = (pix_to_src @ inv @ grid_to_pix)[:, :2, :].to(images.dtype)
    grid = F.affine_grid(theta, [N, C, Ho, Wo], align_corners=False)
    warped = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _filter_2x_down(warped.reshape(N * C, 1, Ho, Wo), taps).reshape(N, C, H, W)


# ----------------------------------------------------------------------------------------------


class AugmentPipe(torch.nn.Module):
    """The EDM augmentation pipe: `images -> (augmented images, labels [N, label_dim])`.

    Multipliers (xflip ... saturation) scale the overall probability `p`; 0 disables a transform
    (and removes its label entries). Draws come from torch's global generator of the images'
    device (seed it, e.g. through Lightning's `seed_everything`), or from `generator` if given.
    Images are [N, C, H, W] floating point (the project's data range [-1, 1]); colour transforms
    need C = 1 or 3, `rotate_int` needs square images.
    """

    def __init__(self, p: float = 1,
                 xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0,
                 translate_int_max: float = 0.125,
                 scale: float = 0, rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125,
                 brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0,
                 saturation: float = 0, brightness_std: float = 0.2, contrast_std: float = 0.5,
                 hue_max: float = 1, saturation_std: float = 1) -> None:
        super().__init__()
        self.init_kwargs = dict(
            p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
            brightness_std=brightness_std, contrast_std=contrast_std, hue_max=hue_max,
            saturation_std=saturation_std)
        for name, value in self.init_kwargs.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"AugmentPipe: {name} must be finite, got {value}")
            setattr(self, name, value)
        if self.p < 0:
            raise ValueError(f"AugmentPipe: p must be >= 0, got {self.p}")
        for name in ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso",
                     "translate_frac", "brightness", "contrast", "lumaflip", "hue", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentPipe: probability multiplier {name} must be >= 0")

    # Label entries per enabled transform, in the order they are written.
    _LABELS = (("xflip", 1), ("yflip", 1), ("rotate_int", 2), ("translate_int", 2), ("scale", 1),
               ("rotate_frac", 2), ("aniso", 2), ("translate_frac", 2), ("brightness", 1),
               ("contrast", 1), ("lumaflip", 1), ("hue", 2), ("saturation", 1))

    @property
    def label_dim(self) -> int:
        """Width of the label vector (the network's `augment_dim`): 9 for the paper's setting."""
        return sum(width for name, width in self._LABELS if getattr(self, name) > 0)

    @property
    def label_names(self) -> list[str]:
        """What each label entry is, in order."""
        parts = {"rotate_int": ["rotate_int_x", "rotate_int_y"],
                 "translate_int": ["translate_int_x", "translate_int_y"],
                 "rotate_frac": ["rotate_frac_cos", "rotate_frac_sin"], "aniso": ["aniso_cos", "aniso_sin"],
                 "translate_frac": ["translate_frac_x", "translate_frac_y"], "hue": ["hue_cos", "hue_sin"]}
        return [n for name, _ in self._LABELS if getattr(self, name) > 0 for n in parts.get(name, [name])]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k):g}" for k in self.init_kwargs)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"AugmentPipe expects floating-point images [N, C, H, W], got {tuple(images.shape)} "
                             f"{images.dtype}")
        N, C, H, W = images.shape
        dev = images.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, device=dev, generator=generator)

        def normal(*shape: int) -> Tensor:
            return torch.randn(shape, device=dev, generator=generator)

        def fires(multiplier: float, *shape: int) -> Tensor:
            """Per-image gate: one uniform draw per image, true with probability multiplier * p."""
            return uniform(*shape) < multiplier * self.p

        labels: list[Tensor] = []

        # ---- pixel blitting (exact) ---------------------------------------------------------
        for multiplier, dim in ((self.xflip, 3), (self.yflip, 2)):
            if multiplier > 0:
                flip = torch.randint(2, (N,), device=dev, generator=generator)
                flip = flip * fires(multiplier, N)
                images = torch.where(flip.view(N, 1, 1, 1) == 1, images.flip(dim), images)
                labels.append(flip)

        if self.rotate_int > 0:
            quarter = torch.randint(4, (N,), device=dev, generator=generator) * fires(self.rotate_int, N)
            if H != W:
                raise ValueError(f"AugmentPipe: rotate_int needs square images, got {H}x{W}")
            # k quarter turns = (x-flip if k in {1, 2}) then (y-flip if k in {2, 3}) then (transpose if k odd).
            flip_x = (quarter == 1) | (quarter == 2)
            flip_y = (quarter == 2) | (quarter == 3)
            images = torch.where(flip_x.view(N, 1, 1, 1), images.flip(3), images)
            images = torch.where(flip_y.view(N, 1, 1, 1), images.flip(2), images)
            images = torch.where((quarter % 2 == 1).view(N, 1, 1, 1), images.transpose(2, 3), images)
            labels += [flip_x, flip_y]

        if self.translate_int > 0:
            amount = uniform(2, N) * 2 - 1
            amount = amount * fires(self.translate_int, 1, N)
            tx = (amount[0] * (W * self.translate_int_max)).round().long()
            ty = (amount[1] * (H * self.translate_int_max)).round().long()
            # Output pixel (x, y) reads input (x - tx, y + ty), mirrored at the border: content moves
            # right by tx and up by ty (the reference's sign convention).
            cols = _mirror_index(torch.arange(W, device=dev)[None, :] - tx[:, None], W)  # [N, W]
            rows = _mirror_index(torch.arange(H, device=dev)[None, :] + ty[:, None], H)  # [N, H]
            images = images.gather(3, cols.view(N, 1, 1, W).expand(N, C, H, W))
            images = images.gather(2, rows.view(N, 1, H, 1).expand(N, C, H, W))
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # ---- general geometric transforms: one inverse map per image -------------------------
        inv = torch.eye(3, device=dev).expand(N, 3, 3)
        moved = torch.zeros(N, dtype=torch.bool, device=dev)
        geometric = False

        if self.scale > 0:
            w = normal(N)
            w = torch.where(fires(self.scale, N), w, torch.zeros_like(w))
            s = torch.exp2(w * self.scale_std)
            inv = inv @ _stretch(1 / s, 1 / s)
            moved, geometric = moved | (w != 0), True
            labels.append(w)

        if self.rotate_frac > 0:
            a = (uniform(N) * 2 - 1) * (math.pi * self.rotate_frac_max)
            a = torch.where(fires(self.rotate_frac, N), a, torch.zeros_like(a))
            inv = inv @ _turn(a)
            moved, geometric = moved | (a != 0), True
            labels += [a.cos() - 1, a.sin()]

        if self.aniso > 0:
            w = normal(N)
            r = (uniform(N) * 2 - 1) * math.pi
            w = torch.where(fires(self.aniso, N), w, torch.zeros_like(w))
            r = torch.where(uniform(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            inv = inv @ _turn(-r) @ _stretch(1 / s, s) @ _turn(r)
            moved, geometric = moved | (w != 0), True
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            t = normal(2, N)
            t = torch.where(fires(self.translate_frac, 1, N), t, torch.zeros_like(t))
            inv = inv @ _shift(-t[0] * (W * self.translate_frac_std), -t[1] * (H * self.translate_frac_std))
            moved, geometric = moved | (t != 0).any(0), True
            labels += [t[0], t[1]]

        if geometric:
            # Mirror padding: enough to cover where every output corner reads from, plus _MARGIN,
            # at most size - 1 (reflection limit); one margin for the whole batch, as the reference.
            cx, cy = (W - 1) / 2, (H - 1) / 2
            corners = _const3([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dev)
            reach = (inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * 4]
            reach = torch.cat([-reach, reach]).amax(dim=1)  # left, top, right, bottom
            reach = reach + torch.tensor([_MARGIN - cx, _MARGIN - cy] * 2, device=dev)
            limit = torch.tensor([W - 1, H - 1] * 2, dtype=reach.dtype, device=dev)
            margin = tuple(int(m) for m in torch.minimum(reach.clamp(min=0), limit).ceil().tolist())
            index = moved.nonzero().squeeze(1)
            if index.numel():
                warped = _warp(images.index_select(0, index), inv.index_select(0, index), margin)
                images = images.index_copy(0, index, warped)

        # ---- colour: one 4x4 matrix per image acting on (r, g, b, 1) --------------------------
        if max(self.brightness, self.contrast, self.lumaflip, self.hue, self.saturation) <= 0:
            return images, _pack(labels, N, dev)
        if C not in (1, 3):
            raise ValueError(f"AugmentPipe: colour transforms need 1 or 3 channels, got {C}")
        colour = torch.eye(4, device=dev).expand(N, 4, 4)
        tinted = torch.zeros(N, dtype=torch.bool, device=dev)
        luma = torch.full((4,), 1 / math.sqrt(3), device=dev)
        luma[3] = 0
        luma_proj = torch.outer(luma, luma)  # projection onto the grey axis
        eye4 = torch.eye(4, device=dev)

        if self.brightness > 0:
            w = normal(N)
            w = torch.where(fires(self.brightness, N), w, torch.zeros_like(w))
            offset = torch.zeros(N, 4, 4, device=dev)
            offset[:, :3, 3] = (w * self.brightness_std)[:, None]
            colour = (eye4 + offset) @ colour
            tinted = tinted | (w != 0)
            labels.append(w)

        if self.contrast > 0:
            w = normal(N)
            w = torch.where(fires(self.contrast, N), w, torch.zeros_like(w))
            c = torch.exp2(w * self.contrast_std)
            gain = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], dim=-1))
            colour = gain @ colour
            tinted = tinted | (w != 0)
            labels.append(w)

        if self.lumaflip > 0:
            w = torch.randint(2, (N,), device=dev, generator=generator) * fires(self.lumaflip, N)
            colour = (eye4 - 2 * luma_proj * w.view(N, 1, 1)) @ colour  # mirror across the grey plane
            tinted = tinted | (w != 0)
            labels.append(w)

        if self.hue > 0:
            a = (uniform(N) * 2 - 1) * (math.pi * self.hue_max)
            a = torch.where(fires(self.hue, N), a, torch.zeros_like(a))
            colour = _grey_axis_rotation(a) @ colour
            tinted = tinted | (a != 0)
            labels += [a.cos() - 1, a.sin()]

        if self.saturation > 0:
            w = normal(N)
            w = torch.where(fires(self.saturation, N), w, torch.zeros_like(w))
            s = torch.exp2(w * self.saturation_std).view(N, 1, 1)
            colour = (luma_proj + (eye4 - luma_proj) * s) @ colour
            tinted = tinted | (w != 0)
            labels.append(w)

        if bool(tinted.any()):
            colour = colour.to(images.dtype)
            flat = images.reshape(N, C, H * W)
            if C == 3:
                out = colour[:, :3, :3] @ flat + colour[:, :3, 3:]
            else:  # single channel: the mean of the three RGB output rows, applied to grey (l, l, l)
                row = colour[:, :3, :].mean(dim=1, keepdim=True)  # [N, 1, 4]
                out = flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]
            images = torch.where(tinted.view(N, 1, 1, 1), out.reshape(N, C, H, W), images)
        return images, _pack(labels, N, dev)


def _pack(labels: list[Tensor], n: int, device: torch.device) -> Tensor:
    """Label parts (each [N] or [N, ...]) -> one float32 [N, label_dim] tensor."""
    if not labels:
        return torch.zeros(n, 0, device=device)
    return torch.cat([x.to(torch.float32).reshape(n, -1) for x in labels], dim=1)


def _grey_axis_rotation(angle: Tensor) -> Tensor:
    """[N, 4, 4] homogeneous rotation of RGB space by `angle` about the grey axis (1, 1, 1) / sqrt 3."""
    v = 1 / math.sqrt(3)
    s, c = angle.sin(), angle.cos()
    diag, off_minus, off_plus = v * v * (1 - c) + c, v * v * (1 - c) - v * s, v * v * (1 - c) + v * s
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = [diag, off_minus, off_plus, zero,       # Rodrigues' formula for a unit axis with equal
            off_plus, diag, off_minus, zero,       # components: the same three entries, cycled
            off_minus, off_plus, diag, zero,
            zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(*angle.shape, 4, 4)
