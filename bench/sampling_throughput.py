"""Sampling throughput: denoiser evaluations and images per second for each solver on the ideal denoiser.

    python bench/sampling_throughput.py [--device cuda] [--batch 1024] [--steps 18] [--warmup 1] [--max-time 10]

Prints one line per configuration: median seconds per batch (IQR over the timed runs, and the
cold first call, left out of the median), NFE, images/s and NFE x images/s at the median.
"""
from __future__ import annotations

import argparse

import torch
from timing import add_timing_arguments, measure

from edm_lab.data import digits
from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design.sampler import PerSampleNoise, sample
from edm_lab.design.solvers import Euler, SecondOrder
from edm_lab.nets.ideal import ideal_denoiser

CONFIGS = {
    "edm-heun": dict(schedule=S.LinearSchedule(), scaling=S.NoScaling(), discretization=D.EDMDiscretization(),
                     solver=SecondOrder(1.0)),
    "edm-euler": dict(schedule=S.LinearSchedule(), scaling=S.NoScaling(), discretization=D.EDMDiscretization(),
                      solver=Euler()),
    "vp-euler": dict(schedule=S.VPSchedule(), scaling=S.VPScaling(), discretization=D.VPDiscretization(),
                     solver=Euler()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=18)
    add_timing_arguments(parser)
    args = parser.parse_args()

    data = digits()
    net = ideal_denoiser(data).to(args.device)
    noise = PerSampleNoise(range(args.batch), device=args.device)
    latents = noise.randn((args.batch, *data.sample_shape), device=args.device)
    print(f"device={args.device} batch={args.batch} steps={args.steps} data=digits ({len(data)} images, ideal denoiser)")
    for name, axes in CONFIGS.items():
        timing = measure(lambda: sample(net, latents, args.steps, **axes), args.device, warmup=args.warmup,
                         max_time=args.max_time, label=name)
        nfe, seconds = timing.result.nfe, timing.median
        print(f"{name:10s} {timing}  nfe={nfe:3d}  images/s={args.batch / seconds:10.1f}  "
              f"denoiser evals/s={nfe * args.batch / seconds:12.1f}")


if __name__ == "__main__":
    main()
