"""The sampling task in process: failure and interruption semantics, the offline FID message, reports."""
from __future__ import annotations

import math

import pytest
import torch

from edm_lab.evaluate.features import InceptionWeightsMissing
from edm_lab.tasks.hydra_support import regenerate_report
from edm_lab.tasks.sample import run_sample
from edm_lab.track.store import ResultsStore
from tests.test_configs import compose_cfg

TINY = ["data=toy2d", "data.num_samples=128", "metric=raw", "nfe.steps=[2,3,5]", "num_samples=32",
        "batch_size=16", "metric.reference_solver=heun", "metric.reference_steps=16", "logger=csv", "trainer.enable_progress_bar=false"]
CHOICES = {"data": "toy2d", "model": "ideal", "precond": "edm", "schedule": "edm", "scaling": "none",
           "discretization": "edm", "solver": "heun", "churn": "none", "metric": "raw"}


@pytest.mark.parametrize("failure", [RuntimeError("extractor crashed"), KeyboardInterrupt()])
def test_failure_keeps_completed_rows_and_writes_no_partial_one(failure, tmp_path, monkeypatch):
    import edm_lab.tasks.sample as task

    real = task.frechet_from_features
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(task, "frechet_from_features", flaky)
    cfg = compose_cfg(tmp_path, *TINY)
    with pytest.raises(type(failure)):
        run_sample(cfg, CHOICES)
    rows = ResultsStore(cfg.paths.results_dir).rows()
    assert [r["num_steps"] for r in rows] == [2]  # the point before the failure, complete
    assert math.isfinite(rows[0]["fd_raw"]) and math.isfinite(rows[0]["sampler_rmse"])
    assert not list((tmp_path / "results").rglob("*.tmp"))

    # Resuming computes only what is missing.
    monkeypatch.setattr(task, "frechet_from_features", real)
    resumed = run_sample(cfg, CHOICES)
    assert [r["num_steps"] for r in resumed] == [2, 3, 5]
    assert resumed[0]["time"] == rows[0]["time"]


def test_rows_carry_axes_params_and_measured_nfe(tmp_path):
    cfg = compose_cfg(tmp_path, *TINY, "solver=midpoint", "discretization.rho=3")
    rows = run_sample(cfg, {**CHOICES, "solver": "midpoint"}, overrides=["solver=midpoint", "discretization.rho=3"])
    assert [(r["num_steps"], r["nfe"]) for r in rows] == [(2, 3), (3, 5), (5, 9)]
    for r in rows:
        assert r["alpha"] == 0.5 and r["rho"] == 3 and r["S_churn"] == 0 and r["sigma_start"] == pytest.approx(80)
        assert "discretization.rho=3" in r["label"] and "solver=midpoint" in r["label"]


def test_stochastic_sampler_has_no_ode_error(tmp_path):
    cfg = compose_cfg(tmp_path, *TINY, "churn=imagenet")
    rows = run_sample(cfg, {**CHOICES, "churn": "imagenet"})
    assert all(r["sampler_rmse"] is None and math.isfinite(r["fd_raw"]) for r in rows)
    assert rows[0]["S_churn"] == 40 and rows[0]["S_noise"] == 1.003


def test_results_do_not_depend_on_batch_size(tmp_path):
    a = run_sample(compose_cfg(tmp_path / "a", *TINY, "batch_size=32"), CHOICES)
    b = run_sample(compose_cfg(tmp_path / "b", *TINY, "batch_size=5"), CHOICES)
    assert a[0]["config_hash"] == b[0]["config_hash"]
    for ra, rb in zip(a, b):
        assert ra["fd_raw"] == pytest.approx(rb["fd_raw"], rel=1e-9, abs=1e-9)
        assert ra["sampler_rmse"] == pytest.approx(rb["sampler_rmse"], rel=1e-9, abs=1e-12)


def test_fid_without_inception_weights_fails_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = compose_cfg(tmp_path, "metric=fid", "data.limit=64", "logger=wandb")
    with pytest.raises(InceptionWeightsMissing) as info:
        run_sample(cfg, {**CHOICES, "data": "digits", "metric": "fid"})
    message = str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "metric.extractor.weights_path" in message
    assert str(tmp_path / "hub") in message
    assert not (tmp_path / "results").exists() and not (tmp_path / "out").exists()


