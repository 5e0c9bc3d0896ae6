"""Images per second of the Frechet-distance feature extractors on digits-sized images.

    python bench/feature_throughput.py [--device cuda] [--batch 128] [--count 512] [--resolution 32]
                                       [--extractor raw classifier inception] [--weights /path/to/inception.pth]
                                       [--warmup 1] [--max-time 10]

`inception` is the FID Inception-v3 (torch-fidelity's port, through torchmetrics, with the uint8
input protocol and the resize to 299x299). Without `--weights` it runs with RANDOM weights, built
locally without any download: the timing is the architecture's, the features mean nothing.
Times are medians (IQR over the timed runs) of extracting `--count` images; the cold first call is
printed apart.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import add_timing_arguments, measure

from edm_lab.data import digits
from edm_lab.evaluate.features import (
    classifier_features,
    inception_features,
    raw_features,
)


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised FID Inception-v3 state_dict to ``path`` (no network needed)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        # The constructor loads the weights it is given: an empty dict keeps PyTorch's random init.
        def load_state_dict(self, state_dict, *args, **kwargs):
            return super().load_state_dict(state_dict, *args, **kwargs) if state_dict else None

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    model = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(model.state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="images per forward pass")
    parser.add_argument("--count", type=int, default=512, help="images per timed run")
    parser.add_argument("--resolution", type=int, default=32, help="digits padded to this side (power of two)")
    parser.add_argument("--extractor", nargs="*", default=["raw", "classifier", "inception"])
    parser.add_argument("--weights", default=None, help="real Inception weights (default: random, timing only)")
    add_timing_arguments(parser)
    args = parser.parse_args()

    data = digits(resolution=args.resolution)
    images = data.samples[torch.arange(args.count) % len(data)].to(args.device)
    print(f"device={args.device} batch={args.batch} images={args.count} of {tuple(data.sample_shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        factories = {
            "raw": lambda: raw_features(data),
            "classifier": lambda: classifier_features(data, tmp),  # trains once (untimed) on the digits
            "inception": lambda: inception_features(
                data, tmp, weights_path=args.weights or random_inception_weights(tmp / "random-inception.pth")),
        }
        for name in args.extractor:
            extractor = factories[name]().to(args.device)
            label = name + ("" if name != "inception" or args.weights else " (RANDOM weights, timing only)")

            @torch.no_grad()
            def run(extractor: torch.nn.Module = extractor) -> None:
                for start in range(0, args.count, args.batch):
                    extractor(images[start:start + args.batch])

            timing = measure(run, args.device, warmup=args.warmup, max_time=args.max_time, label=name)
            print(f"{label:42s} {extractor.num_features:5d}-d  {timing}  {args.count / timing.median:10.1f} images/s")


if __name__ == "__main__":
    main()
