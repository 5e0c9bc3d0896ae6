"""A sampling job's overhead against its sampling: start-up, W&B, reference statistics, one point.

    python bench/job_overhead.py                                   # the quick start's job (digits, ideal denoiser)
    python bench/job_overhead.py model=network net=ddpmpp_cifar10 ... trainer=gpu   # any overrides of run.py

Prints the seconds of each part of a job that is not sampling (with a warm cache, as every job of a
sweep but the first), one point's seconds and images/s, and the overhead as a share of one 50k-sample
point at that speed (issue 12's target: < 5 % on a GPU).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(overrides: list[str]) -> None:
    import logging

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # device summaries and tips
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from edm_lab.tasks.hydra_support import config_dir, register_resolvers
    from edm_lab.tasks.sample import AXES, build_frechet, evaluate_point
    from edm_lab.track.tracking import finish_run, make_logger

    work = Path(tempfile.mkdtemp(prefix="edm-lab-overhead-"))
    began = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), "--cfg", "job", *overrides], cwd=work, check=True,
                   capture_output=True)
    startup = time.perf_counter() - began  # interpreter, Hydra's composition
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import edm_lab.tasks.sample, edm_lab.tasks.train"], cwd=ROOT, check=True)
    imports = time.perf_counter() - began  # torch, Lightning, W&B: once per process (per job on a cluster array)

    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={work}", f"paths.output_dir={work}/job", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    trainer = instantiate(cfg.trainer, enable_progress_bar=False)
    dataset = instantiate(cfg.data)
    net = instantiate(cfg.model)(dataset, instantiate(cfg.precond, _partial_=True))
    axes = {name: instantiate(cfg[name]) for name in AXES}
    build_frechet(cfg, dataset, trainer.strategy.root_device)  # fills the cache: a sweep's first job
    began = time.perf_counter()
    frechet = build_frechet(cfg, dataset, trainer.strategy.root_device)
    statistics = time.perf_counter() - began
    began = time.perf_counter()
    logger = make_logger(cfg.logger, name="overhead", group="overhead", job_type="sample", sweep="bench")
    if logger is not None:
        getattr(logger, "experiment", None)
    finish_run(logger)
    tracker = time.perf_counter() - began
    steps = int(cfg.nfe.steps[-1])
    with open_dict(cfg):
        cfg.metric.sampler_error = False
    evaluate_point(cfg, trainer, net, dataset, axes, steps, 0, frechet, {})  # warm-up
    began = time.perf_counter()
    _, row = evaluate_point(cfg, trainer, net, dataset, axes, steps, 0, frechet, {})
    point = time.perf_counter() - began
    overhead = startup + imports + statistics + tracker
    full_point = 50_000 / row["images_per_second"]
    print(f"device={trainer.strategy.root_device} model={cfg.model._target_.rsplit('.', 1)[-1]} "
          f"steps={steps} (NFE {row['nfe']}) num_samples={cfg.num_samples}")
    print(f"  start-up and composition:           {startup:7.2f} s")
    print(f"  imports (torch, Lightning, W&B):    {imports:7.2f} s")
    print(f"  reference statistics (cached):      {statistics:7.2f} s")
    print(f"  tracker run (create + finish):      {tracker:7.2f} s")
    print(f"  one point:                          {point:7.2f} s  ({row['images_per_second']:.0f} img/s sampling)")
    print(f"  overhead {overhead:.2f} s = {100 * overhead / full_point:.2f} % of a 50k-sample point "
          f"({full_point:.0f} s at this speed)")


if __name__ == "__main__":
    main(sys.argv[1:])
