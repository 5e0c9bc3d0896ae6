"""Regenerate the report folder (Markdown tables, metric-vs-NFE plots, CSV) from result rows.

Usage: ``python -m edm_lab.report.report --results results --out reports [--metric fid ...]``.

Everything is rebuilt from the rows each time, so the report can never drift from the store.
All metrics are taken to be lower-is-better (FID, Fréchet distances, sampler RMSE). A configuration
is a config hash: rows that differ in any hashed key (num_samples and seed included) are separate
lines, never merged. When several rows share a (configuration, NFE) cell -- the repeats of the seed
protocol, or a point recomputed -- the minimum is reported, following the paper's convention
(Karras et al. report the best of three), and a second table gives mean ± std over those rows.

Labels show only what varies between the configurations of a report; what they share is said once
above the tables. In every plot a configuration keeps its colour and marker, legends sit outside
the axes, NFE ticks are thinned so they never collide, and values above `DIVERGED` times the
plot's median (or non-finite) are marked as diverged at the top edge rather than stretching the
axis; tables mark them with a dagger.

Rows of training runs (`task == "train"`, with a `kimg` column) form their own section: the metric
of each run against training progress in kimg, with a `<metric>_vs_kimg.png` plot.

Deliberately free of hydra/lightning/wandb; uses matplotlib's Agg canvas directly (never pyplot),
so it neither needs a display nor changes the global backend of a caller.
"""
from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from edm_lab.atomic import atomic_write_bytes, atomic_write_text
from edm_lab.report import loss_profile
from edm_lab.track.store import ResultsStore

__all__ = ["KNOWN_METRICS", "configurations", "default_metrics", "format_value", "line_styles", "markdown_table",
           "select_rows", "write_report", "main"]

KNOWN_METRICS: tuple[str, ...] = ("fid", "fd_classifier", "fd_raw", "kid", "kid_classifier", "kid_raw", "sampler_rmse",
                                   "bits_per_dim")
PLOT_SUFFIX = "_vs_nfe.png"
KIMG_PLOT_SUFFIX = "_vs_kimg.png"
MISSING = "—"
_MAX_LISTED = 10  # provenance lists at most this many distinct values per field
_MAX_KIMG_COLUMNS = 10  # training progress tables show at most this many evaluations


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def default_metrics(frame: pd.DataFrame) -> list[str]:
    """Numeric columns among KNOWN_METRICS plus numeric columns starting with ``fd_`` or ``kid_``, in that order."""
    wanted = [c for c in KNOWN_METRICS if c in frame.columns]
    wanted += sorted(c for c in frame.columns if isinstance(c, str) and c.startswith(("fd_", "kid_")) and c not in wanted)
    return [c for c in wanted if _is_numeric(frame[c])]


def format_value(value: Any) -> str:
    """A metric with 4 significant digits; missing values become an em dash."""
    if value is None:
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return MISSING
    return f"{number:.4g}"


def _format_nfe(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:.4g}"  # a mean NFE (rk45): 157.9


def _cell(text: Any) -> str:
    # A raw "|" would split the cell; newlines would end the table row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """Render a GitHub-flavoured Markdown table (no tabulate dependency); align is 'l'/'r' per column."""
    header = [_cell(h) for h in header]
    body = [[_cell(c) for c in row] for row in rows]
    align = list(align) if align is not None else ["l"] + ["r"] * (len(header) - 1)
    widths = [max([len(header[i])] + [len(r[i]) for r in body] + [3]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align)) + " |"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def _natural_key(label: str) -> list:
    # "s2" before "s10": grids name their points with numbers.
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label)]


def _plot_name(metric: str, suffix: str = PLOT_SUFFIX) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + suffix


def _labels(frame: pd.DataFrame) -> pd.Series:
    if "label" in frame.columns:
        labels = frame["label"].astype("object")
    else:
        labels = pd.Series([None] * len(frame), index=frame.index, dtype="object")
    # Rows without a label are still distinct configurations: fall back to their hash.
    if "config_hash" in frame.columns:
        labels = labels.where(labels.notna(), frame["config_hash"].astype("object"))
    return labels.where(labels.notna(), "(unlabelled)").astype(str)


def _identities(frame: pd.DataFrame) -> pd.Series:
    """What makes rows one configuration: the config hash (the label where a row has none)."""
    labels = _labels(frame)
    if "config_hash" not in frame.columns:
        return labels
    return frame["config_hash"].astype("object").where(frame["config_hash"].notna(), labels).astype(str)


