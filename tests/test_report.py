"""Tests for edm_lab.report.report: the numbers in report.md must be the numbers in the rows."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

import edm_lab.report.report as report_mod
from edm_lab.report.report import default_metrics, format_value, main, markdown_table, write_report
from edm_lab.track.store import ResultsStore, config_hash

EULER, HEUN, CHURN = "solver=euler", "solver=heun", "solver=heun|churn=on"  # a pipe must survive the table

# (label, nfe, fd_classifier, sampler_rmse, sweep); (EULER, 15) appears twice -> the minimum, 12.5, shows.
POINTS = [
    (EULER, 7, 40.0, 0.31, "s1"),
    (EULER, 15, 20.0, 0.12, "s1"),
    (EULER, 15, 12.5, 0.15, "s2"),
    (EULER, 35, 8.0, 0.05, "s1"),
    (EULER, 79, 4.0, 0.021, "s1"),
    (HEUN, 7, 60.0, 0.5, "s1"),
    (HEUN, 15, 15.0, 0.03, "s1"),
    (HEUN, 35, 3.14159265, 0.004, "s1"),
    (HEUN, 79, 2.5, math.nan, "s1"),
    (CHURN, 15, 12345.678, 0.2, "s2"),
    (CHURN, 35, 2.9, 0.01, "s2"),
]
EXPECTED_BEST = {  # budget -> (label, value, at nfe), worked out by hand
    7: (EULER, 40.0, 7),
    15: (EULER, 12.5, 15),
    35: (CHURN, 2.9, 35),
    79: (HEUN, 2.5, 79),
}


def make_frame() -> pd.DataFrame:
    rows = []
    for i, (label, nfe, fd, rmse, sweep) in enumerate(POINTS):
        rows.append({
            "config_hash": config_hash({"label": label}), "label": label, "sweep": sweep,
            "data": "digits", "model": "ideal", "solver": label.split("=")[1].split("|")[0],
            "S_max": math.inf, "num_steps": (nfe + 1) // 2, "nfe": nfe,
            "fd_classifier": fd, "sampler_rmse": rmse, "fd_backbone": "resnet",  # a non-numeric fd_ column
            "seed": 0, "git_commit": "abc1234" if sweep == "s1" else "def5678",
            "time": f"2026-11-23T10:00:{i:02d}", "extra_col": f"x{i}",
        })
    return pd.DataFrame(rows)


def expected_cells(metric_index: int) -> dict[tuple[str, int], float]:
    cells: dict[tuple[str, int], float] = {}
    for point in POINTS:
        label, nfe, value = point[0], point[1], point[metric_index]
        if math.isnan(value):
            continue
        cells[(label, nfe)] = min(value, cells.get((label, nfe), math.inf))
    return cells


def split_row(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    nxt = re.search(r"^#{1,3} ", rest, flags=re.M)
    return rest[: nxt.start()] if nxt else rest


def parse_first_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append(ln)
    header = split_row(block[0])
    assert set(block[1].replace("|", "").replace(":", "").replace(" ", "")) == {"-"}
    return header, [split_row(ln) for ln in block[2:]]


def as_number(cell: str) -> float:
    return math.nan if cell in ("", "—") else float(cell)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # Rendered once for the read-only checks below: plotting dominates the test time.
    path = write_report(make_frame(), tmp_path_factory.mktemp("report") / "out", title="Test report")
    return path, path.read_text(encoding="utf-8")


# -- tables --------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric, index", [("fd_classifier", 2), ("sampler_rmse", 3)])
def test_table_cells_match_frame(report: tuple[Path, str], metric: str, index: int) -> None:
    _, text = report
    header, rows = parse_first_table(section(text, f"## {metric}"))
    assert header[0] == "configuration"
    nfes = [int(h) for h in header[1:]]
    assert nfes == sorted({p[1] for p in POINTS if not math.isnan(p[index])})
    expected = expected_cells(index)
    assert sorted(r[0] for r in rows) == sorted({p[0] for p in POINTS})
    seen = 0
    for row in rows:
        label = row[0]
        for nfe, cell in zip(nfes, row[1:]):
            want = expected.get((label, nfe))
            if want is None:
                assert cell == "—", (label, nfe, cell)
            else:
                # 4 significant digits, checked numerically and textually.
                assert cell == f"{want:.4g}", (label, nfe, cell)
                assert math.isclose(as_number(cell), want, rel_tol=5e-4)
                seen += 1
    assert seen == len(expected)


def test_duplicate_cell_shows_minimum_and_says_so(report: tuple[Path, str]) -> None:
    _, text = report
    body = section(text, "## fd_classifier")
    header, rows = parse_first_table(body)
    euler = next(r for r in rows if r[0] == EULER)
    assert as_number(euler[header.index("15")]) == 12.5  # min(20.0, 12.5)
    assert "1 of 10 cells aggregate several rows" in body and "minimum" in body


def test_rounding_to_four_significant_digits(report: tuple[Path, str]) -> None:
    _, text = report
    header, rows = parse_first_table(section(text, "## fd_classifier"))
    heun = next(r for r in rows if r[0] == HEUN)
    churn = next(r for r in rows if r[0] == CHURN)
    assert heun[header.index("35")] == "3.142"
    assert churn[header.index("15")] == "1.235e+04"


def test_best_per_budget(report: tuple[Path, str]) -> None:
    _, text = report
    header, rows = parse_first_table(section(text, "### Best configuration per NFE budget (fd_classifier)"))
    assert header == ["NFE budget", "best configuration", "fd_classifier", "at NFE"]
    got = {int(r[0]): (r[1], as_number(r[2]), int(r[3])) for r in rows}
    assert got == EXPECTED_BEST
    # Independent check straight from the frame: the argmin among rows with nfe <= budget.
    frame = make_frame()
    for budget, (label, value, nfe) in got.items():
        within = frame[frame["nfe"] <= budget]
        best = within.loc[within["fd_classifier"].idxmin()]
        assert (best["label"], best["fd_classifier"], best["nfe"]) == (label, value, nfe)


def test_provenance(report: tuple[Path, str]) -> None:
    _, text = report
    prov = section(text, "## Provenance")
    assert f"- rows: {len(POINTS)}" in prov
    assert re.search(r"- sweeps: 2: `s1` \(8 rows\), `s2` \(3 rows\)", prov)
    assert re.search(r"- git commits: 2: `abc1234`.*`def5678`", prov)
    assert "- data sets: 1: `digits`" in prov and "- models: 1: `ideal`" in prov
    assert "- configurations: 3" in prov


# -- plots ---------------------------------------------------------------------------------------

def test_pngs_are_valid_and_linked(report: tuple[Path, str]) -> None:
    path, text = report
    for metric in ("fd_classifier", "sampler_rmse"):
        png = path.parent / f"{metric}_vs_nfe.png"
        assert f"]({metric}_vs_nfe.png)" in text  # relative link
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[2] in (3, 4)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas
    assert sorted(p.name for p in path.parent.glob("*.png")) == ["fd_classifier_vs_nfe.png",
                                                                 "sampler_rmse_vs_nfe.png"]
    assert not list(path.parent.glob(".*"))  # no temp files left


def test_plot_with_nonpositive_and_infinite_values(tmp_path: Path) -> None:
    frame = make_frame()
    frame.loc[0, "fd_classifier"] = 0.0  # no log y possible
    frame.loc[1, "fd_classifier"] = math.inf  # a diverged sampler must not break the plot
    path = write_report(frame, tmp_path, metrics=["fd_classifier"])
    assert mpimg.imread(path.parent / "fd_classifier_vs_nfe.png").shape[0] > 100
    _, rows = parse_first_table(section(path.read_text(), "## fd_classifier"))
    euler = next(r for r in rows if r[0] == EULER)
    assert euler[1] == "0"


# -- csv, selection, edge cases ------------------------------------------------------------------

def test_results_csv_sorted_and_complete(report: tuple[Path, str]) -> None:
    path, _ = report
    csv = pd.read_csv(path.parent / "results.csv")
    assert len(csv) == len(POINTS)
    assert list(zip(csv["label"], csv["nfe"])) == sorted(zip(csv["label"], csv["nfe"]))
    assert "extra_col" in csv.columns and set(csv["extra_col"]) == {f"x{i}" for i in range(len(POINTS))}
    assert (csv["S_max"] == math.inf).all()


def test_empty_frame(tmp_path: Path) -> None:
    path = write_report(pd.DataFrame(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    assert "No results yet" in path.read_text()
    assert not list(path.parent.glob("*.png"))


def test_empty_frame_clears_stale_plots(tmp_path: Path) -> None:
    write_report(make_frame(), tmp_path)
    assert list(tmp_path.glob("*.png"))
    write_report(pd.DataFrame(), tmp_path)
    assert not list(tmp_path.glob("*.png"))


def test_metric_selection(tmp_path: Path) -> None:
    write_report(make_frame(), tmp_path)
    path = write_report(make_frame(), tmp_path, metrics=["sampler_rmse"])
    text = path.read_text()
    assert "## sampler_rmse" in text and "## fd_classifier" not in text
    assert [p.name for p in tmp_path.glob("*.png")] == ["sampler_rmse_vs_nfe.png"]  # stale plot gone
    with pytest.raises(ValueError, match="no_such_metric"):
        write_report(make_frame(), tmp_path, metrics=["no_such_metric"])
    assert path.read_text() == text  # a failed call leaves the previous report in place


def test_default_metrics() -> None:
    frame = make_frame()
    frame["fd_raw"] = 1.0
    frame["fid"] = 2.0
    frame["fd_dinov2"] = 3.0
    assert default_metrics(frame) == ["fid", "fd_classifier", "fd_raw", "sampler_rmse", "fd_dinov2"]
    assert "fd_backbone" not in default_metrics(frame)  # strings are not metrics


def test_frame_without_metrics(tmp_path: Path) -> None:
    frame = make_frame().drop(columns=["fd_classifier", "sampler_rmse"])
    text = write_report(frame, tmp_path).read_text()
    assert "No metric columns found" in text and "## Provenance" in text
    assert not list(tmp_path.glob("*.png"))


def test_crash_mid_report_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_report(make_frame(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("crash while plotting")

    monkeypatch.setattr(report_mod, "_render_plot", boom)
    frame = make_frame()
    frame["fd_classifier"] *= 2
    with pytest.raises(RuntimeError):
        write_report(frame, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert path.exists()


def test_rows_in_natural_order(tmp_path: Path) -> None:
    frame = pd.DataFrame({"label": ["rho=10", "rho=2", "rho=3"], "nfe": [7, 7, 7], "fid": [1.0, 2.0, 3.0]})
    _, rows = parse_first_table(section(write_report(frame, tmp_path).read_text(), "## fid"))
    assert [r[0] for r in rows] == ["rho=2", "rho=3", "rho=10"]


def test_markdown_table_and_format_helpers() -> None:
    table = markdown_table(["a", "b"], [["x|y", "1"], ["z", "22"]])
    lines = table.splitlines()
    assert len(lines) == 4 and all(ln.startswith("| ") and ln.endswith(" |") for ln in lines)
    assert split_row(lines[2]) == ["x|y", "1"]
    assert format_value(math.nan) == "—" and format_value(None) == "—"
    assert format_value(0.0042) == "0.0042" and format_value(123456) == "1.235e+05"
    assert format_value(math.inf) == "inf"


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_from_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ResultsStore(tmp_path / "results")
    for row in make_frame().to_dict("records"):
        store.write(row)
    out = tmp_path / "reports"
    assert main(["--results", str(store.root), "--out", str(out), "--metric", "fd_classifier"]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == out / "report.md"
    text = (out / "report.md").read_text()
    header, rows = parse_first_table(section(text, "### Best configuration per NFE budget (fd_classifier)"))
    assert {int(r[0]): r[1] for r in rows} == {b: v[0] for b, v in EXPECTED_BEST.items()}
    assert "## sampler_rmse" not in text


def test_cli_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "rep")]) == 0
    assert "No results yet" in (tmp_path / "rep" / "report.md").read_text()


def test_training_rows_are_drawn_against_kimg(tmp_path: Path) -> None:
    """Training evaluations get a metric-vs-kimg table and plot per run, not a place in the NFE tables."""
    rows = [{"config_hash": f"t{run}{kimg}", "run_hash": f"{run}" * 12, "label": "train digits/ddpmpp_small/edm",
             "task": "train", "kimg": kimg, "nfe": 35, "num_steps": 18, "fd_classifier": value}
            for run, series in (("a", {50: 9.0, 100: 4.5, 200: 2.25}), ("b", {50: 8.0, 200: 3.0}))
            for kimg, value in series.items()]
    rows.append({"config_hash": "s", "label": EULER, "task": "sample", "nfe": 35, "num_steps": 18, "fd_classifier": 7.0})
    text = write_report(pd.DataFrame(rows), tmp_path).read_text()
    nfe_part, training_part = text.split("## Training progress")
    assert EULER in nfe_part and "train digits" not in nfe_part
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in training_part.splitlines() if line.startswith("| train digits")}
    # Two runs share a label: each is told apart by its run hash.
    assert table == {"train digits/ddpmpp_small/edm [aaaaaaaa]": ["9", "4.5", "2.25"],
                     "train digits/ddpmpp_small/edm [bbbbbbbb]": ["8", "—", "3"]}
    header = next(line for line in training_part.splitlines() if line.startswith("| training run"))
    assert [c.strip() for c in header.split("|")[2:-1]] == ["50", "100", "200"]
    assert (tmp_path / "fd_classifier_vs_kimg.png").is_file() and mpimg.imread(tmp_path / "fd_classifier_vs_kimg.png").size


def test_repeats_show_minimum_and_mean_and_std(tmp_path: Path) -> None:
    rows = [{"config_hash": "h", "label": HEUN, "nfe": 35, "num_steps": 18, "repeat": k, "fid": v}
            for k, v in enumerate([2.0, 2.2, 2.4])]
    text = write_report(pd.DataFrame(rows), tmp_path).read_text()
    cells = [line for line in text.splitlines() if line.startswith(f"| {HEUN}")]
    assert cells[0].split("|")[2].strip() == "2"  # the minimum, the paper's convention
    assert cells[1].split("|")[2].strip() == "2.2 ± 0.2 (3)"


def test_long_training_runs_show_ten_evaluations(tmp_path: Path) -> None:
    rows = [{"config_hash": f"t{k}", "run_hash": "r" * 12, "label": "train x", "task": "train", "kimg": 2500.0 * k,
             "nfe": 35, "num_steps": 18, "fid": 100.0 / k} for k in range(1, 81)]
    text = write_report(pd.DataFrame(rows), tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| training run"))
    shown = [c.strip() for c in header.split("|")[2:-1]]
    assert len(shown) == 10 and shown[0] == "2500" and shown[-1] == "200000"
    assert "10 of 80 evaluations shown" in text


# -- reports that never mislead --------------------------------------------------------------------

def sweep_rows(sweep: str, num_samples: int, values: dict[int, float], solver: str = "heun",
               start: int = 0) -> list[dict]:
    label = f"digits/ideal/edm schedule=edm solver={solver}"
    return [{"config_hash": config_hash({"label": label, "num_samples": num_samples}), "label": label,
             "sweep": sweep, "solver": solver, "num_samples": num_samples, "seed": 0, "num_steps": nfe, "nfe": nfe,
             "fd_classifier": value, "time": f"2026-11-23T10:{start + i:02d}:00"}
            for i, (nfe, value) in enumerate(values.items())]


def test_rows_of_different_sample_counts_are_separate_lines(tmp_path: Path) -> None:
    frame = pd.DataFrame(sweep_rows("a", 1024, {7: 18.0, 35: 1.0}) + sweep_rows("b", 256, {7: 19.0, 35: 1.5}))
    text = write_report(frame, tmp_path).read_text()
    header, rows = parse_first_table(section(text, "## fd_classifier"))
    assert rows == [["num_samples=256", "19", "1.5"], ["num_samples=1024", "18", "1"]]
    assert "Shared by every configuration below: `data=digits` `model=ideal` `precond=edm` `schedule=edm` " \
           "`solver=heun` `seed=0`" in text
    assert "±" not in text  # nothing was averaged


def test_identical_words_get_their_hash(tmp_path: Path) -> None:
    rows = sweep_rows("a", 1024, {7: 18.0})
    other = dict(rows[0], config_hash="ffffffffffff", fd_classifier=30.0)
    names, shared = report_mod.configurations(pd.DataFrame([rows[0], other]))
    assert sorted(names.values()) == [f"(one configuration) [{rows[0]['config_hash'][:8]}]",
                                      "(one configuration) [ffffffff]"]


def test_report_rows_are_selected_by_key_and_query() -> None:
    frame = pd.DataFrame(sweep_rows("s1", 64, {7: 3.0}, "euler") + sweep_rows("s2", 64, {7: 2.0, 35: 1.0}, "heun"))
    heun = frame[frame["solver"] == "heun"]
    keys = {(h, n, 0) for h, n in zip(heun["config_hash"], heun["num_steps"])}
    assert list(report_mod.select_rows(frame, keys)["solver"]) == ["heun", "heun"]
    assert len(report_mod.select_rows(frame, None, "nfe <= 7")) == 2
    with pytest.raises(ValueError, match="task.where"):
        report_mod.select_rows(frame, None, "no_such_column > 3")


def test_report_task_scopes(tmp_path: Path) -> None:
    """A run's report holds the rows it computed or reused (its manifest), never other runs' rows."""
    import os

    from edm_lab.tasks.hydra_support import regenerate_report
    from edm_lab.tasks.schema import ConfigError
    from edm_lab.track.store import write_manifest
    from tests.test_configs import compose_cfg

    store = ResultsStore(tmp_path / "results")
    old, new = sweep_rows("x", 64, {7: 3.0}, "euler"), sweep_rows("x", 64, {7: 2.0}, "heun", start=30)
    for row in old + new:
        store.write(row)
    write_manifest(tmp_path / "multirun" / "2026-11-23" / "10-00-00" / "0", old)
    write_manifest(tmp_path / "outputs" / "2026-11-23" / "11-00-00", new + old)  # the newest, reusing `old`
    os.utime(tmp_path / "multirun" / "2026-11-23" / "10-00-00" / "0" / "rows.json", (1, 1))
    text = regenerate_report(compose_cfg(tmp_path, "task=report")).read_text()
    assert text.startswith("# edm-lab report: sweep 2026-11-23/11-00-00") and "solver=euler" in text
    text = regenerate_report(compose_cfg(tmp_path, "task=report", "task.sweep=2026-11-23/10-00-00")).read_text()
    assert "solver=heun" not in text and "Generated from 1 result rows" in text
    text = regenerate_report(compose_cfg(tmp_path, "task=report", "task.sweep=all", "task.where='nfe == 7'",
                                         "task.metrics=[fd_classifier]")).read_text()
    assert text.startswith("# edm-lab report: all rows where nfe == 7") and "Generated from 2 result rows" in text
    with pytest.raises(ConfigError, match="task.sweep=2026-01-01/00-00-00: no such run or sweep"):
        regenerate_report(compose_cfg(tmp_path, "task=report", "task.sweep=2026-01-01/00-00-00"))


def test_a_configuration_keeps_its_style_in_every_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = report_mod._render_plot

    def spy(cells, metric, title, x="nfe", styles=None):
        seen.append((metric, styles, set(cells["label"])))
        return real(cells, metric, title, x, styles)

    monkeypatch.setattr(report_mod, "_render_plot", spy)
    frame = make_frame()
    frame.loc[frame["label"] == EULER, "sampler_rmse"] = math.nan  # EULER is missing from one plot
    write_report(frame, tmp_path)
    (m1, styles1, labels1), (m2, styles2, labels2) = seen
    assert styles1 is styles2 and EULER in labels1 and EULER not in labels2
    assert len({s["color"] + s["marker"] for s in styles1.values()}) == 3


def test_diverged_values_are_marked_not_stretching_the_axis(tmp_path: Path) -> None:
    frame = pd.DataFrame(sweep_rows("a", 64, {3: 5.558e13, 5: 3.7e12, 7: 8.0, 11: 2.0, 17: 1.0})
                         + sweep_rows("a", 64, {3: 40.0, 5: 9.0, 7: 3.0, 11: 1.5, 17: 0.9}, "euler"))
    text = write_report(frame, tmp_path).read_text()
    header, rows = parse_first_table(section(text, "## fd_classifier"))
    heun = next(r for r in rows if r[0] == "solver=heun")
    assert heun[1:3] == ["5.558e+13 †", "3.7e+12 †"] and heun[3] == "8"
    assert "† diverged: above 5.5e+04 (10000 × the median of these values)" in text
    cells = report_mod._cells(frame, "fd_classifier")
    fig = report_mod.plot_figure(cells, "fd_classifier", "t")
    low, high = fig.axes[0].get_ylim()
    assert high < 1e6 and high >= report_mod.divergence_cap(cells["value"])  # 4 decades, not 14
    assert any("diverged" in t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_nfe_ticks_never_collide() -> None:
    nfes = [2, 3, 5, 7, 9, 11, 13, 15, 17, 25, 35, 49, 63, 127, 255, 511]
    ticks = report_mod.log_ticks(nfes)
    gaps = [math.log10(b / a) for a, b in zip(ticks, ticks[1:])]
    assert ticks[0] == 2 and ticks[-1] == 511 and len(ticks) <= 13
    assert min(gaps) >= math.log10(511 / 2) / 12
