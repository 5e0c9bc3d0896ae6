"""Reference statistics of a data set for the Frechet distance, in two interchangeable forms.

* torchmetrics' float64 sums (``real_features_sum``, ``real_features_cov_sum``,
  ``real_features_num_samples``): what ``FrechetDistance`` accumulates and what the per-(data set,
  extractor) cache holds;
* moments ``mu`` (D,), ``sigma`` (D, D) in a ``.npz``: the reference code's format (NVlabs/edm
  ``fid.py ref``), which this project writes with two extra arrays, ``extractor`` (the extractor's
  name) and ``num_images``.

The conversion is exact up to rounding: torchmetrics computes ``mean = sum / n`` and
``cov = (cov_sum - n mean mean^T) / (n - 1)``, so ``sum = n mu`` and
``cov_sum = (n - 1) sigma + n mu mu^T`` give back ``mu`` and ``sigma`` for any ``n >= 2``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edm_lab.atomic import atomic_write_bytes, cached
from edm_lab.data.datasets import ArrayDataset
from edm_lab.evaluate.features import INCEPTION_EXTRACTOR_NAME

__all__ = [
    "DEFAULT_COUNT",
    "ReferenceMoments",
    "cached_data_features",
    "cached_data_statistics",
    "check_compatible",
    "extractor_name",
    "feature_options",
    "load_npz",
    "moments_from_statistics",
    "reference_cache_key",
    "save_npz",
    "statistics_from_moments",
]

log = logging.getLogger(__name__)

# The reference's .npz files carry no image count; any n >= 2 reproduces (mu, sigma), and 50k is the
# size of the reference's FID sets.
DEFAULT_COUNT = 50_000
# Options that change where the weights come from but not the features.
_NOT_IN_KEY = ("download",)


@dataclass(frozen=True)
class ReferenceMoments:
    """Mean (D,) and covariance (D, D) of reference features, float64, with what is known of their origin."""

    mu: Tensor
    sigma: Tensor
    num_images: int | None = None
    extractor: str | None = None
    path: Path | None = None


def statistics_from_moments(mu: Tensor, sigma: Tensor, count: int = DEFAULT_COUNT) -> dict[str, Tensor]:
    """torchmetrics' float64 sums that reproduce ``mu`` and ``sigma`` (see the module docstring)."""
    if count < 2:
        raise ValueError(f"reference statistics need a count >= 2, got {count}")
    mu = torch.as_tensor(mu, dtype=torch.float64).cpu()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    if mu.ndim != 1 or tuple(sigma.shape) != (len(mu), len(mu)):
        raise ValueError(f"need mu (D,) and sigma (D, D), got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    return {"real_features_sum": count * mu,
            "real_features_cov_sum": (count - 1) * sigma + count * torch.outer(mu, mu),
            "real_features_num_samples": torch.tensor(count, dtype=torch.long)}


def moments_from_statistics(stats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, int]:
    """(mu, sigma, count) of torchmetrics' sums, computed as torchmetrics computes them."""
    count = int(stats["real_features_num_samples"])
    total = stats["real_features_sum"].to(torch.float64).cpu()
    mean = (total / count).unsqueeze(0)
    cov = (stats["real_features_cov_sum"].to(torch.float64).cpu() - count * mean.T.mm(mean)) / (count - 1)
    return mean[0], cov, count


