"""The paper in miniature on a CPU: train small networks on the digits, run Figures 2 and 4 and the S_churn
panel on them, and write the paper's reports.

    python -m edm_lab.tasks.miniature            # 27 minutes on 2 CPU cores (measured); reports/paper/
    python -m edm_lab.tasks.miniature --dry-run  # print the commands only

Every step is an ordinary `python run.py ...` command (printed before it runs), all under one root
folder (`--root`, default `miniature/`) with its own results store, so rows already there are reused
and an interrupted run resumes. The networks:

- Table 2's configurations A (the baseline: VP or VE preconditioning, loss and noise, no
  augmentation, gradient clipping) and F (EDM preconditioning, loss, noise and augmentation) in the
  VP column (DDPM++) and the VE column (NCSN++), on otherwise equal recipes: the miniature keeps the
  design-axis changes of A -> F and not B's and C's hyperparameter and capacity changes;
- A's networks are the baselines of Figures 2 and 4 (as the paper's are Song et al.'s), one panel each.

The ImageNet/DDIM column needs an iDDPM-trained network and is not part of the miniature.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# <Table 2 config>_<column> -> overrides of experiment=train_digits (the Table 2 page tells A from F by these choices)
RUNS = {
    "a_vp": ["net=ddpmpp_small", "precond=vp", "noise=vp", "weighting=vp", "augment=none", "task.grad_clip=1.0"],
    "f_vp": ["net=ddpmpp_small", "precond=edm", "noise=edm", "weighting=edm", "augment=edm"],
    "a_ve": ["net=ncsnpp_small", "precond=ve", "noise=ve", "weighting=ve", "augment=none", "task.grad_clip=1.0"],
    "f_ve": ["net=ncsnpp_small", "precond=edm", "noise=edm", "weighting=edm", "augment=edm"],
}
BASELINES = {"vp": "a_vp", "ve": "a_ve"}  # the networks of the Figure 2 and 4 panels
SAMPLING = ["num_samples=512", "batch_size=512", "metric.sampler_error=false", "trainer.enable_progress_bar=false",
            "logger=csv"]
FIGURE2_STEPS = "[3,4,6,8,12,16,24,32,48,64]"
FIGURE4_STEPS = "[8,16,32,64]"


def commands(root: Path, kimg: float) -> list[list[str]]:
    """Every `run.py` command of the miniature, in order (training first: the sampling needs its networks)."""
    paths = [f"paths.root={root}"]
    out = []
    for name, overrides in RUNS.items():
        if network_path(root, name, kimg).is_file():  # trained by an earlier, interrupted run of the miniature
            continue
        out.append(["experiment=train_digits", *overrides, f"task.duration_kimg={kimg:g}", f"task.eval_kimg={kimg:g}",
                    f"task.snapshot_kimg={kimg:g}", "trainer.enable_progress_bar=false", "logger=csv", *paths,
                    f"hydra.run.dir={root}/train/{name}"])
    for column, name in BASELINES.items():
        network = ["model=checkpoint", f"model.path={network_path(root, name, kimg)}"]
        out += [["-m", f"sweeps=figure2_{column}", f"nfe.steps={FIGURE2_STEPS}", *network, *SAMPLING, *paths,
                 f"hydra.sweep.dir={root}/sample/figure2_{column}"],
                [f"experiment={column}_rk45", *network, *SAMPLING, *paths, f"hydra.run.dir={root}/sample/rk45_{column}"],
                ["-m", f"sweeps=figure4_{column}", f"nfe.steps={FIGURE4_STEPS}", *network, *SAMPLING, *paths,
                 f"hydra.sweep.dir={root}/sample/figure4_{column}"],
                ["-m", f"sweeps=churn_{column}", *network, *SAMPLING, *paths,
                 f"hydra.sweep.dir={root}/sample/churn_{column}"]]
    out.append(["task=paper", "task.sweep=all", *paths, f"task.dest={PROJECT_ROOT / 'reports' / 'paper'}",
                f"hydra.run.dir={root}/paper"])
    return out


def network_path(root: Path, name: str, kimg: float) -> Path:
    """Where the training task saves run `name`'s final EMA network."""
    return root / "train" / name / f"network-snapshot-{int(kimg):06d}.safetensors"


def main(argv: list[str] | None = None) -> int:
    """Run (or print) the miniature's commands; stop at the first that fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="miniature", help="folder of its results store, runs and networks")
    parser.add_argument("--kimg", type=float, default=300, help="training length of each network (kimg)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    began = time.perf_counter()
    for cmd in commands(root, args.kimg):
        full = [sys.executable, "run.py", *cmd]
        print(f"[{(time.perf_counter() - began) / 60:5.1f} min] " + shlex.join(["python", "run.py", *cmd]), flush=True)
        if args.dry_run:
            continue
        if subprocess.run(full, cwd=PROJECT_ROOT).returncode != 0:
            print(f"failed: {shlex.join(full)}", file=sys.stderr)
            return 1
    print(f"done in {(time.perf_counter() - began) / 60:.1f} min: {PROJECT_ROOT / 'reports' / 'paper' / 'index.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
