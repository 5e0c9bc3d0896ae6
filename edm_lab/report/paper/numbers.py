"""The published numbers of the EDM paper that the paper reports quote, each with its source tag.

Transcribed from `../shared/docs/paper-numbers.md` (the project's list of the paper's numbers and
where each comes from); `tests/test_paper_reports.py` checks every entry against that file. Tags:
[A] the paper's abstract, [R] the reference repository, [S] secondary sources quoting the paper's
tables ("as quoted"). A number not found in any source is absent here, and its report cell stays empty.
All values are FID over 50,000 CIFAR-10 32x32 or ImageNet-64 images (minimum of three seeds).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One published number: FID at an NFE (None where the source gives none), with its source tag."""

    fid: float
    nfe: int | None
    source: str

    def __str__(self) -> str:
        at = f" at {self.nfe}" if self.nfe is not None else ""
        return f"{self.fid:g}{at} {self.source}"


# The networks of each column of Figures 2 and 4 (Section 3 and 4 of the paper).
NETWORKS = {
    "vp": "DDPM++ cont. (VP), CIFAR-10 32x32 uncond. (baseline-cifar10-32x32-uncond-vp)",
    "ve": "NCSN++ cont. (VE), CIFAR-10 32x32 uncond. (baseline-cifar10-32x32-uncond-ve)",
    "iddpm": "ADM, ImageNet-64 cond. (the pre-trained ADM; DDIM as the original sampler)",
}

# Figure 2 (deterministic sampling): the original sampler's and the EDM sampler's FID [S].
FIGURE2 = {
    "vp": {"original": Published(2.85, 256, "[S]"), "edm": Published(2.93, 35, "[S]")},
    "ve": {"original": Published(5.45, 8192, "[S]"), "edm": Published(3.73, 27, "[S]")},
    "iddpm": {"original": Published(2.85, 250, "[S]"), "edm": Published(2.64, 79, "[S]")},
}

# Figure 4 (stochastic sampling): the best deterministic and stochastic FID [S].
FIGURE4 = {
    "vp": {"deterministic": Published(2.93, 35, "[S]"), "stochastic": Published(2.27, 383, "[S]")},
    "ve": {"deterministic": Published(3.73, 27, "[S]"), "stochastic": Published(2.23, 767, "[S]")},
    "iddpm": {"deterministic": Published(2.64, 79, "[S]"), "stochastic": Published(1.55, 511, "[S]")},
}

# Table 5: Algorithm 2's settings per network (S_churn, S_min, S_max, S_noise); conf/churn/ holds them too.
TABLE5 = {
    "cifar10_vp": ((30.0, 0.01, 1.0, 1.007), "[S]"),
    "cifar10_ve": ((80.0, 0.05, 1.0, 1.007), "[S]"),
    "imagenet_adm": ((80.0, 0.05, 50.0, 1.003), "[S]"),
    "imagenet_edm": ((40.0, 0.05, 50.0, 1.003), "[R]"),
}
# The Table 5 setting each Figure 4 column uses.
TABLE5_FOR = {"vp": "cifar10_vp", "ve": "cifar10_ve", "iddpm": "imagenet_adm"}

# Table 2 (CIFAR-10 training configurations, FID at 35 NFE): config -> column -> number; empty cells absent.
TABLE2_COLUMNS = {"cond_vp": "cond. VP", "cond_ve": "cond. VE", "uncond_vp": "uncond. VP"}
TABLE2 = {
    "A": {"cond_vp": Published(2.48, 35, "[S]"), "cond_ve": Published(3.11, 35, "[S]"),
          "uncond_vp": Published(3.01, 35, "[S]")},
    "B": {"cond_vp": Published(2.18, 35, "[S]"), "uncond_vp": Published(2.51, 35, "[S]")},
    "C": {"cond_vp": Published(2.08, 35, "[S]"), "uncond_vp": Published(2.31, 35, "[S]")},
    "D": {"cond_vp": Published(2.09, 35, "[S]"), "uncond_vp": Published(2.29, 35, "[S]")},
    "E": {"cond_vp": Published(1.88, 35, "[S]"), "cond_ve": Published(1.86, 35, "[S]"),
          "uncond_vp": Published(2.05, 35, "[S]")},
    "F": {"cond_vp": Published(1.79, 35, "[A]"), "cond_ve": Published(1.79, 35, "[S]"),
          "uncond_vp": Published(1.97, 35, "[A]")},
}
TABLE2_ROWS = {"A": "baseline (Song et al.)", "B": "adjusted hyperparameters", "C": "redistributed capacity",
               "D": "EDM preconditioning", "E": "EDM loss function", "F": "non-leaky augmentation"}
