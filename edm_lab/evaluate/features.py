"""Feature extractors and the Frechet distance between feature statistics (FID and friends).

Every extractor is an ``nn.Module`` that maps samples in [-1, 1] shaped ``(N, *sample_shape)`` to
features ``(N, num_features)``, carries an int ``num_features`` and never leaves eval mode. Every
factory has the signature ``factory(dataset, cache_dir, **options) -> nn.Module`` so a Hydra config
can name it with ``_target_`` and ``_partial_: true``.

The distance itself always goes through ``torchmetrics``' ``FrechetInceptionDistance`` (float64
sums, unbiased covariance), so tests on golden statistics exercise the production code path.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edm_lab.atomic import atomic_torch_save
from edm_lab.data.datasets import ArrayDataset
from edm_lab.track.images import to_uint8

__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "ClassifierFeatures",
    "FlattenFeatures",
    "FrechetDistance",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "classifier_features",
    "download_inception_weights",
    "frechet_distance_from_features",
    "inception_features",
    "inception_hub_path",
    "raw_features",
    "resolve_inception_weights",
    "to_inception_input",
]

INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# The name of the FID extractor without antialiasing: the reference's own statistics were made with it.
INCEPTION_EXTRACTOR_NAME = "inception-v3-fid"
# torch-fidelity's own download lands in the hub cache under this name; the "6726825d" hash prefix
# is the same file, so accept it too rather than make users rename it.
_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# Kept as a literal (not imported) so building the error message never depends on torch-fidelity's
# internals; tests check it still equals torch_fidelity's URL_INCEPTION_V3.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)

# Bump when the classifier architecture or training loop changes, so old caches are not reused.
_CLASSIFIER_VERSION = 1


class _FrozenExtractor(nn.Module):
    """Base for extractors: no trainable parameters exposed, eval mode forever.

    ``name`` identifies what the features mean (written into reference statistics files, checked when
    one is loaded): two extractors with the same name give the same features for the same input.
    """

    num_features: int
    name: str

    def train(self, mode: bool = True) -> "_FrozenExtractor":
        """Ignore requests for train mode: features must not depend on the caller's mode."""
        return super().train(False)


class FlattenFeatures(_FrozenExtractor):
    """Identity features: flattens each sample into a vector of ``num_features`` entries."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.name = "raw"
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """Flatten (N, ...) to (N, num_features)."""
        return x.reshape(x.shape[0], -1)


def raw_features(dataset: ArrayDataset, cache_dir: str | Path | None = None) -> nn.Module:
    """Extractor that flattens the samples themselves (meaningful for low-dimensional toy data)."""
    return FlattenFeatures(math.prod(dataset.sample_shape))


# --------------------------------------------------------------------------------------------------
# Classifier features
# --------------------------------------------------------------------------------------------------


class _SmallClassifier(nn.Module):
    """A small CNN (images, any resolution >= 8) or MLP (vectors); ``features`` is the penultimate layer."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, feature_dim: int, width: int) -> None:
        super().__init__()
        if len(sample_shape) == 3:
            channels, size = sample_shape[0], min(sample_shape[1:])
            if size < 8:
                raise ValueError(f"classifier features need images of at least 8x8, got {sample_shape}")
            # Stride-2 stages down to ~4x4 keep the cost and the receptive field scale-free; adaptive
            # pooling then makes the head independent of the resolution.
            stride = 1 if size <= 8 else 2
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.SiLU()]
            size, in_width = (size + stride - 1) // stride, width
            while size > 4:
                layers += [nn.Conv2d(in_width, 2 * width, 3, stride=2, padding=1), nn.SiLU()]
                size, in_width = (size + 1) // 2, 2 * width
            self.trunk = nn.Sequential(
                *layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                nn.Linear(4 * in_width, feature_dim), nn.SiLU(),
            )
        elif len(sample_shape) == 1:
            dim = sample_shape[0]
            self.trunk = nn.Sequential(
                nn.Linear(dim, 4 * width), nn.SiLU(),
                nn.Linear(4 * width, 4 * width), nn.SiLU(),
                nn.Linear(4 * width, feature_dim), nn.SiLU(),
            )
        else:
            raise ValueError(f"classifier features need samples shaped (C, H, W) or (D,), got {sample_shape}")
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class ClassifierFeatures(_FrozenExtractor):
    """Penultimate-layer features of a trained ``_SmallClassifier`` (computed in the weights' dtype)."""

    def __init__(self, classifier: _SmallClassifier, feature_dim: int, train_accuracy: float = float("nan"),
                 cache_path: Path | None = None) -> None:
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.num_features = int(feature_dim)
        self.train_accuracy = float(train_accuracy)
        self.cache_path = cache_path
        # The cache file's stem holds the data set's fingerprint and the options hash: features of a
        # classifier trained on other data, or with other options, get another name.
        self.name = f"classifier:{cache_path.stem}" if cache_path is not None else "classifier"
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """Features (N, num_features) of samples in [-1, 1]."""
        dtype = next(self.classifier.parameters()).dtype
        return self.classifier.features(x.to(dtype))


