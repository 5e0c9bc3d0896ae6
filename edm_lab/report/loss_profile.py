"""The training loss per noise level (the paper's Figure 5a), from the store's `task == "loss_profile"` rows.

A training run writes one such row (see `edm_lab.tasks.train`): the noise levels `sigma`, the
training loss lambda(sigma) (D(y + sigma n; sigma) - y)^2 at each of them of the initial network
(`loss_initial`) and of the final EMA network (`loss_final`, at `kimg`), and the density of the
run's training noise distribution in ln sigma (`p_sigma`).

Deliberately free of hydra/lightning/wandb/torch; uses matplotlib's Agg canvas directly (never
pyplot). Only `base`'s attributes are used, at call time, so either module may be imported first.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from edm_lab.report import report as base

__all__ = ["PLOT", "TABLE_SIGMAS", "TASK", "is_loss_profile", "loss_profile_section"]

TASK = "loss_profile"
PLOT = "loss_profile.png"
TABLE_SIGMAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # the table shows the grid points nearest these
_LISTS = ("sigma", "loss_initial", "loss_final", "p_sigma")


def is_loss_profile(frame: pd.DataFrame) -> pd.Series:
    """Which rows of a store's frame are loss profiles (the rest are sampling or training evaluations)."""
    if "task" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["task"] == TASK


