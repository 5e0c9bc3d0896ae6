"""The seed protocol (repeats on disjoint seed ranges, one row each), the tracker's aggregate,
the PNG export and the cost columns of the sampling task, in process on tiny settings."""
from __future__ import annotations

import csv
import functools
import json
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from edm_lab.design.sampler import sample
from edm_lab.evaluate.sampling import sample_seeds
from edm_lab.tasks.sample import AXES, ConfigError, run_sample
from edm_lab.track.images import image_path, save_images, to_uint8
from edm_lab.track.store import ResultsStore
from edm_lab.track.tracking import CurveTracker
from tests.test_configs import compose_cfg

TINY = ["data=toy2d", "data.num_samples=128", "metric=raw", "nfe.steps=[2,3]", "num_samples=32",
        "batch_size=16", "metric.reference_solver=heun", "metric.reference_steps=16", "logger=csv", "trainer.enable_progress_bar=false"]
CHOICES = {"data": "toy2d", "model": "ideal", "precond": "edm", "schedule": "edm", "scaling": "none",
           "discretization": "edm", "solver": "heun", "churn": "none", "metric": "raw"}
DIGITS = ["data.limit=128", "metric=raw", "nfe.steps=[4]", "num_samples=40", "batch_size=16",
          "metric.reference_solver=heun", "metric.reference_steps=8", "logger=csv", "trainer.enable_progress_bar=false"]


def test_repeats_are_rows_on_disjoint_seed_ranges(tmp_path):
    rows = run_sample(compose_cfg(tmp_path, *TINY, "repeats=3"), CHOICES)
    assert [(r["num_steps"], r["repeat"], r["first_seed"]) for r in rows] == [
        (s, k, 32 * k) for s in (2, 3) for k in range(3)]
    assert len({r["config_hash"] for r in rows}) == 1
    names = sorted(p.name for p in (tmp_path / "results" / "rows" / rows[0]["config_hash"]).iterdir())
    assert names == ["steps-2-r1.json", "steps-2-r2.json", "steps-2.json",
                     "steps-3-r1.json", "steps-3-r2.json", "steps-3.json"]
    assert len({r["sampler_rmse"] for r in rows}) == 6  # other seeds, other numbers
    assert len({r["fd_raw"] for r in rows if r["num_steps"] == 3}) == 3
    # Repeat 1 is exactly the job that starts at seed num_samples.
    shifted = run_sample(compose_cfg(tmp_path / "shifted", *TINY, "seed=32"), CHOICES)
    for k1, alone in zip([r for r in rows if r["repeat"] == 1], shifted):
        assert (k1["fd_raw"], k1["sampler_rmse"], k1["nfe"]) == (alone["fd_raw"], alone["sampler_rmse"], alone["nfe"])
    assert shifted[0]["config_hash"] != rows[0]["config_hash"]


def test_raising_repeats_reuses_stored_rows_and_force_redoes_them(tmp_path, monkeypatch):
    import edm_lab.tasks.sample as task

    first = run_sample(compose_cfg(tmp_path, *TINY), CHOICES)
    assert [r["repeat"] for r in first] == [0, 0]
    sampled = []
    real = task.evaluate_point

    def counting(cfg, trainer, net, dataset, axes, num_steps, repeat, *args):
        sampled.append((num_steps, repeat))
        return real(cfg, trainer, net, dataset, axes, num_steps, repeat, *args)

    monkeypatch.setattr(task, "evaluate_point", counting)
    more = run_sample(compose_cfg(tmp_path, *TINY, "repeats=2"), CHOICES)
    assert sorted(sampled) == [(2, 1), (3, 1)]  # repeat 0 is the stored one: the hash ignores `repeats`
    assert [r["time"] for r in more if r["repeat"] == 0] == [r["time"] for r in first]
    sampled.clear()
    run_sample(compose_cfg(tmp_path, *TINY, "repeats=2", "force=true"), CHOICES)
    assert sorted(sampled) == [(2, 0), (2, 1), (3, 0), (3, 1)]


def test_rows_of_a_store_without_repeats_are_reused_as_repeat_zero(tmp_path, monkeypatch):
    import edm_lab.tasks.sample as task

    rows = run_sample(compose_cfg(tmp_path, *TINY, "nfe.steps=[2]"), CHOICES)
    path = ResultsStore(tmp_path / "results").path(rows[0]["config_hash"], 2)
    old = {k: v for k, v in rows[0].items() if k not in ("repeat", "first_seed")}
    path.write_text(json.dumps(old))  # as written before repeats existed, at the same file name
    monkeypatch.setattr(task, "evaluate_point", lambda *a, **k: pytest.fail("a stored row was sampled again"))
    again = run_sample(compose_cfg(tmp_path, *TINY, "nfe.steps=[2]"), CHOICES)
    assert again[0]["repeat"] == 0 and again[0]["fd_raw"] == rows[0]["fd_raw"]


