"""The sampling design space against the reference implementation's golden vectors (float64, ~1e-10).

Each golden case is its own test (`reference_cases`); the checks are plain functions so that the tests
at the bottom can run them on regenerated copies of the golden files as well.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edm_lab.design import discretizations as D
from edm_lab.design import schedules as S
from edm_lab.design import solvers
from edm_lab.design.churn import Churn
from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from edm_lab.design.sampler import sample
from edm_lab.nets.ideal import IdealDenoiser
from tests.conftest import (DEFAULT_REFERENCE_DIR, PROJECT_ROOT, REFERENCE_DIR_ENV, GoldenCase, counterpart,
                            in_ci, load_reference, precond_class, reference_cases, reference_dir)

SCHEDULES = {"vp": S.VPSchedule, "ve": S.VESchedule, "linear": S.LinearSchedule}
SCALINGS = {"vp": S.VPScaling, "none": S.NoScaling}
DISCRETIZATIONS = {"vp": D.VPDiscretization, "ve": D.VEDiscretization, "iddpm": D.IDDPMDiscretization,
                   "edm": D.EDMDiscretization}
SOLVERS = {"euler": lambda alpha: solvers.Euler(), "heun": solvers.SecondOrder}


def axes_from_reference(config: dict) -> tuple[int, dict]:
    """The reference ablation sampler's keyword arguments as this project's axis objects."""
    cfg = dict(config)
    num_steps = cfg.pop("num_steps")
    disc_kwargs = {k: cfg.pop(k) for k in ("sigma_min", "sigma_max") if k in cfg}
    rho = cfg.pop("rho", 7)
    if cfg["discretization"] == "edm":
        disc_kwargs["rho"] = rho
    alpha = cfg.pop("alpha", 1)
    solver = counterpart(cfg.pop("solver"), SOLVERS, "solver")(alpha)
    axes = dict(schedule=counterpart(cfg.pop("schedule"), SCHEDULES, "schedule")(),
                scaling=counterpart(cfg.pop("scaling"), SCALINGS, "scaling")(),
                discretization=counterpart(cfg.pop("discretization"), DISCRETIZATIONS, "discretization")(**disc_kwargs),
                solver=solver, churn=Churn(**cfg))
    return num_steps, axes


def replay(noise_per_step: torch.Tensor):
    """An injected noise source that hands out the reference's per-step draws in order."""
    draws = iter(noise_per_step)
    return lambda x: next(draws)


def expected_nfe(num_steps: int, solver) -> int:
    return num_steps if isinstance(solver, solvers.Euler) else 2 * num_steps - 1


def check_ablation_case(ref: dict, case: dict) -> None:
    """One case of sampler_cases.pt: the general sampler on the ideal denoiser of the file's data set."""
    num_steps, axes = axes_from_reference(case["config"])
    result = sample(IdealDenoiser(ref["dataset"]), case["latents"], num_steps,
                    randn_like=replay(case["noise_per_step"]), **axes)
    assert result.x.dtype == torch.float64
    torch.testing.assert_close(result.x, case["output"], rtol=1e-10, atol=1e-10, msg=str(case["config"]))
    assert result.nfe == expected_nfe(num_steps, axes["solver"]), case["config"]


def check_edm_sampler_case(ref: dict, case: dict) -> None:
    """One case of edm_sampler_cases.pt: Algorithm 2 is the general sampler with the EDM axes."""
    cfg = dict(case["config"])
    num_steps = cfg.pop("num_steps")
    result = sample(IdealDenoiser(ref["dataset"]), case["latents"], num_steps, churn=Churn(**cfg),
                    discretization=D.EDMDiscretization(sigma_min=0.002, sigma_max=80, rho=7),
                    randn_like=replay(case["noise_per_step"]))
    torch.testing.assert_close(result.x, case["output"], rtol=1e-10, atol=1e-10, msg=str(case["config"]))
    assert result.nfe == 2 * num_steps - 1


