"""Regenerate the report folder (Markdown tables, metric-vs-NFE plots, CSV) from result rows.

Usage: ``python -m edm_lab.report.report --results results --out reports [--metric fid ...]``.

Everything is rebuilt from the rows each time, so the report can never drift from the store.
All metrics are taken to be lower-is-better (FID, Fréchet distances, sampler RMSE). When several
rows share a (configuration, NFE) cell -- the repeats of the seed protocol, several sweeps or
seeds -- the minimum is reported, following the paper's convention (Karras et al. report the best
of three), and a second table gives mean ± std over those rows.

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
from edm_lab.track.store import ResultsStore

__all__ = ["KNOWN_METRICS", "default_metrics", "format_value", "markdown_table", "write_report", "main"]

KNOWN_METRICS: tuple[str, ...] = ("fid", "fd_classifier", "fd_raw", "sampler_rmse")
PLOT_SUFFIX = "_vs_nfe.png"
KIMG_PLOT_SUFFIX = "_vs_kimg.png"
MISSING = "—"
_MAX_LISTED = 10  # provenance lists at most this many distinct values per field
_MAX_KIMG_COLUMNS = 10  # training progress tables show at most this many evaluations


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def default_metrics(frame: pd.DataFrame) -> list[str]:
    """Numeric columns among KNOWN_METRICS plus numeric columns starting with ``fd_``, in that order."""
    wanted = [c for c in KNOWN_METRICS if c in frame.columns]
    wanted += sorted(c for c in frame.columns if isinstance(c, str) and c.startswith("fd_") and c not in wanted)
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
    return str(int(number)) if number.is_integer() else f"{number:g}"


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


def _cells(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (label, nfe) with the minimum of the metric and how many rows it came from."""
    data = pd.DataFrame({
        "label": _labels(frame),
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


def _metric_table(cells: pd.DataFrame, column: str = "value") -> tuple[str, int]:
    """configurations x NFE; `column` is "value" (the minimum) or "spread" (mean ± std)."""
    nfes = sorted(cells["nfe"].unique())
    cells = cells.assign(spread=[_format_spread(m, s, n) for m, s, n in zip(cells["mean"], cells["std"], cells["count"])])
    wide = cells.pivot(index="label", columns="nfe", values=column)
    fmt = format_value if column == "value" else (lambda v: MISSING if not isinstance(v, str) else v)
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


def _render_plot(cells: pd.DataFrame, metric: str, title: str, x: str = "nfe") -> bytes | None:
    """Lines of `value` against `x` ("nfe": log axis of the evaluated NFEs; "kimg": training progress)."""
    finite = cells[cells["value"].map(math.isfinite)]
    if finite.empty:
        return None
    labels = sorted(finite["label"].unique(), key=_natural_key)
    fig = Figure(figsize=(8.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*Xh<>p"
    styles = ["-", "--", ":", "-."]
    for i, label in enumerate(labels):
        part = finite[finite["label"] == label].sort_values(x)
        # Colours repeat every 10 lines; vary marker and dash too so large grids stay distinguishable.
        ax.plot(part[x], part["value"], marker=markers[i % len(markers)],
                linestyle=styles[(i // 10) % len(styles)], markersize=5, linewidth=1.4, label=label)
    nfes = sorted(finite[x].unique())
    if x == "nfe" and nfes[0] > 0:
        ax.set_xscale("log")
        # Default log ticks would only show powers of ten; label the NFE values actually evaluated.
        shown = nfes if len(nfes) <= 12 else nfes[:: math.ceil(len(nfes) / 12)]
        ax.set_xticks(shown, [_format_nfe(n) for n in shown])
        ax.xaxis.set_minor_locator(NullLocator())
    if (finite["value"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser evaluations)" if x == "nfe" else "training progress (kimg)")
    ax.set_ylabel(f"{metric} (min over rows, lower is better)")
    ax.set_title(f"{title}: {metric} vs {'NFE' if x == 'nfe' else 'kimg'}")
    ax.grid(True, which="both", alpha=0.3)
    if len(labels) <= 6:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncol=1 if len(labels) <= 25 else 2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


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
    for path in [*out_dir.glob("*" + PLOT_SUFFIX), *out_dir.glob("*" + KIMG_PLOT_SUFFIX)]:
        if path.name not in keep:
            try:
                path.unlink()
            except OSError:
                pass


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

    training = _is_training(frame)
    sampling = frame[~training]
    md += [f"Generated from {len(frame)} result rows. All metrics are lower-is-better"
           + ("; in the NFE tables rows are configurations, columns are NFE (number of denoiser evaluations)."
              if not sampling.empty else "."), ""]
    if not metrics:
        md += [f"No metric columns found (looked for {', '.join(KNOWN_METRICS)} and `fd_*`).", ""]
    else:
        md += ["Metrics: " + ", ".join(f"[{m}](#{re.sub(r'[^a-z0-9_-]', '', m.lower())})" for m in metrics), ""]

    for metric in metrics if not sampling.empty else ():
        md += [f"## {metric}", ""]
        cells = _cells(sampling, metric)
        if cells.empty:
            md += [f"No rows have a value for `{metric}`.", ""]
            continue
        png = _render_plot(cells, metric, title)
        if png is not None:
            plots[_plot_name(metric)] = png
            md += [f"![{metric} vs NFE]({_plot_name(metric)})", ""]
        table, n_multi = _metric_table(cells)
        md += [table, ""]
        if n_multi:
            md += [f"*{n_multi} of {len(cells)} cells aggregate several rows (repeats with disjoint seeds, "
                   "sweeps or seeds); each shows the minimum, following the paper's convention. "
                   "Mean ± std (rows) over the same cells:*", "", _metric_table(cells, "spread")[0], ""]
        md += [f"### Best configuration per NFE budget ({metric})", "",
               "For each budget B, the configuration with the lowest value among evaluations with NFE ≤ B.", "",
               _best_per_budget(cells, metric), ""]

    if training.any():
        md += _training_section(frame[training], metrics, title, plots)
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
