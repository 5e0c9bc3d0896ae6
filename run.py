"""edm-lab entry point: compose the Hydra config and run its task (sample | train | fid_ref | report).

    python run.py                                   # one sampler, default data, NFE curve
    python run.py -m solver=heun,euler schedule=edm,vp
    python run.py experiment=train_digits           # train a small network (task=train)
    python run.py task=fid_ref metric=fid data=image_folder data.path=cifar10-32x32.zip
    python run.py task=report                       # regenerate reports/ from results/
"""
import hydra
from omegaconf import DictConfig

from edm_lab.tasks.hydra_support import register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    main()