def test_report_task_regenerates_from_the_store(tmp_path):
    from edm_lab.track.store import read_manifests, row_key

    job = tmp_path / "outputs" / "2026-12-01" / "10-00-00"
    cfg = compose_cfg(tmp_path, *TINY, f"paths.output_dir={job}")
    rows = run_sample(cfg, CHOICES)
    assert read_manifests(job) == {row_key(r) for r in rows}  # the job recorded its rows
    path = regenerate_report(compose_cfg(tmp_path, "task=report"))  # latest: that run
    text = path.read_text()
    assert path == tmp_path / "reports" / "report.md" and text.startswith("# edm-lab report: sweep 2026-12-01/10-00-00")
    assert f"{rows[-1]['fd_raw']:.4g}" in text and "sampler_rmse" in text


def test_a_sweep_extracts_the_data_sets_features_once(tmp_path, monkeypatch):
    from edm_lab.evaluate.features import FrechetDistance

    first = run_sample(compose_cfg(tmp_path, *TINY), CHOICES)
    assert len(list((tmp_path / ".cache" / "reference_stats").glob("*.pt"))) == 1

    def refuse(self, samples):
        raise AssertionError("the reference statistics were extracted again")

    monkeypatch.setattr(FrechetDistance, "set_reference", refuse)
    again = run_sample(compose_cfg(tmp_path, *TINY, "solver=euler", "force=true"), {**CHOICES, "solver": "euler"})
    same = run_sample(compose_cfg(tmp_path, *TINY, "force=true"), CHOICES)
    assert [r["fd_raw"] for r in same] == [r["fd_raw"] for r in first]  # cached statistics, same numbers
    assert again[0]["fd_raw"] != first[0]["fd_raw"]


def test_rerun_recomputes_a_point_whose_row_file_is_unusable(tmp_path):
    """A hand-edited `{}` and a row copied from another configuration: warned about, set aside, recomputed."""
    cfg = compose_cfg(tmp_path, *TINY)
    first = run_sample(cfg, CHOICES)
    other = compose_cfg(tmp_path, *TINY, "solver=euler")
    (euler_row,) = [r for r in run_sample(other, {**CHOICES, "solver": "euler"}) if r["num_steps"] == 3]
    store = ResultsStore(cfg.paths.results_dir)
    config = first[0]["config_hash"]
    store.path(config, 2).write_text("{}")
    store.path(config, 3).write_bytes(store.path(euler_row["config_hash"], 3).read_bytes())
    with pytest.warns(RuntimeWarning) as record:
        again = run_sample(cfg, CHOICES)
    messages = [str(w.message) for w in record if "result row" in str(w.message)]
    assert len(messages) == 2 and all(config in m and "moved to" in m for m in messages)
    assert [(r["num_steps"], r["nfe"], r["fd_raw"]) for r in again] == \
        [(r["num_steps"], r["nfe"], r["fd_raw"]) for r in first]  # recomputed: the same numbers again
    assert len(list(store.path(config, 2).parent.glob("*.rejected-*"))) == 2
    assert {r["config_hash"] for r in store.rows()} == {config, euler_row["config_hash"]}


def test_schedules_starting_at_one_noise_level_share_one_reference_solution(tmp_path):
    """sigma(sigma^-1(80)) is 80.00000000000001 through the VP schedule: the start level is taken before it."""
    from edm_lab.design.discretizations import EDMDiscretization
    from edm_lab.evaluate.sampling import start_sigma
    from edm_lab.nets.ideal import IdealDenoiser

    assert start_sigma(IdealDenoiser(torch.zeros(4, 2)), 18, EDMDiscretization()) == 80.0
    rows = []
    for schedule in ("edm", "vp", "ve"):
        cfg = compose_cfg(tmp_path, *TINY, f"schedule={schedule}")
        rows += run_sample(cfg, {**CHOICES, "schedule": schedule})
    assert {r["sigma_start"] for r in rows} == {80.0}
    assert len(list((tmp_path / ".cache" / "references").glob("*.pt"))) == 1


def test_a_refused_checkpoint_is_one_line_naming_the_key_and_file(tmp_path):
    from edm_lab.tasks.schema import ConfigError

    bad = tmp_path / "net.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a safetensors header without our metadata
    cfg = compose_cfg(tmp_path, *TINY, "model=checkpoint", f"model.path={bad}", "logger=wandb")
    with pytest.raises(ConfigError) as info:
        run_sample(cfg, {**CHOICES, "model": "checkpoint"})
    assert str(info.value).startswith(f"model.path={bad}: checkpoint {bad}")
    assert not (tmp_path / "results" / "rows").exists() and not list(tmp_path.rglob("wandb"))