def _profile(row: pd.Series) -> dict[str, list[float]] | None:
    """The row's lists as floats, or None when they are missing or of different lengths."""
    lists = {k: row.get(k) for k in _LISTS}
    if not all(isinstance(v, list) and v for v in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        return None
    try:
        return {k: [float(x) for x in v] for k, v in lists.items()}
    except (TypeError, ValueError):
        return None


def _nearest(sigmas: Sequence[float], target: float) -> int:
    return min(range(len(sigmas)), key=lambda i: abs(math.log(sigmas[i] / target)) if sigmas[i] > 0 else math.inf)


def _positive(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    # Log axes: a zero, negative or non-finite point is left out rather than breaking the line's scale.
    kept = [(x, y) for x, y in zip(xs, ys) if x > 0 and 0 < y < math.inf]
    return [x for x, _ in kept], [y for _, y in kept]


def _figure(profiles: dict[str, dict[str, list[float]]], noises: dict[str, Any],
            styles: dict[str, dict[str, Any]], title: str) -> bytes:
    fig = Figure(figsize=(8.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    density = ax.twinx()
    ax.set_zorder(density.get_zorder() + 1)  # the loss lines over the shaded densities
    ax.patch.set_visible(False)
    handles = []
    shaded: dict[tuple, Any] = {}
    for name, profile in profiles.items():
        colour = styles[name]["color"]
        ax.plot(*_positive(profile["sigma"], profile["loss_initial"]), color=colour, linestyle="--", linewidth=1.2)
        handles += ax.plot(*_positive(profile["sigma"], profile["loss_final"]), color=colour, linestyle="-",
                           linewidth=1.6, label=name)
        key = (tuple(profile["sigma"]), tuple(profile["p_sigma"]))
        if key not in shaded:  # runs with the same noise distribution share one area, not a darker stack
            p = [v if math.isfinite(v) else 0.0 for v in profile["p_sigma"]]
            shaded[key] = density.fill_between(profile["sigma"], p, color=colour, alpha=0.15, linewidth=0,
                                               label=f"p(σ), noise={noises[name]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    density.set_ylim(bottom=0)
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("training loss λ(σ)·(D(y + σn; σ) − y)², mean per pixel")
    density.set_ylabel("p(ln σ) of the training noise (shaded)")
    ax.set_title(f"{title}: training loss per noise level")
    ax.grid(True, which="both", alpha=0.3)
    handles += [Line2D([], [], color="0.3", linestyle="--", label="initial network"),
                Line2D([], [], color="0.3", linestyle="-", label="final EMA network"), *shaded.values()]
    # Outside the axes, beyond the density axis' labels: never over the data.
    ax.legend(handles=handles, fontsize="small" if len(handles) <= 12 else "x-small", loc="upper left",
              bbox_to_anchor=(1.14, 1.0), borderaxespad=0.0)
    return base.png_bytes(fig)


def _table(profiles: dict[str, dict[str, list[float]]], kimgs: dict[str, Any]) -> tuple[str, bool]:
    """(markdown table, whether the runs' grids differ): per run, initial and final loss at TABLE_SIGMAS."""
    columns: list[tuple[float, dict[str, int]]] = []  # (target, {run: index of the nearest grid point})
    seen = set()
    for target in TABLE_SIGMAS:
        picks = {name: _nearest(p["sigma"], target) for name, p in profiles.items()}
        key = tuple(sorted((name, profiles[name]["sigma"][i]) for name, i in picks.items()))
        if key not in seen:  # a coarse grid maps several targets onto one point: one column
            seen.add(key)
            columns.append((target, picks))
    header, differ = ["training run", "network"], False
    for target, picks in columns:
        found = {profiles[name]["sigma"][i] for name, i in picks.items()}
        differ |= len(found) > 1
        header.append(f"σ = {base.format_value(found.pop())}" if len(found) == 1 else f"σ ≈ {target:g}")
    rows = []
    for name, profile in profiles.items():
        kimg = kimgs.get(name)
        final = f"final EMA ({base.format_value(kimg)} kimg)" if kimg is not None else "final EMA"
        for network, key in (("initial", "loss_initial"), (final, "loss_final")):
            rows.append([name, network] + [base.format_value(profile[key][picks[name]]) for _, picks in columns])
    return base.markdown_table(header, rows, align=["l", "l"] + ["r"] * len(columns)), differ


def loss_profile_section(frame: pd.DataFrame, title: str = "edm-lab report") -> tuple[str, dict[str, bytes]]:
    """(markdown, {png name: png bytes}) of the loss profiles among a frame's rows; ("", {}) when there are none.

    One figure (the loss of the initial network dashed and of the final EMA network solid against
    sigma on log-log axes, each run's p(sigma) shaded on a second axis) and one table (the
    losses at the grid points nearest TABLE_SIGMAS), for one run or a set of runs.
    """
    rows = frame[is_loss_profile(frame)]
    if rows.empty:
        return "", {}
    names, shared = base.configurations(rows)
    identities = base._identities(rows)
    profiles, noises, kimgs, unusable = {}, {}, {}, 0
    for ident, (_, row) in zip(identities, rows.iterrows()):
        profile = _profile(row)
        if profile is None:
            unusable += 1
            continue
        name = names[ident]
        profiles[name] = profile
        noises[name] = row.get("noise", "?")
        kimg = row.get("kimg")
        kimgs[name] = kimg if isinstance(kimg, (int, float)) and math.isfinite(kimg) else None
    md = ["## Training loss per noise level", "",
          ("The training loss λ(σ)·(D(y + σn; σ) − y)² per noise level σ, averaged over a fixed subset of the "
           "training images and their pixels with the same noise for both networks: dashed, the initial network; "
           "solid, the final EMA network; shaded (right axis), the density of the run's training noise "
           "distribution p(σ) in ln σ (the paper's Figure 5a)."), ""]
    if shared and len(profiles) > 1:
        md += ["Shared by every run below: " + " ".join(f"`{t}`" for t in shared), ""]
    if unusable:
        md += [f"*{unusable} loss-profile rows without equally long `{'`, `'.join(_LISTS)}` lists are left out.*", ""]
    if not profiles:
        return "\n".join(md), {}
    styles = base.line_styles(profiles)
    profiles = {name: profiles[name] for name in styles}  # the report's order of configurations
    png = _figure(profiles, noises, styles, title)
    table, differ = _table(profiles, kimgs)
    md += [f"![training loss per noise level]({PLOT})", "", table, ""]
    if differ:
        md += ["*The runs' noise-level grids differ: each cell is at its run's grid point nearest the column's σ.*",
               ""]
    return "\n".join(md), {PLOT: png}
