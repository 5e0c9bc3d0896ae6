"""Learned time steps: they beat rho = 7 on held-out seeds, round-trip through OptimizedDiscretization,
and bad files or step counts are refused naming discretization.path."""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from edm_lab.data.datasets import digits
from edm_lab.design.discretizations import OptimizedDiscretization
from edm_lab.design.precond import IDDPMPrecond
from edm_lab.design.sampler import noise_levels, sample
from edm_lab.design.solvers import RK45, Euler, EulerMaruyama, SecondOrder
from edm_lab.evaluate.learned_steps import _Levels, optimize_time_steps
from edm_lab.evaluate.sampling import reference_sampler, rms_error, sample_seeds
from edm_lab.nets.ideal import IdealDenoiser, ideal_denoiser
from tests.conftest import PROJECT_ROOT

SHAPE = (1, 8, 8)
TRAIN = range(0, 256)
HELDOUT = range(10_000, 10_256)
# Heun with 3 steps and Euler with 5 steps: 5 denoiser evaluations each.
CASES = {"heun": dict(num_steps=3, solver=SecondOrder(), directions=2),
         "euler": dict(num_steps=5, solver=Euler(), directions=4)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny float64 matmuls: extra threads only contend (on a loaded 2-core machine, 100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    return ideal_denoiser(digits(limit=200))


def learn(net, case: str, **kwargs):
    # The ideal denoiser snaps to the nearest training image at small sigma: each seed's error is piecewise
    # constant in the levels, so the smoothed gradient (see edm_lab.evaluate.learned_steps).
    args = dict(sample_shape=SHAPE, train_seeds=TRAIN, heldout_seeds=HELDOUT, iterations=60, lr=0.1,
                gradient="smoothed", **CASES[case])
    return optimize_time_steps(net, **{**args, **kwargs})


@pytest.fixture(scope="module")
def learned(net):
    return {case: learn(net, case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_learned_steps_beat_rho_7_on_heldout_seeds(learned, case):
    result = learned[case]
    before, after = result.errors["heldout"]["before"], result.errors["heldout"]["after"]
    print(f"\n{case}: NFE {result.nfe}, levels {[round(v, 4) for v in result.levels]}, held-out RMS error "
          f"rho=7 {before:.4f} -> learned {after:.4f} (train {result.errors['train']['before']:.4f} -> "
          f"{result.errors['train']['after']:.4f}), {result.provenance['seconds']:.1f} s")
    assert result.nfe == 5
    assert result.errors["train"]["after"] < result.errors["train"]["before"]
    assert after < 0.85 * before  # measured: about 0.75x (Heun) and 0.65x (Euler)
    assert min(result.history) == pytest.approx(result.errors["train"]["after"], rel=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_levels_strictly_decrease_between_fixed_ends(learned, case):
    levels = learned[case].levels
    assert len(levels) == CASES[case]["num_steps"]
    assert levels[0] == 80.0 and levels[-1] == 0.002  # EDM's range: the reference starts and ends there too
    assert all(a > b > 0 for a, b in zip(levels, levels[1:]))
    assert learned[case].provenance["init"]["levels"] != levels


def test_file_round_trips_and_sample_reproduces_the_heldout_error(net, learned, tmp_path):
    path = tmp_path / "steps.json"
    learned["heun"].save(path)
    learned["euler"].save(path)  # merged: one file, both step counts
    disc = OptimizedDiscretization(str(path))
    assert disc.step_counts == [3, 5] and disc.noise_range() == (0.002, 80.0)
    doc = json.loads(path.read_text())
    assert doc["steps"]["3"]["solver"] == "SecondOrder(alpha=1)" and doc["steps"]["5"]["solver"] == "Euler()"
    assert doc["steps"]["3"]["heldout_seeds"] == list(HELDOUT)
    reference = sample_seeds(net, SHAPE, reference_sampler(80.0), list(HELDOUT)).x
    for case, result in learned.items():
        levels, _ = noise_levels(net, result.num_steps, disc)
        assert levels.tolist() == result.levels
        # The sample task's path: per-seed latents, `sample` with the discretization read from the file.
        sampler = functools.partial(sample, num_steps=result.num_steps, discretization=disc, solver=CASES[case]["solver"])
        out = sample_seeds(net, SHAPE, sampler, list(HELDOUT))
        assert out.nfe == 5
        assert rms_error(out.x, reference) == pytest.approx(result.errors["heldout"]["after"], rel=1e-9, abs=0)


def test_missing_step_count_is_refused_naming_the_key(learned, tmp_path):
    path = tmp_path / "heun.json"
    learned["heun"].save(path)
    disc = OptimizedDiscretization(str(path))
    with pytest.raises(ValueError, match=r"discretization\.path=.*heun\.json holds learned levels for num_steps in \[3\], not 4"):
        sample(IdealDenoiser(torch.zeros(2, *SHAPE)), torch.zeros(1, *SHAPE), 4, discretization=disc)


def test_a_denoiser_without_the_files_range_is_refused(learned, tmp_path):
    path = tmp_path / "heun.json"
    learned["heun"].save(path)
    disc = OptimizedDiscretization(str(path))
    narrow = SimpleNamespace(sigma_min=0.0, sigma_max=40.0)
    with pytest.raises(ValueError, match=r"discretization\.path=.*outside the denoiser's range"):
        noise_levels(narrow, 3, disc)
    assert disc.noise_range(0.002, 80.0) == (0.002, 80.0)  # a range that holds it exactly is fine
    with pytest.raises(ValueError, match="cannot be moved"):
        disc.sigma_steps(3, 0.01, 80.0)


def test_save_refuses_to_mix_noise_ranges(learned, tmp_path):
    path = tmp_path / "heun.json"
    learned["heun"].save(path)
    other = json.loads(path.read_text())
    other["sigma_max"] = 40.0
    other["steps"]["3"]["levels"][0] = 40.0
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="one noise range per file"):
        learned["euler"].save(path)
    learned["euler"].save(path, merge=False)
    assert OptimizedDiscretization(str(path)).step_counts == [5]


def _good() -> dict:
    return {"format": "edm_lab.learned_steps", "version": 1, "sigma_min": 0.002, "sigma_max": 80.0,
            "steps": {"3": {"levels": [80.0, 1.0, 0.002], "solver": "SecondOrder(alpha=1)"}}}


def _with(**changes):
    doc = _good()
    for key, value in changes.items():
        if key == "levels":
            doc["steps"]["3"]["levels"] = value
        else:
            doc[key] = value
    return json.dumps(doc)


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"),
    ("directory", "cannot read"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "not a learned-steps file"),
    (_with(format="other"), "not a learned-steps file"),
    (_with(version=2), "version 2"),
    (_with(version=True), "version True"),
    (_with(sigma_min=-1.0, levels=[80.0, 1.0, -1.0]), "sigma_min=-1.0"),
    (_with(sigma_min=90.0), "sigma_min=90.0"),
    (_with(steps={}), "no \"steps\""),
    (_with(steps={"x": {"levels": [1.0]}}), "step count 'x'"),
    (_with(levels=[80.0, 0.002]), "a list of 3 finite numbers"),
    (_with(levels=[80.0, "1", 0.002]), "a list of 3 finite numbers"),
    ('{"format": "edm_lab.learned_steps", "version": 1, "sigma_min": 0.002, "sigma_max": 80, '
     '"steps": {"3": {"levels": [80, NaN, 0.002]}}}', "a list of 3 finite numbers"),
    (_with(levels=[80.0, 90.0, 0.002]), "strictly decreasing"),
    (_with(levels=[80.0, 0.002, 0.002]), "strictly decreasing"),
    (_with(levels=[70.0, 1.0, 0.002]), "expected the file's sigma_max"),
])
def test_bad_files_are_refused_naming_the_key_and_file(tmp_path, content, problem):
    path = tmp_path / "levels.json"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as info:
        OptimizedDiscretization(str(path))
    message = str(info.value)
    assert f"discretization.path={path}" in message and problem in message, message


def test_config_option_instantiates(tmp_path):
    path = tmp_path / "levels.json"
    path.write_text(json.dumps(_good()))
    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "discretization" / "optimized.yaml")
    assert OmegaConf.is_missing(cfg, "path")
    disc = instantiate(cfg, path=str(path))
    assert isinstance(disc, OptimizedDiscretization) and disc.sigma_steps(3, 0.002, 80.0).tolist() == [80.0, 1.0, 0.002]
    assert disc.entries[3]["solver"] == "SecondOrder(alpha=1)" and len(disc.fingerprint) == 64


def test_learning_is_deterministic(net, learned):
    again = learn(net, "heun")
    assert again.levels == learned["heun"].levels and again.history == learned["heun"].history
    assert again.errors == learned["heun"].errors


def test_the_gradient_flows_through_sample(net):
    """Where the sampler's output is smooth in the levels (the ideal denoiser above sigma ~ 0.5), the gradient
    through `sample` matches finite differences, and autograd learning beats rho = 7."""
    latents = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(16, *SHAPE, dtype=torch.float64)

    def loss(levels: torch.Tensor) -> torch.Tensor:
        x = sample(net, latents, 4, discretization=_Levels(levels, 0.5, 80.0), solver=SecondOrder()).x
        return (x - target).square().mean()

    levels = torch.tensor([80.0, 10.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():  # sample's host copy of the levels: float() of a tensor requiring grad
        warnings.simplefilter("ignore")
        loss(levels).backward()
    for i in (1, 2):
        h = 1e-5 * float(levels[i])
        up, down = levels.detach().clone(), levels.detach().clone()
        up[i] += h
        down[i] -= h
        numeric = float(loss(up) - loss(down)) / (2 * h)
        assert float(levels.grad[i]) == pytest.approx(numeric, rel=1e-4)
    result = optimize_time_steps(net, num_steps=4, solver=SecondOrder(), sample_shape=SHAPE, train_seeds=range(128),
                                 heldout_seeds=range(1000, 1128), sigma_min=0.5, iterations=30, gradient="autograd")
    assert result.errors["heldout"]["after"] < 0.85 * result.errors["heldout"]["before"]  # measured: 0.298 -> 0.196
    assert result.sigma_min == 0.5 and result.provenance["reference"]["sigma_end"] == 0.5


def test_autograd_refuses_a_vanishing_gradient(net):
    with pytest.raises(ValueError, match="gradient='smoothed'"):
        optimize_time_steps(net, num_steps=3, solver=SecondOrder(), sample_shape=SHAPE, train_seeds=range(16),
                            heldout_seeds=range(100, 116), iterations=5, gradient="autograd",
                            reference_steps=32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=2), "num_steps"),
    (dict(solver=EulerMaruyama()), "stochastic"),
    (dict(solver=RK45()), "RK45"),
    (dict(heldout_seeds=range(3, 10)), "held-out seeds must be unseen"),
    (dict(train_seeds=[]), "train_seeds"),
    (dict(gradient="adjoint"), "gradient"),
    (dict(sigma_min=50.0), "sigma_max / 2"),
])
def test_bad_arguments_are_refused(net, kwargs, match):
    args = dict(num_steps=3, solver=SecondOrder(), sample_shape=SHAPE, train_seeds=range(4), heldout_seeds=range(4, 8))
    with pytest.raises(ValueError, match=match):
        optimize_time_steps(net, **{**args, **kwargs})


def test_a_denoiser_that_rounds_sigma_is_refused():
    rounding = ideal_denoiser(digits(limit=20), precond=IDDPMPrecond)
    with pytest.raises(ValueError, match="rounds sigma"):
        optimize_time_steps(rounding, num_steps=3, solver=SecondOrder(), sample_shape=SHAPE, train_seeds=range(4),
                            heldout_seeds=range(4, 8))


def test_levels_file_is_plain_json(learned, tmp_path):
    path = learned["heun"].save(tmp_path / "sub" / "heun.json")
    assert isinstance(path, Path) and path.is_file()
    doc = json.loads(path.read_text())
    entry = doc["steps"]["3"]
    for key in ("levels", "nfe", "rms_error", "solver", "schedule", "scaling", "denoiser", "train_seeds",
                "heldout_seeds", "reference", "init", "optimizer"):
        assert key in entry, key
    assert entry["denoiser"]["class"] == "edm_lab.nets.ideal.IdealDenoiser"
    assert entry["reference"] == {"solver": "heun", "steps": 256, "sigma_start": 80.0, "sigma_end": 0.002}
    assert math.isclose(entry["rms_error"]["heldout"]["after"], learned["heun"].errors["heldout"]["after"])
