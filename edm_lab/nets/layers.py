"""Building blocks of the paper's U-Nets (DDPM++, NCSN++, ADM), parameter-compatible with NVlabs/edm.

Parameter and buffer names, shapes, initialisation and the order of floating-point
operations follow the reference `training/networks.py`, so its state_dicts load with
`strict=True` and outputs agree to float32 round-off. Every layer keeps float32 master
weights and casts them to the input's dtype, so a network runs in fp16/bf16 simply by
feeding it reduced-precision activations; attention logits/softmax stay in float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import silu

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """A fresh float32 tensor of `shape` drawn as the reference does (uniform in [-a, a] or normal).

    The draws (torch.rand / torch.randn on the global generator) and the scale factors are the
    reference's, so a seeded build reproduces its initial weights.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r} (known: {', '.join(INIT_MODES)})")


class Linear(nn.Module):
    """Fully-connected layer y = x W^T + b with the reference's init modes and gains."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """2-D convolution ("same" padding) with optional 2x up/downsampling by a separable FIR filter.

    `kernel=0` makes a pure resampling layer without weights. With `fused_resample` the
    filter and the convolution are applied in one padded pass each (as NCSN++'s residual
    encoder branch does), which differs from the unfused order at the borders.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # normalised 2-D outer product, [1, 1, k, k]
        # Only resampling layers carry the filter (and hence its state_dict entry).
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv2d, conv_transpose2d = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            # 4x gain: zero-insertion upsampling keeps one sample in four. The filter's border is kept
            # (not cropped) so that the convolution needs no zero padding; this is the reference's
            # corrected padding (NVlabs/edm issue #2), which yields exactly 2x the input size.
            x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                 padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                     stride=2, padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm needs >= {min_channels_per_group} channels, got {num_channels}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """softmax_k(q^T k / sqrt(C)) over [N, C, Q] x [N, C, K] -> [N, Q, K].

    Logits, softmax and their gradients are computed in float32 (fp16 logits overflow),
    while inputs, outputs and gradients keep the caller's dtype to save memory.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor) -> Tensor:
        # k is scaled in its own dtype before the cast, exactly as the reference orders it.
        scaled_k = (k / math.sqrt(k.shape[1])).to(torch.float32)
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), scaled_k).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx: Any, dw: Tensor) -> tuple[Tensor, Tensor]:
        q, k, w = ctx.saved_tensors
        dw32, w32 = dw.to(torch.float32), w.to(torch.float32)
        db = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))  # softmax backward along k
        dq = torch.einsum("nck,nqk->ncq", k.to(torch.float32), db).to(q.dtype) / math.sqrt(k.shape[1])
        dk = torch.einsum("ncq,nqk->nck", q.to(torch.float32), db).to(k.dtype) / math.sqrt(k.shape[1])
        return dq, dk


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """Attention weights softmax(q^T k / sqrt(C)) computed in float32 (see `AttentionOp`)."""
    return AttentionOp.apply(q, k)


class UNetBlock(nn.Module):
    """Residual block with optional 2x up/downsampling and self-attention: the union of the
    blocks of DDPM++, NCSN++ and ADM.

    The embedding conditions the block either additively (`adaptive_scale=False`, DDPM++/NCSN++)
    or as scale and shift of the second normalisation (ADM). Residual sums are multiplied by
    `skip_scale` (sqrt(1/2) for DDPM++/NCSN++) to keep activations at unit variance.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None) -> None:
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:  # ADM sizes heads by channels, so narrow layers can end up with no attention at all
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or asked for); otherwise a weightless resampler.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            qkv_init = init_attn if init_attn is not None else init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are laid out per head as [head][channel][q|k|v], as in the reference.
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3,
                                                      -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)] with f_i = (1/max_positions)^(i/(C/2 [- 1])) (DDPM++, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (NCSN++).

    The frequencies are a buffer (`freqs`), saved with the checkpoint.
    """

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.ger((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetIO(nn.Module):
    """What every U-Net here exposes to preconditioners and loaders, and its class-label dropout."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int,
                 augment_dim: int, label_dropout: float) -> None:
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout

    def class_embedding_input(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The class labels, each zeroed with probability label_dropout while training."""
        if class_labels is None:
            raise ValueError(f"{type(self).__name__} with label_dim={self.label_dim} needs class_labels")
        if self.training and self.label_dropout:
            keep = torch.rand([batch, 1], device=device) >= self.label_dropout
            return class_labels * keep.to(class_labels.dtype)
        return class_labels
