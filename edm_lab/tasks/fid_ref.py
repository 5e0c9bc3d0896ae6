"""The fid_ref task: a data set's reference statistics under the configured metric, as a .npz.

    python run.py task=fid_ref data=digits metric=classifier [task.dest=/path/to/stats.npz]

The file holds `mu` and `sigma` (float64, the reference code's format, so its `fid.py` reads it too),
plus `extractor` and `num_images`; `metric.reference=<file>` then uses it instead of the data set.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from edm_lab.evaluate import reference as ref
from edm_lab.tasks import schema
from edm_lab.tasks.sample import build_frechet

log = logging.getLogger(__name__)


def run_fid_ref(cfg: DictConfig) -> Path:
    """Compute (or reuse from the cache) the data set's statistics and write them to `task.dest`."""
    schema.check(cfg)  # run.py checked it already; direct callers get the same check
    dest = Path(str(cfg.task.dest)).expanduser()
    dataset = instantiate(cfg.data)
    # The sample and train tasks' own path and cache: the statistics written here are the ones they
    # measure against. Extracted on the configured trainer's device.
    frechet = build_frechet(cfg, dataset, instantiate(cfg.trainer).strategy.root_device)
    stats = frechet.reference_statistics()
    name = ref.extractor_name(frechet.extractor)
    ref.save_npz(dest, stats, extractor=name)
    count = int(stats["real_features_num_samples"])
    log.info("reference statistics of %s (%d images, extractor %s)", dataset.name, count, name)
    print(f"reference statistics: {dest} ({count} images of {dataset.name}, {frechet.extractor.num_features}-d "
          f"features of {name}); use them with metric.reference={dest}")
    return dest
