"""The network's fast path, for sampling and training: compiled, channels-last, TF32 (the `fast` config node).

Each switch changes how the same network is computed, never what it computes: outputs move by float
rounding (compile reorders and fuses operations), or by TF32's 10-bit mantissa in fp32 matrix products on
CUDA. The sampler's state stays float64 and the preconditioner's arithmetic float32; reduced precision
of the network itself stays where it was (`precond.precision`, `model.precision`). All switches are
off by default: their speed-ups are to be measured on the GPU (bench/fast_path.py), and rows computed
with any of them on are their own configuration (the config hash includes `fast` when not all off).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class FastPath:
    """`compile`: torch.compile of the inner network with fixed shapes (a new batch shape recompiles
    once; `mode` as torch.compile's, e.g. "max-autotune" adds CUDA graphs); `channels_last`: the inner
    network's weights and inputs in NHWC, which cuDNN and inductor convolve faster; `tf32`: TF32 for fp32
    matrix products and convolutions on CUDA (no effect elsewhere)."""

    compile: bool = False
    mode: str = "default"
    channels_last: bool = False
    tf32: bool = False

    @property
    def enabled(self) -> bool:
        return self.compile or self.channels_last or self.tf32


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (PyTorch leaves matmuls off, the reference too)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def accelerate(denoiser: nn.Module, fast: FastPath) -> nn.Module:
    """Put `denoiser`'s inner network (`denoiser.model`) on the fast path; returns the denoiser.

    A denoiser without an inner network (the ideal denoiser) is returned as it is.
    """
    set_tf32(fast.tf32)
    model = getattr(denoiser, "model", None)
    if not isinstance(model, nn.Module):
        return denoiser
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
        denoiser.memory_format = torch.channels_last  # the preconditioner hands the network NHWC inputs
    if fast.compile:
        compile_module(model, fast.mode)
    return denoiser


def compile_module(module: nn.Module, mode: str = "default") -> nn.Module:
    """Compile `module` in place (`nn.Module.compile`): calls go through the compiled graph, while its
    parameters, state_dict keys and checkpoints stay those of the eager module."""
    # Random ops (dropout) inside a compiled graph would draw from inductor's own generator: the run would no
    # longer follow its seed as the eager one does. Falling back to torch's generator keeps the seed protocol.
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    module.compile(dynamic=False, mode=mode)
    return module


@contextlib.contextmanager
def eager(denoiser: nn.Module) -> Iterator[nn.Module]:
    """Run every compiled module inside `denoiser` (its inner network; both networks of a guided one) eagerly
    inside the block.

    For callers whose batch shapes change from call to call (an adaptive solver's per-sample steps), where
    fixed-shape compilation would recompile at each new shape. Uses `nn.Module.compile`'s attribute; a
    module compiled otherwise (or a later torch without it) stays as it is.
    """
    modules = denoiser.modules() if isinstance(denoiser, nn.Module) else ()
    compiled = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield denoiser
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call
