"""Table 2 of the paper: the training configurations A-F in the VP and VE columns, from the training runs'
final evaluations (`task == "train"` rows, the last kimg of each run).

A run's configuration and column come from its preset's name (`cifar10_<config>_<column>`, the label's
first word) or, for other runs, from its design choices: the column from the network (DDPM++: VP,
NCSN++: VE) and the configuration from preconditioning, loss and augmentation (A: the column's own,
no augmentation; D: EDM preconditioning; E: + EDM noise and weighting; F: + augmentation). B and C
change hyperparameters and capacity, which the choices do not show: only their presets name them.
Runs of different setups (data, metric, samples, evaluation steps) are separate tables; two runs in
one cell are two lines, never averaged.
"""
from __future__ import annotations

import re

import pandas as pd

from edm_lab.report.paper import numbers
from edm_lab.report.paper.figures import METRICS, Artifact
from edm_lab.report.report import _format_nfe, format_value, markdown_table

_PRESET = re.compile(r"^cifar10_([a-f])_(vp|ve)\b")
_NETWORK_COLUMN = {"ddpmpp": "vp", "ncsnpp": "ve"}
# (precond, noise, weighting, augment) -> configuration, with "own" the column's own choice.
_BY_CHOICES = {("own", "own", "own", "none"): "A", ("edm", "own", "own", "none"): "D",
               ("edm", "edm", "edm", "none"): "E", ("edm", "edm", "edm", "edm"): "F"}


def classify(row: pd.Series) -> tuple[str, str] | None:
    """(configuration A-F, column "vp" | "ve") of a training run's row, or None when it is none of Table 2's."""
    match = _PRESET.match(str(row.get("label", "")))
    if match:
        return match.group(1).upper(), match.group(2)
    column = next((c for prefix, c in _NETWORK_COLUMN.items() if str(row.get("net", "")).startswith(prefix)), None)
    if column is None:
        return None
    choices = tuple("own" if row.get(k) == column else ("none" if pd.isna(row.get(k)) else str(row.get(k)))
                    for k in ("precond", "noise", "weighting", "augment"))
    config = _BY_CHOICES.get(choices)
    return (config, column) if config else None


def _final_evaluations(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The last evaluation of every training run (its highest kimg) that has the metric."""
    rows = frame[(frame.get("task") == "train") & pd.to_numeric(frame[metric], errors="coerce").notna()]
    if rows.empty:
        return rows
    rows = rows.assign(kimg=pd.to_numeric(rows["kimg"]))
    return rows.sort_values("kimg").groupby("run_hash", sort=False).tail(1)


def table2(frame: pd.DataFrame) -> Artifact | None:
    """The Table 2 page: ours beside the paper's FID at 35 NFE, per configuration and column."""
    if frame.empty or "task" not in frame.columns:
        return None
    metric = next((m for m in METRICS if m in frame.columns and
                   pd.to_numeric(frame.loc[frame["task"] == "train", m], errors="coerce").notna().any()), None)
    if metric is None:
        return None
    finals = _final_evaluations(frame, metric)
    cells = []
    for _, row in finals.iterrows():
        found = classify(row)
        if found is None:
            continue
        config, column = found
        conditional = not pd.isna(row.get("class_conditional")) and bool(row.get("class_conditional"))
        cells.append({"config": config, "key": f"{'cond' if conditional else 'uncond'}_{column}",
                      "value": float(row[metric]), "kimg": float(row["kimg"]), "run": str(row["run_hash"])[:8],
                      "setup": (str(row.get("data")), int(row.get("num_samples", 0)), _format_nfe(row["nfe"]))})
    if not cells:
        return None
    cells = pd.DataFrame(cells)
    md = ["# Table 2: training configurations", "",
          "The paper's Table 2: FID at 35 NFE of networks trained with the configurations A (the baselines of "
          "Song et al.) to F (all of the paper's choices), in the VP and VE columns. Ours: each training run's last "
          f"evaluation ({metric}); the paper's numbers carry their source tags. "
          + ("" if metric == "fid" else f"Not comparable: {metric} on our data, not FID on CIFAR-10."), ""]
    for (data, num_samples, nfe), part in cells.groupby("setup"):
        keys = [k for k in ("cond_vp", "cond_ve", "uncond_vp", "uncond_ve") if k in set(part["key"])]
        quoted = [k for k in keys if k in numbers.TABLE2_COLUMNS]
        header = ["config"] + [f"{_column_title(k)}: ours (kimg)" for k in keys] + \
                 [f"{_column_title(k)}: paper" for k in quoted] + \
                 ([f"{_column_title(k)}: difference" for k in quoted] if metric == "fid" else [])
        rows = []
        for config in "ABCDEF":
            runs = part[part["config"] == config]
            if runs.empty:
                continue
            ours = ["; ".join(f"{format_value(r.value)} ({r.kimg:g})" + (f" [{r.run}]" if len(group) > 1 else "")
                              for r in group.itertuples()) or "—"
                    for k in keys for group in [runs[runs["key"] == k]]]
            paper = [str(numbers.TABLE2[config].get(k, "")) or "—" for k in quoted]
            differences = [_difference(runs[runs["key"] == k], numbers.TABLE2[config].get(k)) for k in quoted]
            rows.append([f"{config} {numbers.TABLE2_ROWS[config]}"] + ours + paper
                        + (differences if metric == "fid" else []))
        md += [f"## data={data}, {num_samples} samples, NFE {nfe}", "", markdown_table(header, rows), ""]
    return Artifact("table2", "Table 2: training configurations", "\n".join(md),
                    summary=f"{len(cells)} training runs ({metric})")


def _difference(runs: pd.DataFrame, published: numbers.Published | None) -> str:
    """Ours minus the paper's FID, for a cell of one run (FID rows only; several runs: no single number)."""
    if published is None or len(runs) != 1:
        return "—"
    return f"{float(runs['value'].iloc[0]) - published.fid:+.3g}"


def _column_title(key: str) -> str:
    return numbers.TABLE2_COLUMNS.get(key, "uncond. VE (no paper column)")

