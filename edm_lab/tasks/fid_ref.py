"""The fid_ref task: a data set's reference statistics under the configured metric, as a .npz.

    python run.py task=fid_ref data=digits metric=classifier [task.dest=/path/to/stats.npz]

The file holds `mu` and `sigma` (float64, the reference code's format, so its `fid.py` reads it too),
plus `extractor` and `num_images`; `metric.reference=<file>` then uses it instead of the data set.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from edm_lab.evaluate import reference as ref
from edm_lab.evaluate.features import FrechetDistance

log = logging.getLogger(__name__)


def run_fid_ref(cfg: DictConfig) -> Path:
    """Compute (or reuse from the cache) the data set's statistics and write them to `task.dest`."""
    dest = Path(str(cfg.task.dest)).expanduser()
    if dest.suffix != ".npz":
        raise ValueError(f"task.dest={dest} must name a .npz file")
    if dest.is_dir():
        raise ValueError(f"task.dest={dest} is a folder; name the .npz file to write")
    cache_dir = Path(cfg.paths.cache_dir)
    dataset = instantiate(cfg.data)
    frechet = FrechetDistance(instantiate(cfg.metric.extractor)(dataset, cache_dir), batch_size=cfg.metric.batch_size)
    # The same cache as the sample and train tasks: statistics written here are the ones they measure against.
    stats = ref.cached_data_statistics(frechet, dataset.samples, dataset.fingerprint,
                                       OmegaConf.to_container(cfg.metric.extractor, resolve=True), cache_dir)
    name = ref.extractor_name(frechet.extractor)
    ref.save_npz(dest, stats, extractor=name)
    count = int(stats["real_features_num_samples"])
    log.info("reference statistics of %s (%d images, extractor %s)", dataset.name, count, name)
    print(f"reference statistics: {dest} ({count} images of {dataset.name}, {frechet.extractor.num_features}-d "
          f"features of {name}); use them with metric.reference={dest}")
    return dest
