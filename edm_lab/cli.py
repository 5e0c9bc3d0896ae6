"""The `edm-lab` command: compose the Hydra config and run its task (sample | train | fid_ref | report | paper).

`edm-lab ...`, `python -m edm_lab ...` and `python run.py ...` (in a source checkout) are the same
command and work from any directory: the configs are found through the package, the results go
under the current directory (`paths.root`).

    edm-lab                                   # one sampler, default data, NFE curve
    edm-lab -m solver=heun,euler schedule=edm,vp
    edm-lab -m sweeps=figure2                 # a named sweep (sweeps/)
    edm-lab experiment=train_digits           # train a small network (task=train)
    edm-lab task=report                       # regenerate reports/ from results/
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from edm_lab.tasks.hydra_support import config_dir, register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the composed job (`--help` lists the groups, the main keys and examples)."""
    run_task(cfg)
