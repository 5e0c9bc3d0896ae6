"""The network's fast path (edm_lab/nets/fast.py): the same outputs as eager fp32 within float rounding.

Compiling takes 30-100 s per network on 2 CPU cores, so those checks are `slow` (`pytest -m slow`).
"""
from __future__ import annotations

import functools

import pytest
import torch

from edm_lab.design.precond import EDMPrecond, VPPrecond
from edm_lab.nets.denoisers import build_denoiser, network_spec
from edm_lab.nets.fast import FastPath, accelerate, set_tf32
from tests.conftest import net_preset

FAMILIES = ["ddpmpp_small", "ncsnpp_small", "adm_small"]


def denoiser(name: str, precond=EDMPrecond, label_dim: int = 0):
    spec = network_spec(functools.partial(precond), net_preset(name), 8, 3, label_dim)
    torch.manual_seed(0)
    return build_denoiser(spec).eval()


def outputs(net, label_dim: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64) * 5
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    labels = torch.eye(label_dim)[torch.arange(6) % label_dim] if label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels)


@pytest.mark.parametrize("name", FAMILIES)
def test_channels_last_gives_the_eager_outputs(name):
    label_dim = 10 if name == "adm_small" else 0  # ADM: the class-conditional path too
    eager = outputs(denoiser(name, label_dim=label_dim), label_dim)
    fast_net = accelerate(denoiser(name, label_dim=label_dim), FastPath(channels_last=True))
    first = next(fast_net.model.parameters(), None)
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast_net.model.parameters()), first
    fast = outputs(fast_net, label_dim)
    assert fast.dtype == eager.dtype and torch.allclose(fast, eager, rtol=1e-5, atol=1e-5)


def test_a_network_without_inner_model_is_left_alone_and_tf32_follows_the_switch():
    class Plain(torch.nn.Module):
        def forward(self, x, sigma, labels=None):
            return x

    plain = Plain()
    assert accelerate(plain, FastPath(compile=True, channels_last=True)) is plain
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        accelerate(plain, FastPath(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        accelerate(plain, FastPath())
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        set_tf32(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert not FastPath().enabled and FastPath(tf32=True).enabled


@pytest.mark.slow
@pytest.mark.parametrize("name,precond", [("ddpmpp_small", EDMPrecond), ("ncsnpp_small", VPPrecond),
                                          ("adm_small", EDMPrecond)])
def test_compiled_network_gives_the_eager_outputs(name, precond):
    eager = outputs(denoiser(name, precond))
    compiled = accelerate(denoiser(name, precond), FastPath(compile=True, channels_last=True))
    assert compiled.model._compiled_call_impl is not None  # compiled in place: the state_dict is the eager one's
    assert compiled.state_dict().keys() == denoiser(name, precond).state_dict().keys()
    fast = outputs(compiled)
    # Measured on CPU: at most 2.3e-10 apart (inductor reorders and fuses float32 operations).
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-5), float((fast - eager).abs().max())


def test_eager_runs_a_compiled_network_uncompiled_inside_the_block_only():
    """RK45's reference solution hands the network ever new batch shapes: inside `eager` no call compiles."""
    from edm_lab.nets.fast import eager

    net = accelerate(denoiser("ddpmpp_small"), FastPath(compile=True))
    compiled = net.model._compiled_call_impl
    assert compiled is not None
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with eager(net):
        assert net.model._compiled_call_impl is None
        inside = outputs(net)
    assert net.model._compiled_call_impl is compiled
    assert not counters["stats"]["calls_captured"] and not counters["frames"]["ok"]
    assert torch.equal(inside, outputs(denoiser("ddpmpp_small")))
    plain = denoiser("ddpmpp_small")
    with eager(plain) as same:  # nothing compiled: nothing to do
        assert same is plain