def test_counter_seed_noise_is_its_own_configuration_and_keeps_the_seed_protocol(tmp_path):
    """`seed_noise=counter`: other latents than the reference's generators, so another config hash and label;
    image i still depends on seed i alone, so the rows do not depend on the batch size."""
    stochastic = ["churn=imagenet", "nfe.steps=[4]"]
    plain = run_sample(compose_cfg(tmp_path / "a", *TINY, *stochastic), CHOICES)
    counter = run_sample(compose_cfg(tmp_path / "b", *TINY, *stochastic, "seed_noise=counter"), CHOICES)
    rebatched = run_sample(compose_cfg(tmp_path / "c", *TINY, *stochastic, "seed_noise=counter", "batch_size=7"),
                           CHOICES)
    assert plain[0]["config_hash"] != counter[0]["config_hash"] == rebatched[0]["config_hash"]
    assert "seed_noise=counter" in counter[0]["label"] and counter[0]["seed_noise"] == "counter"
    assert plain[0]["fd_raw"] != counter[0]["fd_raw"]
    assert counter[0]["fd_raw"] == rebatched[0]["fd_raw"] and counter[0]["sampler_rmse"] == rebatched[0]["sampler_rmse"]


NETWORK = ["model=network", "net=ddpmpp_small", "data=digits", "data.limit=64", "metric=raw", "nfe.steps=[3]",
               "num_samples=16", "batch_size=16", "metric.reference_solver=heun", "metric.reference_steps=4", "logger=csv",
               "trainer.enable_progress_bar=false"]
NETWORK_CHOICES = {**CHOICES, "data": "digits", "model": "network", "net": "ddpmpp_small"}


def test_the_fast_path_is_its_own_configuration(tmp_path):
    """`fast.channels_last=true` on a network: its own config hash and label; the metric moves by float rounding."""
    eager = run_sample(compose_cfg(tmp_path / "a", *NETWORK), NETWORK_CHOICES)
    fast = run_sample(compose_cfg(tmp_path / "b", *NETWORK, "fast.channels_last=true"), NETWORK_CHOICES)
    assert eager[0]["config_hash"] != fast[0]["config_hash"]
    assert "fast.channels_last=true" in fast[0]["label"] and "fast" not in eager[0]["label"]
    assert fast[0]["fd_raw"] == pytest.approx(eager[0]["fd_raw"], rel=1e-4)


def test_sampling_under_bf16_autocast_is_its_own_configuration_with_a_float64_state(tmp_path, monkeypatch):
    """`trainer.precision=bf16-mixed` samples with the network under bf16 autocast: its own hash and label (rows
    of fp32 are never reused for it), the network's products in bf16, the sampler's state float64."""
    import edm_lab.tasks.sample as task

    states = []
    real = task.sample

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        states.append(result.x.dtype)
        return result

    monkeypatch.setattr(task, "sample", recording)
    fp32 = run_sample(compose_cfg(tmp_path, *NETWORK), NETWORK_CHOICES)
    bf16 = run_sample(compose_cfg(tmp_path, *NETWORK, "trainer.precision=bf16-mixed"), NETWORK_CHOICES)
    assert fp32[0]["config_hash"] != bf16[0]["config_hash"]
    assert "trainer.precision=bf16-mixed" in bf16[0]["label"] and "precision" not in fp32[0]["label"]
    assert set(states) == {torch.float64}
    # bf16 keeps 8 bits of mantissa: the metric moves, by far less than the sampler's own error.
    assert bf16[0]["fd_raw"] != fp32[0]["fd_raw"]
    assert bf16[0]["fd_raw"] == pytest.approx(fp32[0]["fd_raw"], rel=0.05)
    assert task.computation(compose_cfg(tmp_path, *NETWORK, "trainer.precision=32")) == {}


def test_only_a_non_default_computation_enters_the_hashes(tmp_path):
    """The defaults add nothing (rows stored before these keys existed keep their hash); each switch adds itself."""
    from edm_lab.tasks.sample import computation

    assert computation(compose_cfg(tmp_path, *TINY)) == {}
    extra = computation(compose_cfg(tmp_path, *TINY, "seed_noise=counter", "fast.tf32=true"))
    assert extra == {"seed_noise": "counter",
                     "fast": {"compile": False, "mode": "default", "channels_last": False, "tf32": True}}