def save_npz(path: str | Path, stats: Mapping[str, Tensor], extractor: str) -> Path:
    """Write ``mu``, ``sigma`` (float64), ``extractor`` and ``num_images`` to ``path`` atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics go to a .npz file, got {path}")
    mu, sigma, count = moments_from_statistics(stats)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu.numpy(), sigma=sigma.numpy(), extractor=np.array(str(extractor)),
             num_images=np.array(count, dtype=np.int64))
    return atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str | Path, key: str = "metric.reference") -> ReferenceMoments:
    """Read a reference ``.npz`` (ours, or the reference code's ``mu``/``sigma`` only) and validate it.

    Every problem is a ``ValueError`` (``FileNotFoundError`` for a missing file) naming ``key`` and the file.
    """
    path = Path(path).expanduser()
    where = f"{key}={path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file (give a .npz of reference statistics, e.g. written by "
                                f"`python run.py task=fid_ref`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{where}: not a readable .npz file ({type(error).__name__}: {error})") from error
    missing = [name for name in ("mu", "sigma") if name not in arrays]
    if missing:
        raise ValueError(f"{where}: lacks the array(s) {missing} (it holds {sorted(arrays)})")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{where}: needs mu shaped (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f"{where}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu or sigma holds non-finite values")
    num_images = None
    if "num_images" in arrays:
        value = arrays["num_images"]
        if value.shape != () or not np.issubdtype(value.dtype, np.integer) or int(value) < 2:
            raise ValueError(f"{where}: num_images must be an integer >= 2, got {value!r}")
        num_images = int(value)
    extractor = None
    if "extractor" in arrays:
        value = arrays["extractor"]
        if value.shape != () or value.dtype.kind != "U":
            raise ValueError(f"{where}: extractor must be a string, got {value!r}")
        extractor = str(value)
    return ReferenceMoments(torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64)),
                            num_images, extractor, path)


def check_compatible(reference: ReferenceMoments, extractor: str, num_features: int,
                     key: str = "metric.reference") -> None:
    """Raise a ``ValueError`` naming ``key`` unless ``reference`` was made with this extractor.

    A file without an extractor name (the reference code's own) holds Inception-v3 FID statistics, so it is
    accepted for that extractor only.
    """
    where = f"{key}={reference.path}"
    if reference.extractor is None:
        if extractor != INCEPTION_EXTRACTOR_NAME:
            raise ValueError(f"{where} names no extractor, so it holds the reference code's Inception-v3 FID "
                             f"statistics; it cannot serve the configured extractor {extractor!r} (use metric=fid)")
    elif reference.extractor != extractor:
        raise ValueError(f"{where} holds statistics of the extractor {reference.extractor!r}, but the configured "
                         f"metric uses {extractor!r}; write matching ones with `python run.py task=fid_ref`")
    if len(reference.mu) != num_features:
        raise ValueError(f"{where} holds {len(reference.mu)}-d statistics, the extractor gives {num_features}-d "
                         f"features")


def extractor_name(extractor: Any) -> str:
    """The name written to and checked in reference files: the extractor's ``name``, else its class name."""
    return str(getattr(extractor, "name", None) or type(extractor).__name__)


def feature_options(extractor_options: Mapping[str, Any]) -> dict[str, Any]:
    """The extractor options that fix its features: the key of cached statistics and part of a row's config hash."""
    return {k: v for k, v in extractor_options.items() if k not in _NOT_IN_KEY}


def reference_cache_key(fingerprint: str, extractor_options: Mapping[str, Any]) -> str:
    """Cache key of a data set's reference statistics: its content fingerprint and the extractor's options."""
    blob = json.dumps({"fingerprint": fingerprint, "extractor": feature_options(extractor_options)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_data_statistics(frechet, samples: Tensor | ArrayDataset, fingerprint: str,
                           extractor_options: Mapping[str, Any], cache_dir: str | Path) -> dict[str, Tensor]:
    """The reference statistics of ``samples`` under ``frechet``'s extractor, computed once per
    (fingerprint, extractor options) in ``cache_dir/reference_stats/<key>.pt`` (parallel jobs included).

    Pass the ArrayDataset itself rather than its ``.samples`` for large image sets: it is then converted
    to float batch by batch, never held as float32 whole; the statistics are the same to the bit."""
    def compute() -> dict[str, Tensor]:
        log.info("reference statistics: extracting %s features of %d samples (cached as %s)",
                 extractor_name(frechet.extractor), len(samples), path.name)
        frechet.set_reference(samples)
        return frechet.reference_statistics()

    path = Path(cache_dir) / "reference_stats" / f"{reference_cache_key(fingerprint, extractor_options)}.pt"
    return cached(path, compute)


def cached_data_features(frechet, samples: Tensor | ArrayDataset, fingerprint: str,
                         extractor_options: Mapping[str, Any], cache_dir: str | Path) -> Tensor:
    """The data set's features under ``frechet``'s extractor (N, D), for the kernel distance, which needs the
    features themselves rather than their moments: computed once per (fingerprint, extractor options) in
    ``cache_dir/reference_features/<key>.pt``. Stored as float32 (CIFAR-10's 50k Inception features:
    400 MB); the distance computes in float64."""
    def compute() -> Tensor:
        log.info("kernel distance: extracting %s features of %d samples (cached as %s)",
                 extractor_name(frechet.extractor), len(samples), path.name)
        return frechet.features(samples).to(torch.float32)

    path = Path(cache_dir) / "reference_features" / f"{reference_cache_key(fingerprint, extractor_options)}.pt"
    return cached(path, compute)
