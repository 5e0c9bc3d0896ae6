"""The training loss per noise level (Figure 5a): the measurement, p(sigma), the training task's row, the report."""
from __future__ import annotations

import io
import math
import re

import matplotlib.image
import pandas as pd
import pytest
import torch
from torch import nn

from edm_lab.design.losses import (EDMNoise, EDMWeighting, InverseSquareWeighting, UniformWeighting, VENoise,
                                   loss_per_sigma, noise_density, sigma_grid)
from edm_lab.nets.ideal import IdealDenoiser
from edm_lab.report.loss_profile import PLOT, loss_profile_section
from edm_lab.tasks.train import run_identity
from edm_lab.track.store import ResultsStore, read_manifests, row_key
from tests.test_configs import compose_cfg
from tests.test_train import TINY, train


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sigma_grid_is_log_spaced_over_the_range():
    grid = sigma_grid(32)
    assert grid.dtype == torch.float64 and len(grid) == 32
    assert grid[0].item() == pytest.approx(0.002, rel=1e-12) and grid[-1].item() == pytest.approx(80, rel=1e-12)
    steps = grid.log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(40000) / 31), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="2 points"):
        sigma_grid(1)


@pytest.mark.parametrize("weighting", [EDMWeighting(), InverseSquareWeighting(), UniformWeighting()])
def test_zero_denoiser_costs_the_weighting_times_the_mean_square(weighting):
    images = torch.randn(5, 2, 3, 3, generator=seeded(1), dtype=torch.float64)
    sigmas = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    loss = loss_per_sigma(lambda x, sigma, labels: torch.zeros_like(x), images, sigmas, weighting, generator=seeded())
    torch.testing.assert_close(loss, weighting(sigmas) * images.square().mean(), rtol=1e-12, atol=0)


def test_ideal_denoiser_of_two_points_is_exact_at_small_sigma_and_the_mean_at_large():
    a = torch.randn(1, 1, 4, 4, generator=seeded(2), dtype=torch.float64)
    data = torch.cat([a, -a])  # mean 0: at a huge sigma D is 0 (to ~|a| / sigma) and the loss is E[y^2]
    ideal = IdealDenoiser(data)
    sigmas = torch.tensor([1e-3, 3.0, 1e8], dtype=torch.float64)
    loss = loss_per_sigma(ideal, data, sigmas, UniformWeighting(), generator=seeded(3))
    assert loss[0].item() < 1e-24
    assert loss[2].item() == pytest.approx(a.square().mean().item(), rel=1e-6)
    # The contract on the noise: one draw of images.shape per sigma, in grid order, from the generator.
    generator = seeded(3)
    for sigma, value in zip(sigmas, loss):
        y = data + sigma * torch.randn(data.shape, generator=generator, dtype=data.dtype)
        assert value.item() == pytest.approx((ideal(y, sigma) - data).square().mean().item(), rel=1e-12)
    assert 0 < loss[1].item() < loss[2].item()


class SmallNet(nn.Module):
    """A denoiser with dropout and a submodule kept in eval mode on purpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.dropout, self.frozen = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5), nn.Identity()

    def forward(self, x, sigma, labels=None):
        return self.frozen(self.dropout(self.conv(x / (1 + sigma.reshape(-1, 1, 1, 1)))))


def test_profile_is_deterministic_batch_size_free_and_leaves_the_modes_alone():
    net = SmallNet().train()
    net.frozen.eval()
    images = torch.randn(7, 1, 4, 4, generator=seeded(4))
    sigmas = sigma_grid(5)

    def profile(batch_size: int, seed: int = 0) -> torch.Tensor:
        return loss_per_sigma(net, images, sigmas, EDMWeighting(), generator=seeded(seed), batch_size=batch_size)

    reference = profile(1000)  # all 35 (sigma, image) pairs in one call
    assert torch.equal(profile(1000), reference)  # dropout is off: the same numbers every time
    for batch_size in (1, 3, 7, 20):
        torch.testing.assert_close(profile(batch_size), reference, rtol=1e-6, atol=0)
    assert ((profile(1000, seed=1) - reference).abs() > 1e-4 * reference).all()  # other noise, other numbers
    assert net.training and net.dropout.training and not net.frozen.training
    assert all(p.grad is None for p in net.parameters())


def test_class_labels_follow_their_images():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    labels = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)

    def label_denoiser(x, sigma, class_labels):  # D = the label everywhere: the loss is mean(label^2) = 14/3
        return class_labels.reshape(-1, 1, 1, 1).expand_as(x)

    for batch_size in (2, 3, 9):
        loss = loss_per_sigma(label_denoiser, images, sigma_grid(4), UniformWeighting(), labels, seeded(),
                              batch_size=batch_size)
        torch.testing.assert_close(loss, torch.full((4,), 14 / 3, dtype=torch.float64), rtol=1e-12, atol=0)


def bin_probabilities(grid: torch.Tensor, cdf) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact probability of each grid point's bin, bin widths in ln sigma) for a CDF of ln sigma."""
    log_sigma = grid.log()
    middles = (log_sigma[1:] + log_sigma[:-1]) / 2
    edges = torch.cat([2 * log_sigma[:1] - middles[:1], middles, 2 * log_sigma[-1:] - middles[-1:]])
    probabilities = torch.tensor([cdf(hi) - cdf(lo) for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist())],
                                 dtype=torch.float64)
    return probabilities, edges.diff()