@pytest.mark.parametrize("override,key", [("repeats=0", "repeats"), ("repeats=1.5", "repeats"),
                                          ("repeats=true", "repeats"), ("export_images=''", "export_images")])
def test_bad_protocol_values_fail_before_any_output(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        run_sample(compose_cfg(tmp_path, *TINY, override), CHOICES)
    assert not (tmp_path / "results").exists() and not (tmp_path / ".cache").exists()


def test_export_needs_image_data(tmp_path):
    with pytest.raises(ConfigError, match="export_images"):
        run_sample(compose_cfg(tmp_path, *TINY, f"export_images={tmp_path}/png"), CHOICES)
    assert not (tmp_path / "png").exists() and not (tmp_path / "results").exists()


def test_tracker_logs_the_minimum_over_repeats_with_mean_and_std(tmp_path):
    rows = run_sample(compose_cfg(tmp_path, *TINY, "repeats=3"), CHOICES)
    logged = list(csv.DictReader(next((tmp_path / "out").rglob("metrics.csv")).read_text().splitlines()))
    assert [int(r["step"]) for r in logged] == [3, 5]  # step = NFE, one point per step count
    for point, steps in zip(logged, (2, 3)):
        values = np.array([r["fd_raw"] for r in rows if r["num_steps"] == steps])
        assert float(point["fd_raw"]) == pytest.approx(values.min(), rel=1e-12)
        assert float(point["fd_raw_mean"]) == pytest.approx(values.mean(), rel=1e-12)
        assert float(point["fd_raw_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert float(point["repeats"]) == 3 and float(point["sampler_rmse"]) > 0
    # One repeat: the plain value, nothing to aggregate.
    one = CurveTracker(None, ["fd_raw"], {}).point_values([rows[0]])
    assert one["fd_raw"] == rows[0]["fd_raw"] and "fd_raw_std" not in one


def test_rows_record_their_cost(tmp_path):
    rows = run_sample(compose_cfg(tmp_path, *TINY), CHOICES)
    for r in rows:
        assert 0 < r["seconds"] < 600 and math.isfinite(r["images_per_second"])
        # Sampling is part of the point's time, so its rate can only be higher than the point's.
        assert r["num_samples"] / r["seconds"] <= r["images_per_second"] < 1e8


def test_png_export_in_the_reference_layout(tmp_path):
    cfg = compose_cfg(tmp_path, *DIGITS, "repeats=2", "seed=990", f"export_images={tmp_path}/png")
    rows = run_sample(cfg, {**CHOICES, "data": "digits"})
    root = tmp_path / "png" / rows[0]["config_hash"]
    assert root.joinpath("label.txt").read_text().strip() == rows[0]["label"]
    for k, first in ((0, 990), (1, 1030)):
        folder = root / "steps-4" / f"r{k}"
        found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        assert found == sorted(image_path(folder, s).relative_to(folder).as_posix() for s in range(first, first + 40))
    assert (root / "steps-4" / "r0" / "000000" / "000999.png").is_file()
    assert (root / "steps-4" / "r0" / "001000" / "001000.png").is_file()
    assert not list((tmp_path / "png").rglob("*.tmp"))
    # The file holds the sampler's image of its seed, quantised as the reference does.
    dataset = instantiate(cfg.data)
    net = instantiate(cfg.model)(dataset, instantiate(cfg.precond, _partial_=True))
    sampler = functools.partial(sample, num_steps=4, **{a: instantiate(cfg[a]) for a in AXES})
    x = sample_seeds(net, dataset.sample_shape, sampler, [1003]).x
    png = Image.open(root / "steps-4" / "r0" / "001000" / "001003.png")  # seeds 990...1029
    assert png.mode == "L" and png.size == (8, 8)
    assert np.array_equal(np.asarray(png), to_uint8(x)[0, 0].numpy())


def test_rgb_images_round_trip(tmp_path):
    images = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    paths = save_images(images, [7, 2500], tmp_path)
    assert paths == [tmp_path / "000000" / "000007.png", tmp_path / "002000" / "002500.png"]
    back = np.asarray(Image.open(paths[1]))
    assert Image.open(paths[1]).mode == "RGB" and back.shape == (4, 5, 3)
    assert np.array_equal(back, to_uint8(images[1]).permute(1, 2, 0).numpy())
    assert np.asarray(Image.open(paths[0])).min() == 0 and back.max() == 255  # clipped, not wrapped
