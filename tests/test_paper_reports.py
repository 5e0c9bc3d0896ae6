"""The paper's artifacts as reports: published numbers as in the shared list, curves recognised from the rows,
panels never merging different setups, numbers in the reports equal to the rows'."""
from __future__ import annotations

import math
import re

import matplotlib.image as mpimg
import pandas as pd
import pytest
from hydra.utils import instantiate

from edm_lab.report.paper import numbers, write_paper_reports
from edm_lab.report.paper.figures import figure2, within_best
from edm_lab.tasks.hydra_support import regenerate_paper
from edm_lab.tasks.sample import run_sample
from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT, in_ci
from tests.test_configs import compose_cfg

PAPER_NUMBERS = PROJECT_ROOT.parent / "shared" / "docs" / "paper-numbers.md"
TINY = ["data=toy2d", "data.num_samples=128", "metric=raw", "num_samples=32", "batch_size=32",
        "metric.sampler_error=false", "logger=csv", "trainer.enable_progress_bar=false"]


def paper_numbers_text() -> str:
    if not PAPER_NUMBERS.is_file():
        if in_ci():
            pytest.fail(f"{PAPER_NUMBERS} is missing (CI is set)")
        pytest.skip(f"{PAPER_NUMBERS} is absent")
    return PAPER_NUMBERS.read_text()


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_published_numbers_are_the_shared_lists():
    text = paper_numbers_text()
    figure2_rows = {r[0].split(" ")[0]: r for r in table_rows(text, "| model | original sampler |")}
    for column, key in (("vp", "VP"), ("ve", "VE"), ("iddpm", "ImageNet-64")):
        for curve, cell in (("original", figure2_rows[key][1]), ("edm", figure2_rows[key][2])):
            value, nfe = re.fullmatch(r"([\d.]+) at (\d+)", cell).groups()
            assert numbers.FIGURE2[column][curve] == numbers.Published(float(value), int(nfe), "[S]")
    quoted = re.search(r"VP ([\d.]+)/(\d+) ->\s+([\d.]+)/(\d+); VE ([\d.]+)/(\d+) -> ([\d.]+)/(\d+);\s+"
                       r"ImageNet-64 ([\d.]+)/(\d+) -> ([\d.]+)/(\d+)", text).groups()
    for i, column in enumerate(("vp", "ve", "iddpm")):
        det, det_nfe, sto, sto_nfe = quoted[4 * i: 4 * i + 4]
        assert numbers.FIGURE4[column]["deterministic"] == numbers.Published(float(det), int(det_nfe), "[S]")
        assert numbers.FIGURE4[column]["stochastic"] == numbers.Published(float(sto), int(sto_nfe), "[S]")
    table5 = {r[0]: r for r in table_rows(text, "| model | S_churn |")}
    for preset, name in (("cifar10_vp", "CIFAR-10 VP"), ("cifar10_ve", "CIFAR-10 VE"),
                         ("imagenet_adm", "ImageNet-64, pre-trained ADM"), ("imagenet_edm", "ImageNet-64, EDM retrained")):
        values, tag = numbers.TABLE5[preset]
        assert values == tuple(float(v) for v in table5[name][1:5]) and tag == table5[name][5]
    for row in table_rows(text, "| config | cond. VP |"):
        config = row[0][0]
        for key, cell in zip(("cond_vp", "cond_ve", "uncond_vp"), row[1:4]):
            published = numbers.TABLE2[config].get(key)
            assert (published.fid if published else "") == (float(cell) if cell else "")


@pytest.mark.parametrize("preset", list(numbers.TABLE5))
def test_table5_presets_hold_the_published_settings(tmp_path, preset):
    churn = instantiate(compose_cfg(tmp_path, f"churn={preset}").churn)
    assert (churn.S_churn, churn.S_min, churn.S_max, churn.S_noise) == numbers.TABLE5[preset][0]


