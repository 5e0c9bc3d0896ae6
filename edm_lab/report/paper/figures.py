"""Figures 2 and 4 and the S_churn panel of the paper, from result rows, laid out as the paper does.

A panel is one network (a preconditioning column of the paper: VP, VE, ImageNet/DDIM) under one
setup (data, model or checkpoint, metric, num_samples, seed): rows that differ in any of these are
never drawn as one curve. A curve is recognised by the sampling axes its rows record (schedule,
scaling, discretization, solver, churn values), so rows of any sweep that ran those samplers count.
Each panel quotes the paper's numbers for its column (`numbers.py`, with their source tags), and
says "not comparable" unless the rows measure FID with the paper's own network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from edm_lab.report.paper import numbers
from edm_lab.report.report import _format_nfe, draw_lines, format_value, line_styles, markdown_table, png_bytes

COLUMNS = {"vp": "VP", "ve": "VE", "iddpm": "ImageNet/DDIM (iDDPM preconditioning)"}
METRICS = ("fid", "fd_classifier", "fd_raw")  # the first one present is the panel's metric
WITHIN = 0.03  # the paper's marker: the lowest NFE within 3 % of a curve's best value

Axes = tuple[str, str, str, str]  # schedule, scaling, discretization, solver (choice names)
EDM_SAMPLER: Axes = ("edm", "none", "edm", "heun")
FIGURE2_CURVES: dict[str, list[tuple[str, Axes]]] = {
    "vp": [("original sampler (Euler, VP time steps)", ("vp", "vp", "vp", "euler")),
           ("+ Heun and EDM time steps", ("vp", "vp", "edm", "heun")),
           ("+ EDM sigma(t) and s(t)", EDM_SAMPLER)],
    "ve": [("original sampler (Euler, VE time steps)", ("ve", "none", "ve", "euler")),
           ("+ Heun and EDM time steps", ("ve", "none", "edm", "heun")),
           ("+ EDM sigma(t) and s(t)", EDM_SAMPLER)],
    # DDIM already has sigma(t) = t and s(t) = 1: its second curve is the EDM sampler.
    "iddpm": [("original sampler (DDIM: Euler, iDDPM time steps)", ("edm", "none", "iddpm", "euler")),
              ("+ Heun and EDM time steps", EDM_SAMPLER)],
}
NO_CHURN = (0.0, 0.0, math.inf, 1.0)  # churn=none: S_churn, S_min, S_max, S_noise
ORIGINAL_STOCHASTIC = {"vp": "euler_maruyama", "ve": "predictor_corrector", "iddpm": "ancestral"}
ORIGINAL_AXES = {col: curves[0][1][:3] for col, curves in FIGURE2_CURVES.items()}
PAPER_NETWORK_FILES = {"vp": "baseline-cifar10-32x32-uncond-vp", "ve": "baseline-cifar10-32x32-uncond-ve",
                       "iddpm": "baseline-imagenet-64x64-cond-adm"}


@dataclass
class Artifact:
    """One paper artifact: its Markdown and the PNGs it links, by file name."""

    name: str
    title: str
    markdown: str
    pngs: dict[str, bytes] = field(default_factory=dict)
    summary: str = ""


def _axes(row: pd.Series) -> Axes:
    schedule = "edm" if row.get("schedule") in ("edm", "linear") else str(row.get("schedule"))
    return schedule, str(row.get("scaling")), str(row.get("discretization")), str(row.get("solver"))


def _num(row: pd.Series, key: str, default: float = math.nan) -> float:
    value = row.get(key)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _default_knobs(row: pd.Series) -> bool:
    """The paper's settings of the knobs the curve names do not show: rho = 7, Heun's alpha = 1."""
    rho, alpha = _num(row, "rho"), _num(row, "alpha")
    return (math.isnan(rho) or rho == 7.0) and (math.isnan(alpha) or alpha == 1.0)


def network_name(row: pd.Series) -> str:
    checkpoint = row.get("checkpoint")
    if isinstance(checkpoint, str) and checkpoint:  # its folder too: training runs all name theirs network-snapshot-*
        path = Path(checkpoint)
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return "ideal denoiser" if row.get("model") == "ideal" else f"{row.get('model')} ({row.get('network')})"


def _metric(frame: pd.DataFrame) -> str | None:
    return next((m for m in METRICS if m in frame.columns and frame[m].notna().any()), None)


@dataclass(frozen=True)
class Panel:
    """One network of one column under one setup."""

    column: str
    network: str
    data: str
    metric: str
    num_samples: int
    seed: int

    @property
    def title(self) -> str:
        return f"{COLUMNS[self.column]}: {self.network}"

    @property
    def setup(self) -> str:
        return f"data={self.data}, {self.metric}, {self.num_samples} samples from seed {self.seed}"

    def comparable(self) -> bool:
        """Whether the paper's FID can be set beside these rows: FID of the paper's own network."""
        return self.metric == "fid" and PAPER_NETWORK_FILES[self.column] in self.network


def panels(frame: pd.DataFrame, classify: Callable[[pd.Series, str], str | None]) -> dict[Panel, pd.DataFrame]:
    """Rows grouped into panels, each row tagged with its curve (`classify(row, column)`; None: not drawn)."""
    metric = _metric(frame)
    if metric is None or frame.empty or "precond" not in frame.columns:
        return {}
    out: dict[Panel, list[dict]] = {}
    for _, row in frame.iterrows():
        column = row.get("precond")
        value = _num(row, metric)
        if column not in COLUMNS or math.isnan(value):
            continue
        curve = classify(row, column)
        if curve is None:
            continue
        panel = Panel(column, network_name(row), str(row.get("data")), metric, int(_num(row, "num_samples", 0)),
                      int(_num(row, "seed", 0)))
        out.setdefault(panel, []).append({**row.to_dict(), "curve": curve, "value": value})
    order = list(COLUMNS)
    return {p: pd.DataFrame(rows) for p, rows in sorted(out.items(), key=lambda kv: (order.index(kv[0].column),
                                                                                     kv[0].network, kv[0].setup))}


def curve_cells(rows: pd.DataFrame, x: str = "nfe") -> pd.DataFrame:
    """Per (curve, x): the minimum over the rows (repeats of one configuration), and how many rows.

    Each point of a curve comes from one configuration (the S_churn panel's points from one each): where
    two configurations give the same point (a knob the curve does not name), each keeps its own line,
    named with its hash.
    """
    rows = rows.copy()
    rows[x] = pd.to_numeric(rows[x])
    shared = rows.groupby(["curve", x])["config_hash"].nunique().groupby(level=0).max()
    split = rows["curve"].map(shared) > 1  # one point of the curve from two configurations: two lines
    rows.loc[split, "curve"] = rows.loc[split, "curve"] + " [" + rows.loc[split, "config_hash"].str[:8] + "]"
    return rows.groupby(["curve", x], sort=True)["value"].agg(value="min", count="size").reset_index()


def within_best(cells: pd.DataFrame, x: str = "nfe") -> dict[str, tuple[float, float, float]]:
    """Per curve: (best value, the lowest x whose value is within 3 % of it, that value)."""
    out = {}
    for curve, part in cells.groupby("curve"):
        finite = part[part["value"].map(math.isfinite)]
        if finite.empty:
            continue
        best = float(finite["value"].min())
        close = finite[finite["value"] <= best * (1 + WITHIN)].sort_values(x).iloc[0]
        out[curve] = (best, float(close[x]), float(close["value"]))
    return out


def _draw(ax, cells: pd.DataFrame, styles: dict, x: str, marks: dict, log_x: bool = True) -> None:
    """Curves of one panel on `ax` (diverged values on the top edge), the 3 % points as stars."""
    cap, _ = draw_lines(ax, cells, styles, line="curve", x=x, log_x=log_x, max_ticks=8)
    for curve, (_, at, value) in marks.items():
        if value <= cap:
            ax.plot([at], [value], marker="*", markersize=14, color=styles[curve]["color"], markeredgecolor="black",
                    linestyle="none")


def _figure(groups: dict[Panel, pd.DataFrame], styles: dict, x: str, xlabel: str,
            marks: dict[Panel, dict], log_x: bool = True) -> bytes:
    """One row of panels side by side, one legend for all of them below (outside every axes)."""
    fig = Figure(figsize=(4.6 * len(groups), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (panel, cells) in zip(axes, groups.items()):
        _draw(ax, cells, styles, x, marks.get(panel, {}), log_x)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{panel.metric} (lower is better)")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(axes[0].plot([], [], marker="*", markersize=12, color="0.5", markeredgecolor="black",
                                linestyle="none")[0])
    labels.append(f"lowest {x.upper() if x == 'nfe' else x} within {WITHIN:.0%} of the curve's best")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               fontsize="small", frameon=False)
    return png_bytes(fig)


def _panel_table(cells: pd.DataFrame, marks: dict, curves: Sequence[str], x: str = "nfe") -> str:
    """One row per evaluated x (NFE or S_churn), one column per curve, then each curve's best and 3 % point."""
    order = [c for c in curves if c in set(cells["curve"])] + sorted(set(cells["curve"]) - set(curves))
    wide = cells.pivot(index=x, columns="curve", values="value")
    rows = [[_format_nfe(v)] + [format_value(wide.at[v, c]) if c in wide.columns else "—" for c in order]
            for v in sorted(wide.index)]
    best = {c: marks.get(c, (math.nan, math.nan, math.nan)) for c in order}
    rows.append(["best"] + [format_value(best[c][0]) for c in order])
    rows.append([f"within {WITHIN:.0%} at"] + [_format_nfe(best[c][1]) if not math.isnan(best[c][1]) else "—"
                                                for c in order])
    return markdown_table([x.upper() if x == "nfe" else x] + order, rows)


def _paper_lines(panel: Panel, ours: dict[str, tuple[float, float, float]], quoted: dict[str, tuple[str, str]]) -> list[str]:
    """The paper's numbers for this column beside ours (each ours: best value at the 3 % NFE)."""
    lines = []
    for key, (curve, what) in quoted.items():
        published = (numbers.FIGURE2 if what == "figure2" else numbers.FIGURE4)[panel.column].get(key)
        if published is None:
            continue
        mine = ours.get(curve)
        mine_text = (f"{format_value(mine[2])} at NFE {_format_nfe(mine[1])}" if mine else "not run")
        if panel.comparable() and mine:
            lines.append(f"| {curve} | {mine_text} | {published} | {mine[2] - published.fid:+.3g} |")
        else:
            lines.append(f"| {curve} | {mine_text} | {published} | not comparable |")
    if not lines:
        return []
    note = ("" if panel.comparable() else
            f" Not comparable: these rows measure {panel.metric} on data={panel.data} with {panel.network}, "
            f"the paper FID on its own network ({numbers.NETWORKS[panel.column]}).")
    return ["Ours (the first NFE within 3 % of the curve's best) beside the paper's:" + note, "",
            "| curve | ours | paper | difference |", "| --- | ---: | ---: | ---: |", *lines, ""]


def figure2(frame: pd.DataFrame) -> Artifact | None:
    """Figure 2: deterministic sampling, cumulative improvements, one panel per network."""
    def classify(row: pd.Series, column: str) -> str | None:
        if _churn_values(row) != NO_CHURN or not _default_knobs(row):
            return None
        if row.get("solver") == "rk45" and _axes(row)[:3] == ORIGINAL_AXES[column]:
            return "black-box RK45 (original sigma(t), s(t))"
        return next((name for name, axes in FIGURE2_CURVES[column] if _axes(row) == axes), None)

    groups = panels(frame, classify)
    if not groups:
        return None
    all_curves = [n for col in FIGURE2_CURVES for n, _ in FIGURE2_CURVES[col]] + ["black-box RK45 (original sigma(t), s(t))"]
    styles = line_styles(all_curves, sort=False)
    cells = {p: curve_cells(rows) for p, rows in groups.items()}
    marks = {p: within_best(c) for p, c in cells.items()}
    md = ["# Figure 2: deterministic sampling", "",
          "The paper's Figure 2: on each network, the original deterministic sampler, then + Heun's method and "
          "the EDM time steps, then + the EDM sigma(t) and s(t); quality against NFE on log axes. A star marks "
          f"each curve's lowest NFE within {WITHIN:.0%} of its best value.", "", "![Figure 2](figure2.png)", ""]
    for panel, c in cells.items():
        names = [n for n, _ in FIGURE2_CURVES[panel.column]]
        md += [f"## {panel.title}", "", f"Setup: {panel.setup}.", "", _panel_table(c, marks[panel], names), ""]
        if not (c["curve"].str.startswith("black-box")).any():
            md += ["*The black-box RK45 point was not run here (`solver=rk45`).*", ""]
        md += _paper_lines(panel, marks[panel], {"original": (names[0], "figure2"), "edm": (names[-1], "figure2")})
    return Artifact("figure2", "Figure 2: deterministic sampling", "\n".join(md),
                    {"figure2.png": _figure(cells, styles, "nfe", "NFE", marks)},
                    summary=_summary(marks))


def _figure4_curves(column: str) -> list[str]:
    setting = numbers.TABLE5_FOR[column]
    return ["deterministic (Algorithm 1)", f"Algorithm 2, Table 5 ({setting})", "S_min, S_max disabled",
            "S_noise = 1", "S_min, S_max disabled and S_noise = 1",
            f"original stochastic sampler ({ORIGINAL_STOCHASTIC[column].replace('_', ' ')})"]


def _churn_values(row: pd.Series) -> tuple[float, float, float, float]:
    return tuple(_num(row, k) for k in ("S_churn", "S_min", "S_max", "S_noise"))  # type: ignore[return-value]


def figure4(frame: pd.DataFrame) -> Artifact | None:
    """Figure 4: stochastic sampling, one panel per network: Algorithm 2 and its ablations, the original sampler."""
    def classify(row: pd.Series, column: str) -> str | None:
        names = _figure4_curves(column)
        if row.get("solver") == ORIGINAL_STOCHASTIC[column]:
            return names[5] if _axes(row)[:3] == ORIGINAL_AXES[column] else None
        if _axes(row) != EDM_SAMPLER or not _default_knobs(row):
            return None
        (s_churn, s_min, s_max, s_noise), _ = numbers.TABLE5[numbers.TABLE5_FOR[column]]
        churn, *rest = _churn_values(row)
        if churn == 0:
            return names[0] if _churn_values(row) == NO_CHURN else None
        if churn != s_churn:
            return None  # another S_churn: the S_churn panel's
        variants = {(s_min, s_max, s_noise): names[1], (0.0, math.inf, s_noise): names[2],
                    (s_min, s_max, 1.0): names[3], (0.0, math.inf, 1.0): names[4]}
        return variants.get(tuple(rest))

    groups = panels(frame, classify)
    if not groups:
        return None
    styles = line_styles([n for col in COLUMNS for n in _figure4_curves(col)], sort=False)
    cells = {p: curve_cells(rows) for p, rows in groups.items()}
    marks = {p: within_best(c) for p, c in cells.items()}
    md = ["# Figure 4: stochastic sampling", "",
          "The paper's Figure 4: on each network, deterministic sampling (Algorithm 1), Algorithm 2 with the "
          "network's Table 5 settings, the same with S_min/S_max disabled, with S_noise = 1, with both, and the "
          "network's original stochastic sampler; quality against NFE.", "", "![Figure 4](figure4.png)", ""]
    for panel, c in cells.items():
        names = _figure4_curves(panel.column)
        (s_churn, s_min, s_max, s_noise), tag = numbers.TABLE5[numbers.TABLE5_FOR[panel.column]]
        md += [f"## {panel.title}", "", f"Setup: {panel.setup}. Table 5 ({numbers.TABLE5_FOR[panel.column]}, {tag}): "
               f"S_churn={s_churn:g}, S_min={s_min:g}, S_max={s_max:g}, S_noise={s_noise:g}.", "",
               _panel_table(c, marks[panel], names), ""]
        md += _paper_lines(panel, marks[panel], {"deterministic": (names[0], "figure4"),
                                                 "stochastic": (names[1], "figure4")})
    return Artifact("figure4", "Figure 4: stochastic sampling", "\n".join(md),
                    {"figure4.png": _figure(cells, styles, "nfe", "NFE", marks)}, summary=_summary(marks))


def churn_sensitivity(frame: pd.DataFrame) -> Artifact | None:
    """Quality against S_churn at fixed step counts (Algorithm 2 with the column's other Table 5 settings)."""
    def classify(row: pd.Series, column: str) -> str | None:
        if _axes(row) != EDM_SAMPLER or not _default_knobs(row):
            return None
        _, s_min, s_max, s_noise = numbers.TABLE5[numbers.TABLE5_FOR[column]][0]
        churn, lo, hi, noise = _churn_values(row)
        if (lo, hi, noise) != (s_min, s_max, s_noise):
            return None
        return f"{int(_num(row, 'num_steps'))} steps"

    groups = {p: rows for p, rows in panels(frame, classify).items()
              if pd.to_numeric(rows["S_churn"]).nunique() > 1}
    if not groups:
        return None
    cells = {p: curve_cells(rows, x="S_churn") for p, rows in groups.items()}
    styles = line_styles([c for cs in cells.values() for c in cs["curve"]])
    marks = {p: within_best(c, x="S_churn") for p, c in cells.items()}
    md = ["# S_churn sensitivity", "",
          "Quality against S_churn at a fixed number of steps, the other stochasticity settings as the network's "
          "Table 5 (S_churn = 0 is the deterministic sampler).", "", "![S_churn](churn.png)", ""]
    for panel, c in cells.items():
        md += [f"## {panel.title}", "", f"Setup: {panel.setup}.", "",
               _panel_table(c, marks[panel], sorted(set(c["curve"])), x="S_churn"), ""]
    return Artifact("churn", "S_churn sensitivity", "\n".join(md),
                    {"churn.png": _figure(cells, styles, "S_churn", "S_churn", marks, log_x=False)},
                    summary=f"{sum(len(c) for c in cells.values())} points on {len(cells)} networks")


def _summary(marks: dict[Panel, dict]) -> str:
    """One line per panel: each curve's first NFE within 3 % of its best, and its value there."""
    parts = []
    for panel, m in marks.items():
        best = "; ".join(f"{curve}: {format_value(v)} at NFE {_format_nfe(at)}" for curve, (_, at, v) in m.items())
        parts.append(f"{panel.title} ({panel.metric}): {best}")
    return " | ".join(parts)
