"""Forward+backward time of the network presets on a batch of digits-sized images.

    python bench/network_throughput.py [--device cuda] [--batch 64] [--resolution 8] [--preset ddpmpp_small ...]
                                       [--warmup 1] [--max-time 10]

Prints per preset the median time of a forward+backward pass (and its IQR over the timed runs),
images/s at that median, and the cold first call, which the median leaves out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from timing import add_timing_arguments, measure

from edm_lab.nets import build_network, count_parameters

CONF = Path(__file__).resolve().parents[1] / "conf" / "net"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--preset", nargs="*", default=["ddpmpp_small", "ncsnpp_small", "adm_small"])
    add_timing_arguments(parser)
    args = parser.parse_args()
    print(f"device={args.device} batch={args.batch} {args.channels}x{args.resolution}x{args.resolution}")
    for name in args.preset:
        kwargs = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        net = build_network(kwargs.pop("model_type"), img_resolution=args.resolution, in_channels=args.channels,
                            out_channels=args.channels, label_dim=0, **kwargs).to(args.device).train()
        x = torch.randn(args.batch, args.channels, args.resolution, args.resolution, device=args.device)
        timing = measure(lambda: net(x, torch.randn(args.batch, device=args.device), None).square().mean()
                         .backward(), args.device, warmup=args.warmup, max_time=args.max_time, label=name)
        print(f"{name:14s} {count_parameters(net):>11,} params  forward+backward {timing}  "
              f"{args.batch / timing.median:10.1f} images/s")


if __name__ == "__main__":
    main()
