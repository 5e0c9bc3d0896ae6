"""The paper's optimisation recipe as formulas of the image count (reference training loop)."""
from __future__ import annotations

import torch
from torch import nn


def lr_at(nimg: int, lr: float, rampup_kimg: float) -> float:
    """The learning rate after `nimg` training images: linear warm-up over rampup_kimg thousand images."""
    return lr * min(nimg / max(rampup_kimg * 1000, 1e-8), 1)


def ema_beta(nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per step: half-life in images, capped at nimg * rampup_ratio during ramp-up (reference)."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) net, over parameters (buffers are not averaged, as in the reference)."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


@torch.no_grad()
def clean_gradients(net: nn.Module) -> None:
    """Replace non-finite gradient entries (nan -> 0, +-inf -> +-1e5) so one bad batch cannot poison Adam."""
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