def run(tmp_path, *overrides: str) -> list[dict]:
    from edm_lab.tasks.hydra_support import _choices

    cfg = compose_cfg(tmp_path, *TINY, *overrides)
    return run_sample(cfg, _choices())  # the option chosen in every group, as run.py passes them


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Figure 2 on all three panels, Figure 4 and an S_churn sweep on the VP panel, on the ideal denoiser."""
    root = tmp_path_factory.mktemp("paper")
    for experiment in ("vp_original", "vp_heun", "vp_edm", "ve_original", "ve_heun", "ve_edm", "iddpm_original",
                       "iddpm_edm"):
        run(root, f"experiment={experiment}", "nfe.steps=[2,4,8]")
    for experiment in ("figure4/vp_alg2", "figure4/vp_alg2_no_range", "figure4/vp_alg2_unit_noise",
                       "figure4/vp_alg2_plain", "vp_original_stochastic"):
        run(root, f"experiment={experiment}", "nfe.steps=[4,8]")
    for s_churn in (0, 10, 30):
        run(root, "experiment=figure4/vp_alg2", f"churn.S_churn={s_churn}", "nfe.steps=[6]")
    run(root, "experiment=vp_edm", "nfe.steps=[2,4,8]", "num_samples=48")  # another setup: its own panel
    return root


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    nxt = text.find("\n## ", start + 1)
    return text[start: nxt if nxt > 0 else None]


def first_table(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:start + 1] + lines[start + 2:]:
        if not ln.startswith("|"):
            break
        block.append([x.strip() for x in ln.strip("|").split("|")])
    return {c[0]: c[1:] for c in block}  # the header row under its first cell


def test_paper_task_writes_every_artifact(store):
    path = regenerate_paper(compose_cfg(store, "task=paper"))
    assert path == store / "reports" / "paper" / "index.md"
    index = path.read_text()
    for name in ("figure2", "figure4", "churn"):
        assert f"({name}.md)" in index
        png = mpimg.imread(store / "reports" / "paper" / f"{name}.png")
        assert png.shape[0] > 200 and png.shape[1] > 400
    frame = ResultsStore(store / "results").load()
    text = (store / "reports" / "paper" / "figure2.md").read_text()
    # One panel per network and setup: the 48-sample run is a panel of its own, never merged.
    assert [h for h in re.findall(r"^## (.*)$", text, re.M)] == ["VP: ideal denoiser"] * 2 + [
        "VE: ideal denoiser", "ImageNet/DDIM (iDDPM preconditioning): ideal denoiser"]
    vp = section(text, "## VP: ideal denoiser")
    assert "32 samples" in vp
    table = first_table(vp)
    expected = frame[(frame.precond == "vp") & (frame.solver == "euler") & (frame.discretization == "vp")
                     & (frame.num_samples == 32)].sort_values("nfe")
    assert table["NFE"] == ["original sampler (Euler, VP time steps)", "+ Heun and EDM time steps",
                            "+ EDM sigma(t) and s(t)"]  # one column per curve, in the paper's order
    assert [table[str(n)][0] for n in expected["nfe"]] == [f"{v:.4g}" for v in expected["fd_raw"]]
    assert "2.85 at 256 [S]" in vp and "not comparable" in vp and "data=toy2d" in vp


def test_figure4_and_churn_panels(store):
    regenerate_paper(compose_cfg(store, "task=paper"))
    text = (store / "reports" / "paper" / "figure4.md").read_text()
    table = first_table(section(text, "## VP: ideal denoiser"))
    assert table["NFE"] == ["deterministic (Algorithm 1)", "Algorithm 2, Table 5 (cifar10_vp)", "S_min, S_max disabled",
                           "S_noise = 1", "S_min, S_max disabled and S_noise = 1",
                           "original stochastic sampler (euler maruyama)"]
    assert "S_churn=30, S_min=0.01, S_max=1, S_noise=1.007" in text and "2.27 at 383 [S]" in text
    churn = first_table(section((store / "reports" / "paper" / "churn.md").read_text(), "## VP: ideal denoiser"))
    assert churn["S_churn"] == ["4 steps", "6 steps", "8 steps"]  # the Figure 4 runs at S_churn 30 count too
    assert list(churn)[1:4] == ["0", "10", "30"] and churn["0"][0] == "—" and churn["30"][0] != "—"


def test_within_three_percent_marker():
    cells = pd.DataFrame({"curve": ["a"] * 4, "nfe": [4, 8, 16, 32], "value": [10.0, 2.05, 2.0, 2.01]})
    best, at, value = within_best(cells)["a"]
    assert (best, at, value) == (2.0, 8, 2.05)  # 2.05 <= 1.03 * 2.0


def test_comparable_only_with_the_papers_network_and_fid():
    row = dict(config_hash="h", precond="vp", schedule="vp", scaling="vp", discretization="vp", solver="euler",
               nfe=255, num_steps=255, fid=2.9, data="image_folder", model="official", num_samples=50000, seed=0,
               checkpoint="https://x/baseline-cifar10-32x32-uncond-vp.pkl", S_churn=0.0, S_min=0.0,
               S_max=math.inf, S_noise=1.0)
    text = figure2(pd.DataFrame([row])).markdown
    assert "| original sampler (Euler, VP time steps) | 2.9 at NFE 255 | 2.85 at 256 [S] | +0.05 |" in text
    other = figure2(pd.DataFrame([dict(row, checkpoint="mine.pkl")])).markdown
    assert "+0.05" not in other and "not comparable" in other


def test_no_rows_no_artifacts(tmp_path):
    index = write_paper_reports(pd.DataFrame(), tmp_path).read_text()
    assert "No rows for: figure2, figure4, churn_sensitivity, table2, loss_per_noise_level" in index
    assert not list(tmp_path.glob("*.png"))


def test_the_black_box_rk45_point_joins_its_panel():
    base = dict(precond="ve", scaling="none", fd_raw=1.0, data="toy2d", model="ideal", num_samples=32, seed=0,
                S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0, checkpoint=None)
    rows = [dict(base, config_hash="a", schedule="ve", discretization="ve", solver="euler", nfe=n, num_steps=n,
                 fd_raw=10.0 / n) for n in (4, 8)]
    rows.append(dict(base, config_hash="b", schedule="ve", discretization="ve", solver="rk45", nfe=456.254,
                     num_steps=18, fd_raw=0.5))
    text = figure2(pd.DataFrame(rows)).markdown
    table = first_table(section(text, "## VE: ideal denoiser"))
    assert table["NFE"] == ["original sampler (Euler, VE time steps)", "black-box RK45 (original sigma(t), s(t))"]
    assert (table["8"], table["456.3"], table["within 3% at"]) == (["1.25", "—"], ["—", "0.5"], ["8", "456.3"])
    assert "was not run" not in text


def training_row(run: str, net: str, axes: tuple, kimg: float, value: float, **extra) -> dict:
    precond, noise, weighting, augment = axes
    return {**dict(task="train", run_hash=run, config_hash=f"{run}{kimg}", net=net, precond=precond, noise=noise,
                   weighting=weighting, augment=augment, kimg=kimg, fd_classifier=value, nfe=35, num_steps=18,
                   data="digits", num_samples=512, label="train_digits train digits"), **extra}


def test_table2_from_the_final_evaluations():
    from edm_lab.report.paper.table2 import table2

    vp, edm = ("vp", "vp", "vp", None), ("edm", "edm", "edm", "edm")
    rows = [training_row("a", "ddpmpp_small", vp, 50, 9.0), training_row("a", "ddpmpp_small", vp, 100, 4.0),
            training_row("f", "ddpmpp_small", edm, 100, 3.0), training_row("f2", "ddpmpp_small", edm, 100, 3.5),
            training_row("e", "ncsnpp_small", ("edm", "edm", "edm", "none"), 100, 2.0),
            training_row("b", "ddpmpp_cifar10", vp, 200000, 2.2, class_conditional=True, data="image_folder",
                         label="cifar10_b_vp train image_folder/ddpmpp_cifar10/vp"),
            training_row("x", "ddpmpp_small", ("edm", "vp", "edm", "none"), 100, 1.0)]  # none of Table 2's
    text = table2(pd.DataFrame(rows)).markdown
    table = first_table(section(text, "## data=digits, 512 samples, NFE 35"))  # each setup its own table
    assert table["config"] == ["uncond. VP: ours (kimg)", "uncond. VE (no paper column): ours (kimg)",
                               "uncond. VP: paper"]
    assert table["A baseline (Song et al.)"] == ["4 (100)", "—", "3.01 at 35 [S]"]  # the last evaluation, not 9
    assert table["F non-leaky augmentation"] == ["3 (100) [f]; 3.5 (100) [f2]", "—", "1.97 at 35 [A]"]
    assert table["E EDM loss function"] == ["—", "2 (100)", "2.05 at 35 [S]"]
    assert "Not comparable" in text
    cifar = first_table(section(text, "## data=image_folder, 512 samples, NFE 35"))
    assert cifar["B adjusted hyperparameters"] == ["2.2 (200000)", "2.18 at 35 [S]"]  # named by its preset
    fid = dict(rows[5], fid=2.2, fd_classifier=None)
    measured = first_table(table2(pd.DataFrame([fid])).markdown)
    assert measured["config"][-1] == "cond. VP: difference" and measured["B adjusted hyperparameters"][-1] == "+0.02"


def test_the_miniature_commands_compose_and_pass_the_schema(tmp_path, monkeypatch):
    """Every command of `python -m edm_lab.tasks.miniature` is a valid config (its networks stand in as files)."""
    from edm_lab.tasks import miniature, schema

    monkeypatch.chdir(PROJECT_ROOT)  # sweeps/ is found from the project root
    fresh = miniature.commands(tmp_path, 300)
    trainings = [c for c in fresh if "experiment=train_digits" in c]
    assert len(fresh) == 4 + 2 * 4 + 1  # 4 trainings, 4 sampling commands per panel, the paper report
    assert len(trainings) == 4 and all("task.duration_kimg=300" in c for c in trainings)
    for name in miniature.RUNS:  # trained: a resumed miniature skips their training
        path = miniature.network_path(tmp_path, name, 300)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in")
    resumed = miniature.commands(tmp_path, 300)
    assert resumed == fresh[4:]
    for cmd in fresh:
        overrides = [o for o in cmd if o != "-m" and not o.startswith(("hydra.", "paths.root"))]
        schema.check(compose_cfg(tmp_path, *overrides))