def test_edm_noise_density_is_the_normal_density_of_ln_sigma():
    grid, draws = sigma_grid(32), 1 << 20
    density = noise_density(EDMNoise(), grid, num_draws=draws, generator=seeded())
    q, width = bin_probabilities(grid, lambda x: 0.5 * (1 + math.erf((x + 1.2) / (1.2 * math.sqrt(2)))))
    # Within 5 standard deviations of the histogram's sampling error around the exact bin averages ...
    assert ((density - q / width).abs() <= 5 * (q * (1 - q) / draws).sqrt() / width + 1e-12).all()
    # ... and, up to the bins' curvature bias, the normal density at the grid points (peak 0.3325).
    pdf = (-0.5 * ((grid.log() + 1.2) / 1.2) ** 2).exp() / (1.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(density, pdf, rtol=0, atol=0.005)
    assert torch.equal(noise_density(EDMNoise(), grid, num_draws=draws, generator=seeded()), density)


def test_ve_noise_density_is_uniform_in_ln_sigma_over_its_range():
    grid, draws = sigma_grid(32), 1 << 20
    density = noise_density(VENoise(0.02, 100), grid, num_draws=draws, generator=seeded())
    lo, hi = math.log(0.02), math.log(100)
    q, width = bin_probabilities(grid, lambda x: min(max((x - lo) / (hi - lo), 0.0), 1.0))
    assert ((density - q / width).abs() <= 5 * (q * (1 - q) / draws).sqrt() / width + 1e-12).all()
    inside = (grid.log() - width / 2 >= lo) & (grid.log() + width / 2 <= hi)
    assert inside.sum() == 24 and (density[grid < 0.015] == 0).all()
    torch.testing.assert_close(density[inside], torch.full((24,), 1 / math.log(5000), dtype=torch.float64),
                               rtol=0.02, atol=0)


def test_profile_settings_do_not_change_the_run_hash(tmp_path):
    plain = run_identity(compose_cfg(tmp_path, *TINY))
    other = run_identity(compose_cfg(tmp_path, *TINY, "task.loss_profile=true", "task.loss_profile_sigmas=8",
                                     "task.loss_profile_images=16"))
    assert plain == other


def test_training_stores_the_loss_profile_of_the_initial_and_final_network(tmp_path):
    result, run_dir = train(tmp_path, "run", "task.duration_kimg=0.256", "task.snapshot_kimg=0.256",
                            "task.eval_kimg=0.256", "task.loss_profile=true", "task.loss_profile_sigmas=16",
                            "task.loss_profile_images=64")
    rows = ResultsStore(tmp_path / "results").rows()
    (profile,) = [r for r in rows if r["task"] == "loss_profile"]
    evaluations = sorted((r for r in rows if r["task"] == "train"), key=lambda r: r["kimg"])
    assert [r["kimg"] for r in evaluations] == [0.032, 0.256]
    assert (profile["num_steps"], profile["nfe"], profile["num_images"], profile["kimg"]) == (16, 32, 64, 0.256)
    assert all({k: profile[k] for k in ("run_hash", "label")} == {k: r[k] for k in ("run_hash", "label")}
               for r in evaluations)  # the same run as its evaluations, under its own config hash
    assert profile["config_hash"] not in {r["config_hash"] for r in evaluations}
    assert (profile["noise"], profile["weighting"]) == ("edm", "edm")
    sigma = torch.tensor(profile["sigma"], dtype=torch.float64)
    torch.testing.assert_close(sigma, sigma_grid(16), rtol=1e-15, atol=0)
    initial, final, p_sigma = (torch.tensor(profile[k], dtype=torch.float64)
                               for k in ("loss_initial", "loss_final", "p_sigma"))
    assert all(len(x) == 16 and x.isfinite().all() and (x >= 0).all() for x in (initial, final, p_sigma))
    # Eight steps of training bring the loss down at the middle noise levels, where p(sigma) puts them
    # (final / initial there: 1.11, 1.03, 0.90, 0.75, 0.70, 0.71, 0.73, 0.76), and so the expected training loss.
    middle = slice(4, 12)  # sigma in [0.034, 4.8]
    assert (final[middle] / initial[middle]).mean() < 0.9
    assert (p_sigma * final).sum() < 0.85 * (p_sigma * initial).sum()
    torch.testing.assert_close(p_sigma, noise_density(EDMNoise(), sigma_grid(16), generator=seeded()), rtol=0, atol=0)
    assert read_manifests(run_dir) == {row_key(r) for r in [profile, *evaluations]}  # the run's report finds it
    assert result["kimg"] == pytest.approx(0.256)


def test_training_without_a_profile_writes_no_row(tmp_path):
    train(tmp_path, "run", "task.duration_kimg=0.032", "task.snapshot_kimg=0.032", "task.eval_kimg=0",
          "task.loss_profile=false")
    assert ResultsStore(tmp_path / "results").rows() == []
    assert not (tmp_path / "run" / "rows.json").exists()


def synthetic_row(config_hash: str, precond: str, scale: float, kimg: float = 200.0) -> dict:
    sigma = sigma_grid(8).tolist()
    return {"config_hash": config_hash, "run_hash": config_hash, "num_steps": 8, "nfe": 16, "task": "loss_profile",
            "label": f"train digits/ddpmpp_small/{precond} noise=edm weighting=edm augment=none", "kimg": kimg,
            "sigma": sigma, "loss_initial": [1.5 + 0.25 * i for i in range(8)],
            "loss_final": [scale * (0.125 + 0.0625 * i) for i in range(8)],
            "p_sigma": [0.0, 0.01, 0.1, 0.3, 0.2, 0.05, 0.01, 0.0], "noise": "edm", "weighting": "edm", "seed": 0}


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_report_of_a_set_of_runs_from_the_store(tmp_path):
    store = ResultsStore(tmp_path / "results")
    for row in (synthetic_row("aaaa", "edm", 1.0), synthetic_row("bbbb", "vp", 2.0, kimg=100.0),
                {"config_hash": "cccc", "num_steps": 4, "nfe": 7, "label": "a sampling row", "fd_raw": 3.0}):
        store.write(row)
    markdown, plots = loss_profile_section(store.load(), title="test")  # lists come back as Python lists
    assert list(plots) == [PLOT] and f"]({PLOT})" in markdown
    image = matplotlib.image.imread(io.BytesIO(plots[PLOT]), format="png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    grid = sigma_grid(8).tolist()  # 0.002, 0.0091, 0.041, 0.19, 0.85, 3.9, 18, 80: nearest 0.01, 0.1, 1, 10 in ln sigma
    picks = [1, 3, 4, 6]
    assert re.findall(r"σ = ([\d.e+-]+)", header) == [f"{grid[i]:.4g}" for i in picks]
    assert "Shared by every run below" in markdown and "`noise=edm`" in markdown
    rows = table_rows(markdown)
    assert [r[:2] for r in rows] == [["digits/ddpmpp_small/edm", "initial"],
                                     ["digits/ddpmpp_small/edm", "final EMA (200 kimg)"],
                                     ["digits/ddpmpp_small/vp", "initial"],
                                     ["digits/ddpmpp_small/vp", "final EMA (100 kimg)"]]
    for (cells, row, key) in zip(rows, [synthetic_row("a", "edm", 1.0)] * 2 + [synthetic_row("b", "vp", 2.0)] * 2,
                                 ["loss_initial", "loss_final"] * 2):
        assert [float(c) for c in cells[2:]] == [row[key][i] for i in picks]


def test_report_of_one_run_and_of_none():
    markdown, plots = loss_profile_section(pd.DataFrame([synthetic_row("aaaa", "edm", 1.0)]))
    assert "Shared by" not in markdown and matplotlib.image.imread(io.BytesIO(plots[PLOT]), format="png").ndim == 3
    (initial, final) = table_rows(markdown)
    assert initial[0] == "train digits/ddpmpp_small/edm noise=edm weighting=edm augment=none seed=0"
    assert [float(c) for c in final[2:]] == [0.1875, 0.3125, 0.375, 0.5]
    assert loss_profile_section(pd.DataFrame([{"config_hash": "x", "num_steps": 1, "nfe": 1, "label": "x",
                                               "task": "sample"}])) == ("", {})
    assert loss_profile_section(pd.DataFrame()) == ("", {})


def test_report_of_runs_on_different_grids_leaves_out_broken_rows():
    coarse = synthetic_row("aaaa", "edm", 1.0)
    fine = synthetic_row("bbbb", "vp", 1.0) | {
        "sigma": sigma_grid(4, 0.01, 10).tolist(), "num_steps": 4, "loss_initial": [4.0, 3.0, 2.0, 1.0],
        "loss_final": [0.5, 0.25, 0.125, 1.0], "p_sigma": [0.1, 0.2, 0.2, 0.1]}
    broken = synthetic_row("cccc", "ve", 1.0) | {"loss_final": [1.0]}  # not one value per sigma
    markdown, plots = loss_profile_section(pd.DataFrame([coarse, fine, broken]))
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert re.findall(r"σ ≈ ([\d.]+)", header) == ["0.01", "0.1", "1", "10"]
    assert "grids differ" in markdown and "1 loss-profile rows without" in markdown and list(plots) == [PLOT]
    rows = table_rows(markdown)
    assert [float(c) for c in rows[3][2:]] == [0.5, 0.25, 0.125, 1.0]  # the fine grid holds exactly 0.01 .. 10
    assert [float(c) for c in rows[0][2:]] == [coarse["loss_initial"][i] for i in (1, 3, 4, 6)]