def _tokens(label: str, row: pd.Series) -> list[str]:
    """A configuration's description as `key=value` words: its label split up, plus num_samples and seed."""
    words = label.split()
    head = words[0].split("/", 2) if words else []
    tokens = ([f"{k}={v}" for k, v in zip(("data", "model", "precond"), head)]
              if len(head) == 3 and "=" not in words[0] else words[:1]) + words[1:]
    for column in ("num_samples", "seed"):
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            tokens.append(f"{column}={_format_nfe(value)}")
    return tokens


def configurations(frame: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """({identity: label}, shared words): each configuration named by the words that are not common to all.

    Two configurations left with the same words (they differ in a key the label does not show)
    get their hash appended, so no two lines ever share a name.
    """
    if frame.empty:
        return {}, []
    identities, labels = _identities(frame), _labels(frame)
    firsts = frame.assign(_id=identities, _label=labels).drop_duplicates("_id")
    tokens = {row["_id"]: _tokens(row["_label"], row) for _, row in firsts.iterrows()}
    common = set.intersection(*(set(t) for t in tokens.values())) if len(tokens) > 1 else set()
    shared = [t for t in next(iter(tokens.values())) if t in common]
    names = {ident: " ".join(t for t in words if t not in common) or "(one configuration)"
             for ident, words in tokens.items()}
    counts = pd.Series(list(names.values())).value_counts()
    return {ident: (f"{name} [{ident[:8]}]" if counts[name] > 1 else name) for ident, name in names.items()}, shared


def _cells(frame: pd.DataFrame, metric: str, names: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (configuration, nfe) with the minimum of the metric and how many rows it came from;
    `label` is the configuration's name in `names` (default: `configurations(frame)`)."""
    names = names if names is not None else configurations(frame)[0]
    data = pd.DataFrame({
        "label": _identities(frame).map(names),
        "nfe": pd.to_numeric(frame["nfe"], errors="coerce"),
        "value": pd.to_numeric(frame[metric], errors="coerce"),
    })
    data = data.dropna(subset=["nfe", "value"])
    if data.empty:
        return pd.DataFrame({"label": [], "nfe": [], "value": [], "count": [], "mean": [], "std": []})
    return data.groupby(["label", "nfe"], sort=True)["value"].agg(
        value="min", count="size", mean="mean", std="std").reset_index()


def _format_spread(mean: Any, std: Any, count: Any) -> str:
    """`mean ± std (n)` of a cell; a single row has no spread and shows its value alone."""
    if format_value(mean) == MISSING:
        return MISSING
    if int(count) < 2:
        return format_value(mean)
    return f"{format_value(mean)} ± {format_value(std)} ({int(count)})"


def _metric_table(cells: pd.DataFrame, column: str = "value", cap: float = math.inf) -> tuple[str, int]:
    """configurations x NFE; `column` is "value" (the minimum, diverged ones marked †) or "spread" (mean ± std)."""
    nfes = sorted(cells["nfe"].unique())
    cells = cells.assign(spread=[_format_spread(m, s, n) for m, s, n in zip(cells["mean"], cells["std"], cells["count"])])
    wide = cells.pivot(index="label", columns="nfe", values=column)

    def fmt(v: Any) -> str:
        if column != "value":
            return v if isinstance(v, str) else MISSING
        text = format_value(v)
        return text + " †" if text != MISSING and not float(v) <= cap else text

    header = ["configuration"] + [_format_nfe(n) for n in nfes]
    rows = [[label] + [fmt(wide.at[label, n]) for n in nfes] for label in sorted(wide.index, key=_natural_key)]
    return markdown_table(header, rows), int((cells["count"] > 1).sum())


def _best_per_budget(cells: pd.DataFrame, metric: str) -> str:
    rows = []
    for budget in sorted(cells["nfe"].unique()):
        within = cells[cells["nfe"] <= budget]
        # Ties go to the cheaper configuration, then alphabetically, so the choice is deterministic.
        best = within.sort_values(["value", "nfe", "label"], kind="stable").iloc[0]
        rows.append([_format_nfe(budget), best["label"], format_value(best["value"]), _format_nfe(best["nfe"])])
    return markdown_table(["NFE budget", "best configuration", metric, "at NFE"], rows, align="rlrr")


DIVERGED = 1e4  # a value above this multiple of the median of its metric's values counts as diverged
_MARKERS = "osDvPXh<>pd"  # no "^" nor "*": they mark diverged values and the paper reports' 3 % points
_DASHES = ["-", "--", ":", "-."]


def line_styles(labels: Iterable[str], sort: bool = True) -> dict[str, dict[str, Any]]:
    """A fixed colour, marker and dash per configuration, so it looks the same in every plot of a report
    (in natural order of the labels, or as given with `sort=False`)."""
    colours = [f"C{i}" for i in range(10)]
    labels = list(dict.fromkeys(labels))
    return {label: {"color": colours[i % 10], "marker": _MARKERS[i % len(_MARKERS)],
                    "linestyle": _DASHES[(i // 10) % len(_DASHES)]}
            for i, label in enumerate(sorted(labels, key=_natural_key) if sort else labels)}


def divergence_cap(values: pd.Series) -> float:
    """Above this a value counts as diverged: DIVERGED times the median of the finite positive values (inf if none)."""
    finite = values[values.map(lambda v: math.isfinite(v) and v > 0)]
    return DIVERGED * float(finite.median()) if not finite.empty else math.inf


def log_ticks(values: Sequence[float], max_ticks: int = 12) -> list[float]:
    """A subset of `values` (sorted, positive) spaced at least 1/max_ticks of the log range apart, keeping the last."""
    values = sorted(v for v in set(values) if v > 0)
    if len(values) <= 2:
        return values
    gap = max(math.log10(values[-1] / values[0]) / max_ticks, 0.05)
    kept = [values[0]]
    for v in values[1:-1]:
        if math.log10(v / kept[-1]) >= gap and math.log10(values[-1] / v) >= gap:
            kept.append(v)
    return kept + [values[-1]]  # the largest evaluated NFE is always labelled


def png_bytes(fig: Figure) -> bytes:
    """A figure as PNG bytes, cropped to what it draws (legends outside the axes included)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def draw_lines(ax, cells: pd.DataFrame, styles: dict[str, dict[str, Any]], line: str = "label", x: str = "nfe",
               log_x: bool = True, max_ticks: int = 12) -> tuple[float, bool]:
    """`value` against `x`, one line per `line` (in `styles`' order); returns (the divergence cap, any diverged).

    Values above `divergence_cap` or non-finite are drawn as triangles on the top edge instead of
    stretching the axis; a positive x axis is logarithmic, ticked at the evaluated values, thinned.
    """
    cap = divergence_cap(cells["value"])
    plotted = cells[cells["value"].map(lambda v: not math.isnan(v))]
    shown = plotted[plotted["value"].map(lambda v: math.isfinite(v) and v <= cap)]
    diverged = plotted[~plotted.index.isin(shown.index)]
    for name in [n for n in styles if n in set(plotted[line])]:
        part = shown[shown[line] == name].sort_values(x)
        ax.plot(part[x], part["value"], markersize=5, linewidth=1.4, label=name, **styles[name])
    log_y = not shown.empty and bool((shown["value"] > 0).all())
    if log_y:
        ax.set_yscale("log")
    if not diverged.empty:
        top = cap if math.isfinite(cap) else float(shown["value"].max())
        ax.set_ylim(top=top * (1.6 if log_y else 1.05))
        for name, part in diverged.groupby(line):
            ax.plot(part[x], [top] * len(part), linestyle="none", marker="^", markersize=8,
                    color=styles[name]["color"], clip_on=False)
    xs = sorted(v for v in plotted[x].unique() if v > 0)
    if log_x and xs and len(xs) == plotted[x].nunique():
        ax.set_xscale("log")
        # Default log ticks would only show powers of ten; label evaluated values, thinned so they never collide.
        ticks = log_ticks(xs, max_ticks)
        ax.set_xticks(ticks, [_format_nfe(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    return cap, not diverged.empty


def _render_plot(cells: pd.DataFrame, metric: str, title: str, x: str = "nfe",
                 styles: dict[str, dict[str, Any]] | None = None) -> bytes | None:
    """`plot_figure` as PNG bytes (None when nothing can be drawn)."""
    fig = plot_figure(cells, metric, title, x, styles)
    return None if fig is None else png_bytes(fig)


def plot_figure(cells: pd.DataFrame, metric: str, title: str, x: str = "nfe",
                styles: dict[str, dict[str, Any]] | None = None) -> Figure | None:
    """Lines of `value` against `x` ("nfe": log axis of the evaluated NFEs; "kimg": training progress)."""
    finite = cells[cells["value"].map(math.isfinite)] if not cells.empty else cells
    if finite.empty or not (finite["value"] <= divergence_cap(cells["value"])).any():
        return None
    styles = styles or line_styles(cells["label"])
    fig = Figure(figsize=(8.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cap, diverged = draw_lines(ax, cells, styles, x=x, log_x=x == "nfe")
    if diverged:
        top = cap if math.isfinite(cap) else float(finite["value"].max())
        ax.plot([], [], linestyle="none", marker="^", color="0.3", label=f"diverged (> {format_value(top)} or not finite)")
    ax.set_xlabel("NFE (denoiser evaluations)" if x == "nfe" else "training progress (kimg)")
    ax.set_ylabel(f"{metric} (min over rows, lower is better)")
    ax.set_title(f"{title}: {metric} vs {'NFE' if x == 'nfe' else 'kimg'}")
    n = len(ax.get_legend_handles_labels()[0])
    ax.legend(fontsize="small" if n <= 12 else "x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, ncol=1 if n <= 25 else 2)  # outside the axes: never over the data
    return fig


_KIMG_SUFFIX = r" @ \S+ kimg$"  # older training rows carried their evaluation point in the label


def _is_training(frame: pd.DataFrame) -> pd.Series:
    """Rows of training-time evaluations: task "train" with a numeric kimg."""
    if "task" not in frame.columns or "kimg" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return (frame["task"] == "train") & pd.to_numeric(frame["kimg"], errors="coerce").notna()


def _run_labels(frame: pd.DataFrame) -> pd.Series:
    """One name per training run; runs that share a label are told apart by their run hash."""
    labels = _labels(frame).str.replace(_KIMG_SUFFIX, "", regex=True)
    if "run_hash" in frame.columns:
        runs = frame["run_hash"].astype(str)
        shared = labels.map(runs.groupby(labels).nunique()) > 1
        labels = labels.where(~shared, labels + " [" + runs.str[:8] + "]")
    return labels


def _progress(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (run, kimg) with the metric (the minimum if evaluated twice)."""
    data = pd.DataFrame({"label": _run_labels(frame), "kimg": pd.to_numeric(frame["kimg"], errors="coerce"),
                         "value": pd.to_numeric(frame[metric], errors="coerce")}).dropna(subset=["kimg", "value"])
    return data.groupby(["label", "kimg"], sort=True)["value"].min().reset_index()


def _training_section(frame: pd.DataFrame, metrics: Sequence[str], title: str,
                      plots: dict[str, bytes]) -> list[str]:
    """Markdown of every metric against kimg for the training runs (plots are added to `plots`)."""
    md = ["## Training progress", "",
          "Evaluations of the EMA network during training (`task=train`): rows are training runs, "
          "columns are kimg.", ""]
    for metric in metrics:
        progress = _progress(frame, metric)
        if progress.empty:
            continue
        md += [f"### {metric} vs kimg", ""]
        png = _render_plot(progress, metric, title, x="kimg")
        if png is not None:
            name = _plot_name(metric, KIMG_PLOT_SUFFIX)
            plots[name] = png
            md += [f"![{metric} vs kimg]({name})", ""]
        wide = progress.pivot(index="label", columns="kimg", values="value")
        kimgs = list(wide.columns)
        if len(kimgs) > _MAX_KIMG_COLUMNS:  # evenly spaced, always with the first and the last
            picks = sorted({round(i * (len(kimgs) - 1) / (_MAX_KIMG_COLUMNS - 1)) for i in range(_MAX_KIMG_COLUMNS)})
            kimgs = [kimgs[i] for i in picks]
        rows = [[run] + [format_value(wide.at[run, k]) for k in kimgs] for run in sorted(wide.index, key=_natural_key)]
        md += [markdown_table(["training run", *(f"{k:g}" for k in kimgs)], rows), ""]
        if len(kimgs) < len(wide.columns):
            md += [f"*{len(kimgs)} of {len(wide.columns)} evaluations shown; results.csv has all.*", ""]
    return md


def _distinct(frame: pd.DataFrame, column: str) -> str:
    if column not in frame.columns:
        return "n/a (no column)"
    counts = frame[column].dropna().astype(str).value_counts()
    if counts.empty:
        return "0"
    items = sorted(counts.items())
    listed = ", ".join(f"`{_cell(v)}` ({n} rows)" for v, n in items[:_MAX_LISTED])
    more = f", … (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)}: {listed}{more}"


def _provenance(frame: pd.DataFrame) -> list[str]:
    lines = ["## Provenance", "", f"- rows: {len(frame)}"]
    if "nfe" in frame.columns:
        unusable = int(pd.to_numeric(frame["nfe"], errors="coerce").isna().sum())
        if unusable:
            lines.append(f"- rows without a numeric `nfe` (kept in results.csv, left out above): {unusable}")
        lines.append(f"- configurations: {_labels(frame).nunique()}")
    for title, column in (("sweeps", "sweep"), ("git commits", "git_commit"), ("data sets", "data"),
                          ("models", "model"), ("networks", "network"), ("checkpoints", "checkpoint"),
                          ("seeds", "seed")):
        lines.append(f"- {title}: {_distinct(frame, column)}")
    if "time" in frame.columns:
        times = frame["time"].dropna().astype(str)
        if not times.empty:
            lines.append(f"- evaluated between {times.min()} and {times.max()}")
    return lines


def _sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("label", "nfe") if c in frame.columns]
    if not keys:
        return frame
    return frame.sort_values(keys, kind="stable", na_position="last").reset_index(drop=True)


def _remove_stale_plots(out_dir: Path, keep: set[str]) -> None:
    # A metric that vanished from the report must not leave a plot that looks current.
    for path in [*out_dir.glob("*" + PLOT_SUFFIX), *out_dir.glob("*" + KIMG_PLOT_SUFFIX),
                 *out_dir.glob(loss_profile.PLOT)]:
        if path.name not in keep:
            try:
                path.unlink()
            except OSError:
                pass


def select_rows(frame: pd.DataFrame, keys: set[tuple[str, int, int]] | None = None,
                where: str | None = None) -> pd.DataFrame:
    """The rows whose (config_hash, num_steps, repeat) is in `keys` (None: all), then those matching
    `where`, a pandas query over the row columns (e.g. "solver == 'heun' and nfe <= 35")."""
    if keys is not None and not frame.empty:
        repeat = frame["repeat"] if "repeat" in frame.columns else pd.Series(0, index=frame.index)
        found = [(str(h), int(n), int(r)) in keys
                 for h, n, r in zip(frame["config_hash"], frame["num_steps"], repeat.fillna(0))]
        frame = frame[found]
    if where:
        try:
            frame = frame.query(where)
        except Exception as exc:  # noqa: BLE001 - pandas raises many kinds for a bad expression
            raise ValueError(f"task.where={where!r} is not a query over the row columns ({exc})") from None
    return frame.reset_index(drop=True)


def configuration_notes(frame: pd.DataFrame) -> list[str]:
    """Markdown notes on configurations that are none of the paper's samplers, saying what they are."""
    if frame.empty or not {"schedule", "scaling"} <= set(frame.columns):
        return []
    unpaired = frame[(frame["schedule"] == "vp") & (frame["scaling"] == "none")]
    if unpaired.empty:
        return []
    return ["**About `schedule=vp` with `scaling=none`.** These rows use the VP noise schedule sigma(t) without "
            "the VP scaling s(t), which the paper's VP sampler pairs it with (`schedule=vp scaling=vp`, or "
            "`experiment=vp_original`): an ablation, not one of the paper's samplers. The ODE's step is then "
            "taken in t, where sigma grows like exp(beta_d t^2 / 4): a step from t_i to t_{i+1} moves x by "
            "(t_{i+1} - t_i) sigma'(t_i)/sigma(t_i) times its distance to the denoised image, and at a few "
            "coarse steps that factor is far below -1 (about -8.8 for the first of 2 Euler steps from sigma = 80, -2.4 and -3.6 for the first two of 4), so "
            "the sample overshoots instead of contracting and the metric diverges; a factor near -1 at a high "
            "noise level (-0.98 at sigma = 17.5 of 9 Euler steps) replaces every sample by its denoised estimate "
            "there, close to the data mean, so the samples collapse towards one image. With sigma(t) = t "
            "(`schedule=edm`) the same factor is sigma_{i+1}/sigma_i - 1, between -1 and 0.", ""]


def write_report(
    frame: pd.DataFrame,
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    title: str = "edm-lab report",
) -> Path:
    """Regenerate report.md, one <metric>_vs_nfe.png per metric and results.csv in out_dir; returns report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.md"
    # Render everything in memory first: a failure then leaves the previous report untouched.
    csv_text = _sorted_frame(frame).to_csv(index=False) if len(frame.columns) else ""
    plots: dict[str, bytes] = {}
    md = [f"# {title}", ""]

    if frame.empty:
        md += ["No results yet: the results store holds no rows.", ""]
        atomic_write_text(out_dir / "results.csv", csv_text)
        atomic_write_text(report_path, "\n".join(md))
        _remove_stale_plots(out_dir, set())
        return report_path

    if "nfe" not in frame.columns:
        raise ValueError("result rows have no 'nfe' column; cannot tabulate metrics against NFE")
    if metrics is None:
        metrics = default_metrics(frame)
    else:
        metrics = list(dict.fromkeys(metrics))
        unknown = [m for m in metrics if m not in frame.columns]
        if unknown:
            available = ", ".join(default_metrics(frame)) or "none"
            raise ValueError(f"unknown metric column(s) {unknown}; metric columns present: {available}")

    training, profiles = _is_training(frame), loss_profile.is_loss_profile(frame)
    sampling = frame[~training & ~profiles]
    md += [f"Generated from {len(frame)} result rows. All metrics are lower-is-better"
           + ("; in the NFE tables rows are configurations, columns are NFE (number of denoiser evaluations)."
              if not sampling.empty else "."), ""]
    if not metrics:
        md += [f"No metric columns found (looked for {', '.join(KNOWN_METRICS)}, `fd_*` and `kid_*`).", ""]
    else:
        md += ["Metrics: " + ", ".join(f"[{m}](#{re.sub(r'[^a-z0-9_-]', '', m.lower())})" for m in metrics), ""]

    names, shared = configurations(sampling)
    styles = line_styles(names.values())
    if shared and len(names) > 1:
        md += ["Shared by every configuration below: " + " ".join(f"`{_cell(t)}`" for t in shared), ""]
    md += configuration_notes(sampling)
    for metric in metrics if not sampling.empty else ():
        md += [f"## {metric}", ""]
        cells = _cells(sampling, metric, names)
        if cells.empty:
            md += [f"No rows have a value for `{metric}`.", ""]
            continue
        png = _render_plot(cells, metric, title, styles=styles)
        if png is not None:
            plots[_plot_name(metric)] = png
            md += [f"![{metric} vs NFE]({_plot_name(metric)})", ""]
        cap = divergence_cap(cells["value"])
        table, n_multi = _metric_table(cells, cap=cap)
        md += [table, ""]
        if (~cells["value"].map(lambda v: float(v) <= cap)).any():
            md += [f"*† diverged: above {format_value(cap)} ({DIVERGED:g} × the median of these values) or not "
                   "finite; drawn on the plot's top edge.*", ""]
        if n_multi:
            md += [f"*{n_multi} of {len(cells)} cells aggregate several rows (repeats with disjoint seeds, "
                   "sweeps or seeds); each shows the minimum, following the paper's convention. "
                   "Mean ± std (rows) over the same cells:*", "", _metric_table(cells, "spread")[0], ""]
        md += [f"### Best configuration per NFE budget ({metric})", "",
               "For each budget B, the configuration with the lowest value among evaluations with NFE ≤ B.", "",
               _best_per_budget(cells, metric), ""]

    if training.any():
        md += _training_section(frame[training], metrics, title, plots)
    if profiles.any():
        section, pngs = loss_profile.loss_profile_section(frame[profiles], title)
        md += [section, ""]
        plots.update(pngs)
    md += _provenance(frame) + [""]

    for name, data in plots.items():
        atomic_write_bytes(out_dir / name, data)
    atomic_write_text(out_dir / "results.csv", csv_text)
    atomic_write_text(report_path, "\n".join(md))  # last, so it only ever links to plots that exist
    _remove_stale_plots(out_dir, set(plots))
    return report_path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: load a ResultsStore and regenerate the report folder; prints the report path."""
    parser = argparse.ArgumentParser(prog="python -m edm_lab.report.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results store root (default: results)")
    parser.add_argument("--out", default="reports", help="report folder to regenerate (default: reports)")
    parser.add_argument("--metric", dest="metrics", action="extend", nargs="+", default=None,
                        help="metric column(s) to report (default: fid, fd_*, sampler_rmse present)")
    parser.add_argument("--title", default="edm-lab report")
    args = parser.parse_args(argv)
    frame = ResultsStore(args.results).load()
    try:
        path = write_report(frame, args.out, metrics=args.metrics, title=args.title)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
