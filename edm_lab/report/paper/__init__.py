"""The paper's figures and tables as reports laid out like the paper (`reports/paper/`).

`write_paper_reports(frame, out_dir)` writes one Markdown file (with its PNGs) per artifact the rows
can fill -- Figure 2, Figure 4, the S_churn sensitivity, Table 2, the training loss per noise level -- and
an index. Each quotes the published
numbers of `numbers.py` with their source tags and says where ours are not comparable with them.
Free of Hydra, Lightning and W&B, like the generic report.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from edm_lab.atomic import atomic_write_bytes, atomic_write_text
from edm_lab.report import loss_profile
from edm_lab.report.paper.figures import Artifact, churn_sensitivity, figure2, figure4
from edm_lab.report.paper.table2 import table2


def loss_per_noise_level(frame: pd.DataFrame) -> Artifact | None:
    """The paper's Figure 5a: each training run's loss per noise level, initial and final, with its p(sigma)."""
    rows = frame[loss_profile.is_loss_profile(frame)] if not frame.empty else frame
    if rows.empty:
        return None
    section, pngs = loss_profile.loss_profile_section(rows, "Figure 5a")
    return Artifact("loss_per_noise_level", "Training loss per noise level (Figure 5a)",
                    "# Training loss per noise level (Figure 5a)\n\n" + section, pngs,
                    summary=f"{len(rows)} training runs")


BUILDERS = (figure2, figure4, churn_sensitivity, table2, loss_per_noise_level)


def write_paper_reports(frame: pd.DataFrame, out_dir: str | Path, scope: str = "all rows") -> Path:
    """Write every artifact the rows fill, then `index.md` listing them (and those without rows); returns the index."""
    out_dir = Path(out_dir)
    built = {build.__name__: build(frame) for build in BUILDERS}
    artifacts: list[Artifact] = [a for a in built.values() if a is not None]
    for artifact in artifacts:  # PNGs first, the Markdown that links them after
        for name, data in artifact.pngs.items():
            atomic_write_bytes(out_dir / name, data)
        atomic_write_text(out_dir / f"{artifact.name}.md", artifact.markdown + "\n")
    missing = [name for name, artifact in built.items() if artifact is None]
    lines = ["# The paper's artifacts", "", f"From {len(frame)} result rows ({scope}).", ""]
    lines += [f"- [{a.title}]({a.name}.md): {a.summary}" for a in artifacts]
    if missing:
        lines += ["", "No rows for: " + ", ".join(missing) + " (see the README for the sweeps that fill them)."]
    return atomic_write_text(out_dir / "index.md", "\n".join(lines) + "\n")