def check_precond_case(name: str, case: dict) -> None:
    """One case of precond_cases.pt, keyed by a short name or either spelling of the class name."""
    precond = precond_class(case.get("precond_class", name))()
    sigma = case["sigma"]
    c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=torch.float32).expand_as(sigma)
                                    for c in precond.coefficients(sigma))
    # The goldens were read off float32 networks, so c_skip carries float32 round-off of that probe.
    torch.testing.assert_close(c_skip, case["c_skip"], rtol=0, atol=3e-5)
    torch.testing.assert_close(c_out, case["c_out"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_in, case["c_in"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_noise, case["c_noise"], rtol=1e-6, atol=1e-6)
    assert precond.sigma_min == case["sigma_min"]
    assert precond.sigma_max == case["sigma_max"]
    rounded = precond.round_sigma(sigma.to(case["round_sigma"].dtype))
    torch.testing.assert_close(rounded, case["round_sigma"], rtol=0, atol=0)
    if "u" in case:  # the iDDPM table
        torch.testing.assert_close(precond.u, case["u"], rtol=0, atol=0)


@pytest.mark.parametrize("golden", reference_cases("sampler_cases.pt"))
def test_ablation_sampler_matches_reference(golden: GoldenCase):
    check_ablation_case(*golden.load())


@pytest.mark.parametrize("golden", reference_cases("edm_sampler_cases.pt"))
def test_edm_sampler_matches_reference(golden: GoldenCase):
    check_edm_sampler_case(*golden.load())


@pytest.mark.parametrize("golden", reference_cases("precond_cases.pt"))
def test_preconditioner_coefficients_match_reference(golden: GoldenCase):
    _, case = golden.load()
    check_precond_case(golden.key, case)


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond, "edm": EDMPrecond}


@pytest.mark.parametrize("name", ["vp", "ve", "iddpm", "edm"])
def test_preconditioner_forward_applies_the_coefficients(name):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around an arbitrary inner network."""
    calls = {}

    def inner(x_in, c_noise, class_labels=None):
        calls["x_in"], calls["c_noise"] = x_in, c_noise
        return torch.tanh(x_in) + c_noise.reshape(-1, 1, 1, 1)

    precond = PRECONDS[name](model=inner)
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    out = precond(x, sigma)
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(calls["x_in"], c_in * x)
    torch.testing.assert_close(calls["c_noise"], torch.as_tensor(c_noise).flatten().expand(3))
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.tanh(c_in * x) + calls["c_noise"].reshape(-1, 1, 1, 1)))


def test_precond_without_network_refuses_forward():
    with pytest.raises(RuntimeError, match="no inner network"):
        EDMPrecond()(torch.zeros(1, 1, 2, 2), torch.ones(1))


# ---------------------------------------------------------------------------------------------
# The golden harness itself: other golden sets, missing files, CI.

def test_reference_folder_can_be_pointed_elsewhere(monkeypatch, tmp_path):
    monkeypatch.delenv(REFERENCE_DIR_ENV, raising=False)
    assert reference_dir() == DEFAULT_REFERENCE_DIR == PROJECT_ROOT.parent / "shared" / "reference"
    monkeypatch.setenv(REFERENCE_DIR_ENV, str(tmp_path))
    assert reference_dir() == tmp_path
    torch.save({"cases": [{"config": {"num_steps": 3}}], "note": "x"}, tmp_path / "mine.pt")
    assert load_reference("mine.pt")["cases"] == [{"config": {"num_steps": 3}}]
    [param] = reference_cases("mine.pt")
    assert param.id == "num_steps=3" and param.values[0].path == tmp_path / "mine.pt"


@pytest.mark.parametrize("value,strict", [(None, False), ("", False), ("0", False), ("false", False),
                                          ("False", False), ("1", True), ("true", True), ("yes", True)])
def test_ci_variable(monkeypatch, value, strict):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is strict


@pytest.mark.parametrize("ci", [False, True])
@pytest.mark.parametrize("where", ["empty-folder", "no-folder"])
def test_missing_golden_skips_or_fails_under_ci(monkeypatch, tmp_path, ci, where):
    folder = tmp_path / "reference"
    if where == "empty-folder":
        folder.mkdir()
    monkeypatch.setenv("CI", "1") if ci else monkeypatch.delenv("CI", raising=False)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    reason = "does not exist" if where == "no-folder" else "is not in the reference folder"
    with pytest.raises(outcome, match="missing") as info:
        load_reference("sampler_cases.pt", folder)
    assert str(folder / "sampler_cases.pt") in str(info.value) and reason in str(info.value)
    # At collection an absent file degrades to one placeholder that skips (fails under CI) when run.
    [param] = reference_cases("sampler_cases.pt", directory=folder)
    assert param.id == "sampler_cases-missing" and param.values[0].key is None
    assert [m.name for m in param.marks] == ["golden"]
    with pytest.raises(outcome, match="missing") as info:
        param.values[0].load()
    assert str(folder / "sampler_cases.pt") in str(info.value) and reason in str(info.value)


def test_unreadable_golden_file_is_one_failing_placeholder(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "1")
    (tmp_path / "sampler_cases.pt").write_bytes(b"not a torch file")
    torch.save({"note": "no cases here"}, tmp_path / "precond_cases.pt")
    for name, why in [("sampler_cases.pt", "could not be read"), ("precond_cases.pt", "KeyError")]:
        [param] = reference_cases(name, directory=tmp_path)
        with pytest.raises(pytest.fail.Exception, match=why):
            param.values[0].load()


@pytest.mark.golden  # reads the real golden files
def test_one_test_per_golden_case_with_readable_ids():
    """Every case of every golden file becomes a test of its own: count and name them."""
    counts = {}
    for name in ("sampler_cases.pt", "edm_sampler_cases.pt", "precond_cases.pt", "network_cases.pt",
                 "fid_cases.pt", "loss_cases.pt"):
        cases = load_reference(name)["cases"]
        params = reference_cases(name)
        ids = [p.id for p in params]
        assert len(params) == len(cases) > 0 and len(set(ids)) == len(ids), (name, ids)
        keys = sorted(cases) if isinstance(cases, dict) else list(range(len(cases)))
        assert sorted(p.values[0].key for p in params) == keys, name
        counts[name] = len(params)
    print(counts)
    ids = [p.id for p in reference_cases("sampler_cases.pt")]
    assert "euler-vp-vp-vp-num_steps=5" in ids
    assert "heun-edm-linear-none-S_churn=40-S_min=0.05-S_max=50-S_noise=1.003-num_steps=18" in ids
    assert [p.id for p in reference_cases("network_cases.pt")][0] == "ddpmpp-edm-EDMPrecond"


def test_precond_names_in_either_spelling():
    for name in ("iDDPMPrecond", "IDDPMPrecond", "iddpmprecond", "iddpm"):
        assert precond_class(name) is IDDPMPrecond
    assert precond_class("EDMPrecond") is EDMPrecond and precond_class("vp") is VPPrecond
    with pytest.raises(pytest.fail.Exception, match=r"'FooPrecond' has no counterpart.*edm, iddpm, ve, vp"):
        precond_class("FooPrecond")


def _write_golden(folder, name: str, ref: dict, cases) -> None:
    folder.mkdir(exist_ok=True)
    torch.save({**ref, "cases": cases}, folder / name)


@pytest.mark.golden  # reads the real golden files
def test_regenerated_golden_set_is_checked_case_by_case(tmp_path):
    """Fewer sampler cases, class-spelled keys, a precond subset: the same checks run on whatever is there."""
    sampler = load_reference("sampler_cases.pt")
    edm = load_reference("edm_sampler_cases.pt")
    precond = load_reference("precond_cases.pt")
    folder = tmp_path / "regenerated"
    _write_golden(folder, "sampler_cases.pt", sampler, [sampler["cases"][i] for i in (10, 16, 20)])
    _write_golden(folder, "edm_sampler_cases.pt", edm, edm["cases"][1:])
    _write_golden(folder, "precond_cases.pt", precond,
                  {"iDDPMPrecond": precond["cases"]["iddpm"], "EDMPrecond": precond["cases"]["edm"]})

    params = reference_cases("sampler_cases.pt", directory=folder)
    assert [p.id for p in params] == ["euler-iddpm-linear-none-num_steps=5",
                                      "heun-edm-linear-none-alpha=0.5-num_steps=5",
                                      "heun-edm-linear-none-rho=3-sigma_min=0.01-sigma_max=20-num_steps=5"]
    for p in params:
        check_ablation_case(*p.values[0].load())
    [p] = reference_cases("edm_sampler_cases.pt", directory=folder)
    check_edm_sampler_case(*p.values[0].load())
    params = reference_cases("precond_cases.pt", directory=folder)
    assert [p.id for p in params] == ["iDDPMPrecond", "EDMPrecond"]
    for p in params:
        _, case = p.values[0].load()
        check_precond_case(p.values[0].key, case)

    # The checks still compare numbers: a perturbed golden fails.
    bad = dict(sampler["cases"][10], output=sampler["cases"][10]["output"] + 1e-6)
    with pytest.raises(AssertionError):
        check_ablation_case(sampler, bad)
    with pytest.raises(AssertionError):
        check_precond_case("iDDPMPrecond", dict(precond["cases"]["iddpm"], u=precond["cases"]["iddpm"]["u"] * 1.001))
    # A preconditioner or axis with no counterpart here fails naming it, not with a KeyError.
    with pytest.raises(pytest.fail.Exception, match="preconditioner 'FooPrecond' has no counterpart"):
        check_precond_case("FooPrecond", precond["cases"]["edm"])
    odd = dict(sampler["cases"][0], config=dict(sampler["cases"][0]["config"], discretization="cosine"))
    with pytest.raises(pytest.fail.Exception, match="discretization 'cosine' has no counterpart"):
        check_ablation_case(sampler, odd)


def _pytest_golden_only(test_file: str, reference: os.PathLike, ci: str | None) -> subprocess.Popen:
    """Starts pytest on the golden tests of one file, with the golden folder and $CI as given."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    # No third-party pytest plugins (hydra's alone costs ~2 s to load): these tests use none.
    env.update({REFERENCE_DIR_ENV: str(reference), "WANDB_SILENT": "true", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    if ci is not None:
        env["CI"] = ci
    return subprocess.Popen([sys.executable, "-m", "pytest", test_file, "-m", "golden", "-q", "-rs",
                             "-p", "no:cacheprovider"], cwd=PROJECT_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_missing_reference_fails_the_run_under_ci_and_skips_otherwise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # Both runs at once: each is mostly interpreter and torch start-up.
    strict = _pytest_golden_only("tests/test_design_golden.py", empty, ci="1")
    lenient = _pytest_golden_only("tests/test_design_golden.py", tmp_path / "absent", ci=None)
    strict_out, _ = strict.communicate(timeout=300)
    lenient_out, _ = lenient.communicate(timeout=300)
    assert strict.returncode == 1, strict_out
    assert "5 failed" in strict_out and "missing" in strict_out, strict_out
    assert str(empty / "sampler_cases.pt") in strict_out and "CI is set" in strict_out, strict_out
    assert lenient.returncode == 0, lenient_out
    assert "5 skipped" in lenient_out and "does not exist" in lenient_out, lenient_out
    assert str(tmp_path / "absent") in lenient_out, lenient_out
