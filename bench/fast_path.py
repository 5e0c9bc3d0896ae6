"""Eager fp32 against the fast path, in one run: sampling and training img/s with their ratios, the noise
sources, and the metric's shift.

    python bench/fast_path.py                          # CPU: the small DDPM++ at 8x8 (a few minutes, compiling)
    python bench/fast_path.py --device cuda --net ddpmpp_cifar10 --resolution 32 --batch 1024 --train-batch 512

One script for the GPU check of issue 12: on an H100/H200 the second line prints the target table
(sampling >= 300 img/s at 35 NFE and batch 1024; training >= 2500 img/s at batch 512) beside the
measured figures, and the shift of a Frechet distance (raw features) between eager fp32 and each fast
variant on the same seeds. Timings: bench/timing.py (torch.utils.benchmark, warm-up excluded).

Variants: eager fp32 (the golden-vector path); `channels_last`; `compile` (+ channels_last); `bf16
autocast` (+ channels_last; `trainer.precision=bf16-mixed`: the network's products in bf16, the sampler's
state float64); on CUDA also `compile bf16` (the network cast to bf16 through `precond.precision`, as the
reference's fp16) and `compile autocast`; TF32 on CUDA for the fp32 ones. Training: one optimizer step of the EDM loss with Adam, eager fp32 vs TF32 + fused Adam (CUDA) and
bf16 autocast (Lightning's `bf16-mixed`) on CUDA.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from timing import add_timing_arguments, measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edm_lab.design.losses import DenoisingLoss, EDMNoise, EDMWeighting  # noqa: E402
from edm_lab.design.noise import CounterNoise  # noqa: E402
from edm_lab.design.precond import EDMPrecond  # noqa: E402
from edm_lab.design.sampler import PerSampleNoise, sample  # noqa: E402
from edm_lab.evaluate.features import FlattenFeatures, FrechetDistance  # noqa: E402
from edm_lab.nets.denoisers import build_denoiser, network_spec  # noqa: E402
from edm_lab.nets.fast import FastPath, accelerate, set_tf32  # noqa: E402

TARGETS = {"sampling": 300.0, "training": 2500.0}  # img/s on an H100/H200-class GPU (issue 12)


def load_preset(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "net" / f"{name}.yaml"))


def build(args, precision: str = "fp32"):
    spec = network_spec(functools.partial(EDMPrecond, precision=precision), load_preset(args.net), args.resolution, 3)
    torch.manual_seed(0)
    return build_denoiser(spec).to(args.device)


def variants(device: str) -> dict[str, tuple[str, FastPath, bool]]:
    """name -> (network precision, fast path, bf16 autocast around sampling as `trainer.precision=bf16-mixed`)."""
    cuda = device.startswith("cuda")
    out = {"eager fp32": ("fp32", FastPath(), False),
           "channels_last": ("fp32", FastPath(channels_last=True, tf32=cuda), False),
           "compile": ("fp32", FastPath(compile=True, channels_last=True, tf32=cuda), False),
           "bf16 autocast": ("fp32", FastPath(channels_last=True, tf32=cuda), True)}
    if cuda:
        out["compile bf16"] = ("bf16", FastPath(compile=True, channels_last=True, tf32=True), False)
        out["compile autocast"] = ("fp32", FastPath(compile=True, channels_last=True, tf32=True), True)
    return out


def sampling(args) -> None:
    seeds = range(args.batch)
    latents = PerSampleNoise(seeds, device=args.device).randn((args.batch, 3, args.resolution, args.resolution),
                                                              device=args.device)
    eager_samples, base = None, None
    print(f"\nsampling: Heun {args.steps} steps ({2 * args.steps - 1} NFE), batch {args.batch}, "
          f"{args.net} at {args.resolution}x{args.resolution}")
    for name, (precision, fast, autocast) in variants(args.device).items():
        net = accelerate(build(args, precision).eval(), fast)
        device_type = args.device.split(":")[0]

        def run(net=net, autocast=autocast):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                return sample(net, latents, args.steps).x

        with torch.no_grad():
            timing = measure(run, args.device, warmup=args.warmup, max_time=args.max_time, label=name)
        rate = args.batch / timing.median
        base = base or rate
        shift = ""
        if eager_samples is None:
            eager_samples = timing.result
        else:
            shift = f"  FD shift vs eager {frechet(timing.result) - frechet(eager_samples):+.3g}"
        print(f"  {name:14s} {timing}  img/s={rate:9.1f}  x{rate / base:5.2f}{shift}")
        set_tf32(False)
    print(f"  target on an H100/H200 (ddpmpp_cifar10, 32x32, 18 steps, batch 1024): >= {TARGETS['sampling']:g} img/s")
    noise_sources(args)


def frechet(samples: torch.Tensor) -> float:
    """FD of raw features against a fixed standard-normal reference (the shift between variants is what counts)."""
    flat = samples.flatten(1).double().cpu()
    distance = FrechetDistance(FlattenFeatures(flat.shape[1]), batch_size=512)
    distance.set_reference(torch.randn(max(len(flat), 2 * flat.shape[1]), flat.shape[1],
                                       generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return float(distance(flat))


def noise_sources(args) -> None:
    x = torch.zeros(args.batch, 3, args.resolution, args.resolution, dtype=torch.float64, device=args.device)
    rates = {}
    for name, source in (("generators", PerSampleNoise), ("counter", CounterNoise)):
        noise = source(range(args.batch), device=args.device)
        timing = measure(lambda: noise.randn_like(x), args.device, warmup=args.warmup, max_time=args.max_time)
        rates[name] = timing.median
        print(f"  noise {name:10s} {timing}  (one churn draw for the batch)")
    print(f"  counter noise x{rates['generators'] / rates['counter']:.2f} against per-seed generators")


def training(args) -> None:
    print(f"\ntraining: one Adam step of the EDM loss, batch {args.train_batch}")
    cuda = args.device.startswith("cuda")
    images = torch.randn(args.train_batch, 3, args.resolution, args.resolution, device=args.device)
    loss_fn = DenoisingLoss(EDMNoise(), EDMWeighting())
    base = None
    for name, fused, autocast in (("eager fp32", False, False), ("tf32 + fused Adam", cuda, False),
                                  ("bf16 autocast", cuda, True)):
        if autocast and not cuda:
            continue
        set_tf32(name != "eager fp32" and cuda)
        net = build(args).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused or None)

        def step(net=net, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(net, images).sum() / len(images)
            loss.backward()
            optimizer.step()

        timing = measure(step, args.device, warmup=args.warmup, max_time=args.max_time, label=name)
        rate = args.train_batch / timing.median
        base = base or rate
        print(f"  {name:18s} {timing}  img/s={rate:9.1f}  x{rate / base:5.2f}")
        del net, optimizer
    set_tf32(False)
    print(f"  target on an H100/H200 (ddpmpp_cifar10, 32x32, batch 512): >= {TARGETS['training']:g} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--net", default="ddpmpp_small")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--skip-training", action="store_true")
    add_timing_arguments(parser)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device={args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    sampling(args)
    if not args.skip_training:
        training(args)


if __name__ == "__main__":
    main()