def test_the_rk45_reference_solution_matches_heun_s_and_heun_rows_keep_their_hash(tmp_path):
    """The default reference (RK45, tolerance 1e-5) and 256 Heun steps solve the same ODE: on toy2d's ideal
    denoiser their sampler_rmse columns agree far below the errors they measure; Heun's rows keep the hash
    they had before the option existed (no reference_solver / reference_tolerance in it)."""
    from edm_lab.tasks.sample import _metric_identity

    base = [o for o in TINY if not o.startswith("metric.reference")]
    heun = run_sample(compose_cfg(tmp_path, *base, "metric.reference_solver=heun", "metric.reference_steps=256"),
                      CHOICES)
    rk45 = run_sample(compose_cfg(tmp_path, *base), CHOICES)
    assert len(list((tmp_path / ".cache" / "references").glob("*.pt"))) == 2
    for a, b in zip(heun, rk45):
        assert a["config_hash"] != b["config_hash"]
        assert abs(a["sampler_rmse"] - b["sampler_rmse"]) < 1e-4 * a["sampler_rmse"] + 1e-6
    heun_metric = {"name": "fd_raw", "sampler_error": True, "reference_solver": "heun", "reference_tolerance": 1e-5,
                   "reference_steps": 256}
    assert _metric_identity(heun_metric) == {"name": "fd_raw", "sampler_error": True, "reference_steps": 256}
    assert _metric_identity({**heun_metric, "reference_solver": "rk45"}) == {
        "name": "fd_raw", "sampler_error": True, "reference_solver": "rk45", "reference_tolerance": 1e-5}


def test_guidance_wraps_the_network_counts_both_calls_and_is_its_own_configuration(tmp_path):
    """`guidance=cfg` on a class-conditional network: twice the NFE, its own hash and label; refused one-line
    on an unconditional network; `guidance=autoguidance` with the network guiding itself is the network."""
    from edm_lab.checkpoints.snapshot import save_checkpoint
    from edm_lab.tasks.schema import ConfigError

    conditional = [*NETWORK, "model.class_conditional=true"]
    plain = run_sample(compose_cfg(tmp_path, *conditional), NETWORK_CHOICES)
    cfg_rows = run_sample(compose_cfg(tmp_path, *conditional, "guidance=cfg", "guidance.weight=3"), NETWORK_CHOICES)
    assert cfg_rows[0]["nfe"] == 2 * plain[0]["nfe"] == 2 * 5
    assert cfg_rows[0]["config_hash"] != plain[0]["config_hash"]
    assert "guidance=cfg(w=3)" in cfg_rows[0]["label"] and cfg_rows[0]["guidance_weight"] == 3.0
    assert cfg_rows[0]["fd_raw"] != plain[0]["fd_raw"]
    with pytest.raises(ConfigError, match="^guidance: classifier-free guidance needs a class-conditional network"):
        run_sample(compose_cfg(tmp_path, *NETWORK, "guidance=cfg"), NETWORK_CHOICES)
    # The network as its own guide: D_w = D for any w, at twice the evaluations.
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from edm_lab.nets.denoisers import network_denoiser

    cfg = compose_cfg(tmp_path, *NETWORK)
    net = network_denoiser(instantiate(cfg.data), instantiate(cfg.precond, _partial_=True),
                           OmegaConf.to_container(cfg.net, resolve=True))  # model=network's own weights (seed 0)
    path = save_checkpoint(net, tmp_path / "self.safetensors")
    self_guided = run_sample(compose_cfg(tmp_path, *NETWORK, "guidance=autoguidance", f"guidance.guide.path={path}"),
                             NETWORK_CHOICES)
    unguided = run_sample(compose_cfg(tmp_path, *NETWORK), NETWORK_CHOICES)
    assert self_guided[0]["nfe"] == 2 * unguided[0]["nfe"]
    assert self_guided[0]["fd_raw"] == pytest.approx(unguided[0]["fd_raw"], rel=1e-9)
    with pytest.raises(ConfigError, match="^guidance.guide.path=.*missing.safetensors"):
        run_sample(compose_cfg(tmp_path, *NETWORK, "guidance=autoguidance",
                               f"guidance.guide.path={tmp_path / 'missing.safetensors'}"), NETWORK_CHOICES)