def _classifier_options_hash(options: dict) -> str:
    blob = json.dumps(options, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _init_deterministic(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default (Kaiming-uniform-like) init, but drawn from an explicit generator."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)


def _train_classifier(samples: Tensor, labels: Tensor, num_classes: int, *, feature_dim: int, width: int,
                      epochs: int, batch_size: int, lr: float, seed: int) -> tuple[_SmallClassifier, float]:
    """Train the classifier deterministically in float64; returns it and its train accuracy."""
    # float64 and an explicit generator for init and minibatch order: two trainings in one process
    # give bit-identical weights, independent of the global RNG state.
    generator = torch.Generator().manual_seed(seed)
    model = _SmallClassifier(tuple(samples.shape[1:]), num_classes, feature_dim, width)
    model = model.to(torch.float64)
    _init_deterministic(model, generator)
    x = samples.detach().cpu().to(torch.float64)
    y = labels.detach().cpu().to(torch.int64)
    threads = torch.get_num_threads()
    # One thread: the reduction order (hence the weights) no longer depends on the machine's core
    # count, and OpenMP spin-waiting cannot stall training when parallel jobs share the CPUs.
    torch.set_num_threads(1)
    try:
        return _fit(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator)
    finally:
        torch.set_num_threads(threads)


def _fit(model: _SmallClassifier, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
         generator: torch.Generator) -> tuple[_SmallClassifier, float]:
    """Adam with a cosine learning-rate decay; minibatch order drawn from ``generator``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1024]).argmax(1) == y[i:i + 1024]).sum()) for i in range(0, len(x), 1024))
    return model, correct / len(x)


def classifier_features(dataset: ArrayDataset, cache_dir: str | Path, feature_dim: int = 64, epochs: int = 20,
                        seed: int = 0, width: int = 16, batch_size: int = 128, lr: float = 1e-2) -> nn.Module:
    """Penultimate features of a small classifier trained once on the dataset's labels, cached on disk.

    The weights live in ``cache_dir/extractors/<fingerprint>-classifier-<options hash>.pt`` (a plain
    tensor dict, loaded with ``weights_only=True``). A file lock next to it makes parallel jobs train
    only once. A cache file that cannot be loaded (corrupt, truncated, wrong keys) is reported with a
    warning naming it and then RETRAINED and atomically replaced: training is deterministic, so the
    replacement equals what the file should have held.
    """
    from filelock import FileLock

    if dataset.labels is None:
        raise ValueError(
            f"metric.extractor=classifier_features needs labels to train its classifier, but dataset "
            f"{dataset.name!r} has none; use a labelled dataset or another metric.extractor "
            f"(raw_features for vector data, inception_features for images)")
    labels = dataset.labels
    num_classes = int(dataset.num_classes) or int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"metric.extractor=classifier_features: labels of {dataset.name!r} must lie in "
                         f"[0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    options = dict(version=_CLASSIFIER_VERSION, sample_shape=list(dataset.sample_shape), num_classes=num_classes,
                   feature_dim=int(feature_dim), width=int(width), epochs=int(epochs), batch_size=int(batch_size),
                   lr=float(lr), seed=int(seed))
    directory = Path(cache_dir) / "extractors"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset.fingerprint}-classifier-{_classifier_options_hash(options)}.pt"

    def build(state: dict) -> ClassifierFeatures:
        model = _SmallClassifier(tuple(dataset.sample_shape), num_classes, int(feature_dim), int(width))
        model = model.to(torch.float64)
        model.load_state_dict(state["state_dict"])
        return ClassifierFeatures(model.eval(), int(feature_dim), float(state["train_accuracy"]), path)

    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return build(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:  # noqa: BLE001 - any unreadable cache is handled the same way
                warnings.warn(f"classifier feature cache {path} is unreadable ({type(error).__name__}: {error}); "
                              f"retraining and replacing it", RuntimeWarning, stacklevel=2)
        start = time.perf_counter()
        model, accuracy = _train_classifier(dataset.samples, labels, num_classes, feature_dim=int(feature_dim),
                                            width=int(width), epochs=int(epochs), batch_size=int(batch_size),
                                            lr=float(lr), seed=int(seed))
        state = {"state_dict": model.state_dict(), "train_accuracy": torch.tensor(accuracy, dtype=torch.float64),
                 "train_seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}
        atomic_torch_save(state, path)
    return ClassifierFeatures(model.requires_grad_(False), int(feature_dim), accuracy, path)


# --------------------------------------------------------------------------------------------------
# Inception-v3 features (the standard FID protocol)
# --------------------------------------------------------------------------------------------------


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception-v3 FID weights are not available locally (and were not, or could not be, downloaded)."""


# torch.hub's convention: "name-<sha256 prefix>.ext"; at least 8 hex digits so a date is not taken for one.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.[^.]+$")


def inception_hub_path() -> Path:
    """Where the Inception-v3 FID weights are looked up (and downloaded to) in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def download_inception_weights(url: str, dest: str | Path) -> Path:
    """Download ``url`` to ``dest``, checking the sha256 prefix carried by the URL's file name.

    torch.hub downloads into a temporary file beside ``dest`` and moves it there only once complete
    and verified, so a failed or interrupted download leaves nothing at ``dest``. A file lock makes
    parallel jobs download once.
    """
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    with FileLock(str(dest) + ".lock"):
        if not dest.is_file():  # else another job finished it while we waited
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=match.group(1) if match else None,
                                           progress=False)
    return dest


def resolve_inception_weights(weights_path: str | Path | None = None, download: bool = False,
                              url: str | None = None) -> Path:
    """Locate the Inception-v3 FID weights: an explicit path, else the torch hub cache, else (only when
    ``download`` is true) download ``url`` (default ``INCEPTION_WEIGHTS_URL``) into the hub cache.

    Raises one ``InceptionWeightsMissing`` listing every way to supply the file when none works.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(
                f"metric.extractor.weights_path={weights_path} does not exist (or is not a file); it must point "
                f"to the Inception-v3 FID weights {INCEPTION_WEIGHTS_FILENAME}")
        return path
    hub_path = inception_hub_path()
    for candidate in (hub_path, hub_path.with_name(_FIDELITY_WEIGHTS_FILENAME)):
        if candidate.is_file():
            return candidate
    url = INCEPTION_WEIGHTS_URL if url is None else url
    failure = ""
    if download:
        try:
            return download_inception_weights(url, hub_path)
        except Exception as error:  # noqa: BLE001 - every failure ends in the one message below
            failure = f"\nThe download (metric.extractor.download=true) failed: {type(error).__name__}: {error}"
    raise InceptionWeightsMissing(
        f"The Inception-v3 FID weights {INCEPTION_WEIGHTS_FILENAME} are missing. Supply them in one of these ways:\n"
        f"  1. set metric.extractor.weights_path=/path/to/{INCEPTION_WEIGHTS_FILENAME}\n"
        f"  2. place the file at {hub_path} (the torch hub cache)\n"
        f"  3. set metric.extractor.download=true on a machine with network access: it downloads\n"
        f"     {url} to {hub_path}" + failure)


def to_inception_input(x: Tensor) -> Tensor:
    """Quantise images in [-1, 1] to uint8 [0, 255] and repeat grayscale to 3 channels (EDM's protocol)."""
    if x.ndim != 4:
        raise ValueError(f"Inception features need images shaped (N, C, H, W), got {tuple(x.shape)}")
    # The PNG export's quantisation: the reference measures FID on the PNGs its generate.py wrote, so
    # in-memory features and features of the exported images must see the same pixels.
    images = to_uint8(x)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != 3:
        raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
    return images


class InceptionFeatures(_FrozenExtractor):
    """2048-d pool features of the FID Inception-v3 (torch-fidelity's port of the TF graph)."""

    def __init__(self, weights_path: str | Path, antialias: bool = False) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # Always a concrete path: with None torch-fidelity would try to download.
        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=str(weights_path), antialias=antialias)
        self.num_features = 2048
        self.weights_path = Path(weights_path)
        self.name = INCEPTION_EXTRACTOR_NAME + ("-antialias" if antialias else "")
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """Features (N, 2048) of images in [-1, 1]; Inception resizes to 299x299 itself."""
        return self.inception(to_inception_input(x))


def inception_features(dataset: ArrayDataset, cache_dir: str | Path | None = None,
                       weights_path: str | Path | None = None, antialias: bool = False,
                       download: bool = False) -> nn.Module:
    """FID Inception-v3 pool features; resolves (or downloads) the weights now so a missing file fails
    before sampling. See ``resolve_inception_weights``."""
    if not dataset.is_image:
        raise ValueError(f"metric.extractor=inception_features needs image data, but dataset {dataset.name!r} "
                         f"has samples shaped {dataset.sample_shape}; use raw_features or classifier_features")
    channels = dataset.sample_shape[0]
    if channels not in (1, 3):
        raise ValueError(f"metric.extractor=inception_features needs 1 or 3 channels, dataset {dataset.name!r} "
                         f"has {channels}")
    return InceptionFeatures(resolve_inception_weights(weights_path, download=download), antialias=antialias)


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------


class _Float64Output(nn.Module):
    """Casts features to float64: torchmetrics casts the final distance to the features' dtype."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = int(extractor.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x).to(torch.float64)


class FrechetDistance:
    """Frechet distance between extractor features of a fixed reference set and generated samples."""

    def __init__(self, extractor: nn.Module, batch_size: int = 512, input_dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise TypeError("FrechetDistance needs an extractor with an int attribute `num_features`")
        self.extractor = extractor.eval()
        self.batch_size = int(batch_size)
        self.input_dtype = input_dtype
        self.num_reference = 0
        self._metric = self._new_metric()

    def _new_metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        # sync_on_compute=False: under DDP the caller gathers every rank's features itself (in seed
        # order); torchmetrics would instead add up the ranks' copies, or wait for ranks that never compute.
        metric = FrechetInceptionDistance(feature=_Float64Output(self.extractor), reset_real_features=False,
                                          sync_on_compute=False)
        return metric.to(self.device)

    @property
    def device(self) -> torch.device:
        """Device of the extractor's weights (CPU for parameter-free extractors)."""
        for tensor in self.extractor.parameters():
            return tensor.device
        for tensor in self.extractor.buffers():
            return tensor.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "FrechetDistance":
        """Move the extractor and the accumulated statistics to ``device``."""
        self.extractor.to(device)
        self._metric.to(device)
        return self

    @torch.no_grad()
    def _feed(self, samples: Tensor | ArrayDataset, real: bool) -> None:
        for start in range(0, len(samples), self.batch_size):
            stop = start + self.batch_size
            # A data set converts only this batch: a uint8-backed one never builds its float32 copy
            # (same values and batch boundaries as its `samples`, so the same statistics).
            batch = (samples.sample_batch(slice(start, stop)) if isinstance(samples, ArrayDataset)
                     else samples[start:stop])
            self._metric.update(batch.to(device=self.device, dtype=self.input_dtype), real=real)

    @torch.no_grad()
    def features(self, samples: Tensor | ArrayDataset) -> Tensor:
        """The extractor's float64 features of ``samples`` (N, D) on the CPU, in batches as the reference's."""
        out = []
        for start in range(0, len(samples), self.batch_size):
            stop = start + self.batch_size
            batch = (samples.sample_batch(slice(start, stop)) if isinstance(samples, ArrayDataset)
                     else samples[start:stop])
            out.append(self._metric.inception(batch.to(device=self.device, dtype=self.input_dtype)).cpu())
        return torch.cat(out)

    def set_reference(self, samples: Tensor | ArrayDataset) -> None:
        """Replace the reference statistics with those of ``samples`` (e.g. the training set, a tensor or
        the ArrayDataset itself, read batch by batch)."""
        if len(samples) < 2:
            raise ValueError(f"the reference set needs at least 2 samples, got {len(samples)}")
        self._metric = self._new_metric()
        self._feed(samples, real=True)
        self.num_reference = len(samples)

    _REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def reference_statistics(self) -> dict[str, Tensor]:
        """The accumulated reference statistics (float64 sums and count), to cache and reload."""
        if self.num_reference == 0:
            raise RuntimeError("FrechetDistance: no reference statistics yet (call set_reference)")
        return {name: getattr(self._metric, name).detach().cpu().clone() for name in self._REFERENCE_STATES}

    def load_reference_statistics(self, stats: dict[str, Tensor]) -> None:
        """Use statistics from `reference_statistics()` instead of extracting the reference set again."""
        missing = [name for name in self._REFERENCE_STATES if name not in stats]
        if missing:
            raise KeyError(f"reference statistics lack {missing}")
        dim = int(self.extractor.num_features)
        count = int(stats["real_features_num_samples"])
        if (tuple(stats["real_features_sum"].shape) != (dim,)
                or tuple(stats["real_features_cov_sum"].shape) != (dim, dim) or count < 2):
            raise ValueError(f"reference statistics of {tuple(stats['real_features_sum'].shape)} features from "
                             f"{count} samples do not fit this extractor ({dim} features, at least 2 samples)")
        self._metric = self._new_metric()
        for name in self._REFERENCE_STATES:
            setattr(self._metric, name, stats[name].to(self.device))
        self.num_reference = int(stats["real_features_num_samples"])

    @torch.no_grad()
    def __call__(self, samples: Tensor) -> float:
        """Frechet distance between the reference and ``samples`` as a python float."""
        if self.num_reference == 0:
            raise RuntimeError("FrechetDistance: call set_reference(...) before measuring samples")
        if len(samples) < 2:
            raise ValueError(f"the Frechet distance needs at least 2 generated samples, got {len(samples)}")
        self._metric.reset()  # keeps the reference: reset_real_features=False
        self._feed(samples, real=False)
        return float(self._metric.compute())


def kernel_distance(real_features: Tensor, fake_features: Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> float:
    """Kernel distance (KID, Binkowski et al. 2018) between two feature sets (N, D): torchmetrics' unbiased
    MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, averaged over `subsets` random subsets of
    `subset_size` (at most the smaller set's size) from each set.

    The subsets are drawn from torch's generator seeded with `seed` inside a forked RNG state, so the value
    is a function of the features alone and the caller's random state is left as it was.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    for name, f in (("real", real_features), ("generated", fake_features)):
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"the kernel distance needs (N >= 2, D) {name} features, got {tuple(f.shape)}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature sets of {real_features.shape[1]} and {fake_features.shape[1]} dimensions")
    size = min(int(subset_size), len(real_features), len(fake_features))
    with warnings.catch_warnings():  # that it keeps the features is the point here
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save")
        metric = KernelInceptionDistance(feature=FlattenFeatures(real_features.shape[1]), subsets=int(subsets),
                                         subset_size=size, sync_on_compute=False)
    metric.update(real_features.detach().cpu().to(torch.float64), real=True)
    metric.update(fake_features.detach().cpu().to(torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


def frechet_distance_from_features(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between two feature sets (N, D), via the same torchmetrics path as production."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with equal D, got {tuple(features_a.shape)} "
                         f"and {tuple(features_b.shape)}")
    distance = FrechetDistance(FlattenFeatures(features_a.shape[1]), batch_size=max(len(features_a), 1),
                               input_dtype=torch.float64)
    distance.set_reference(features_a)
    return distance(features_b)
