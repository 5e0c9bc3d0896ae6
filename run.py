"""edm-lab from a source checkout: `python run.py ...` is the `edm-lab` command (see edm_lab/cli.py).

    python run.py                                   # one sampler, default data, NFE curve
    python run.py -m solver=heun,euler schedule=edm,vp
    python run.py experiment=train_digits           # train a small network (task=train)
    python run.py task=fid_ref metric=fid data=image_folder data.path=cifar10-32x32.zip
    python run.py task=report                       # regenerate reports/ from results/
"""
from edm_lab.cli import main

if __name__ == "__main__":
    main()
