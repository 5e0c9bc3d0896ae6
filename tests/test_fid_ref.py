"""Reference statistics: the reference code's .npz format, task=fid_ref and metric.reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edm_lab.data import digits
from edm_lab.evaluate import reference as ref
from edm_lab.evaluate.features import (
    INCEPTION_EXTRACTOR_NAME,
    FlattenFeatures,
    FrechetDistance,
    frechet_distance_from_features,
)
from edm_lab.tasks.fid_ref import run_fid_ref
from edm_lab.tasks.hydra_support import run_task
from edm_lab.tasks.sample import build_frechet, run_sample
from edm_lab.tasks.schema import ConfigError
from tests.conftest import GoldenCase
from tests.test_configs import compose_cfg
from tests.test_features import FID_CASES
from tests.test_sample_task import CHOICES, TINY


def _frechet_from_npz(path, dim: int) -> FrechetDistance:
    loaded = ref.load_npz(path)
    fd = FrechetDistance(FlattenFeatures(dim), input_dtype=torch.float64)
    fd.load_reference_statistics(ref.statistics_from_moments(loaded.mu, loaded.sigma,
                                                             loaded.num_images or ref.DEFAULT_COUNT))
    return fd


@pytest.mark.parametrize("count", [None, 300])
def test_reference_npz_measures_like_the_features(count, tmp_path):
    """mu/sigma written as the reference code writes them give the distance of the original features."""
    gen = torch.Generator().manual_seed(0)
    a = 3 + torch.randn(300, 16, generator=gen, dtype=torch.float64) @ torch.rand(16, 16, generator=gen,
                                                                                  dtype=torch.float64)
    b = torch.randn(200, 16, generator=gen, dtype=torch.float64) * 1.5 + 2.5
    path = tmp_path / "ref.npz"
    extra = {} if count is None else {"num_images": np.int64(count)}
    np.savez(path, mu=a.mean(0).numpy(), sigma=np.cov(a.numpy(), rowvar=False), **extra)
    expected = frechet_distance_from_features(a, b)
    assert expected > 1
    assert _frechet_from_npz(path, 16)(b) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("golden", FID_CASES)
def test_golden_moments_give_the_golden_distance(golden: GoldenCase, tmp_path):
    _, case = golden.load()
    path = tmp_path / "golden.npz"
    np.savez(path, mu=case["mu_a"].numpy(), sigma=case["sigma_a"].numpy())
    fd = _frechet_from_npz(path, case["mu_a"].shape[0])
    assert fd(case["features_b"]) == pytest.approx(case["fid"], rel=1e-10)


def test_save_npz_is_reference_compatible(tmp_path):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fd = FrechetDistance(FlattenFeatures(4), input_dtype=torch.float64)
    fd.set_reference(x)
    path = ref.save_npz(tmp_path / "sub" / "stats.npz", fd.reference_statistics(), extractor="raw")
    with np.load(path, allow_pickle=False) as npz:  # what the reference code's fid.py does
        assert sorted(npz.files) == ["extractor", "mu", "num_images", "sigma"]
        assert npz["mu"].dtype == npz["sigma"].dtype == np.float64
        np.testing.assert_allclose(npz["mu"], x.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(npz["sigma"], torch.cov(x.T).numpy(), rtol=1e-10, atol=1e-14)
        assert str(npz["extractor"]) == "raw" and int(npz["num_images"]) == 50
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # written atomically, no temp left
    loaded = ref.load_npz(path)
    assert (loaded.extractor, loaded.num_images, loaded.path) == ("raw", 50, path)
    with pytest.raises(ValueError, match=r"\.npz"):
        ref.save_npz(tmp_path / "stats.pt", fd.reference_statistics(), extractor="raw")


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("problem,error,match", [
    ("missing", FileNotFoundError, "no such file"),
    ("folder", FileNotFoundError, "no such file"),
    ("garbage", ValueError, "not a readable .npz"),
    ("no sigma", ValueError, r"lacks the array\(s\) \['sigma'\]"),
    ("wrong shape", ValueError, r"sigma \(D, D\)"),
    ("bad count", ValueError, "num_images"),
])
def test_bad_npz_is_named(problem, error, match, tmp_path):
    path = tmp_path / "ref.npz"
    mu, sigma = np.zeros(3), np.eye(3)
    if problem == "folder":
        path.mkdir()
    elif problem == "garbage":
        path.write_bytes(b"not a zip")
    elif problem == "no sigma":
        _write(path, mu=mu)
    elif problem == "wrong shape":
        _write(path, mu=mu, sigma=np.eye(4))
    elif problem == "bad count":
        _write(path, mu=mu, sigma=sigma, num_images=np.int64(1))
    with pytest.raises(error, match=match) as info:
        ref.load_npz(path, key="metric.reference")
    assert f"metric.reference={path}" in str(info.value)


def test_extractor_names_are_checked(tmp_path):
    named = ref.load_npz(_write(tmp_path / "raw.npz", mu=np.zeros(3), sigma=np.eye(3), extractor=np.array("raw")))
    ref.check_compatible(named, "raw", 3)
    with pytest.raises(ValueError, match="'raw'.*'classifier:x'") as info:
        ref.check_compatible(named, "classifier:x", 3)
    assert f"metric.reference={named.path}" in str(info.value)
    with pytest.raises(ValueError, match="3-d statistics"):
        ref.check_compatible(named, "raw", 4)
    # The reference code's own files name no extractor: Inception-v3 FID statistics, for metric=fid only.
    unnamed = ref.load_npz(_write(tmp_path / "edm.npz", mu=np.zeros(3), sigma=np.eye(3)))
    ref.check_compatible(unnamed, INCEPTION_EXTRACTOR_NAME, 3)
    with pytest.raises(ValueError, match="metric=fid"):
        ref.check_compatible(unnamed, "raw", 3)


# ------------------------------------------------------------------------------------------------
# task=fid_ref and metric.reference
# ------------------------------------------------------------------------------------------------

DIGITS = ["data=digits", "data.limit=256"]


def test_fid_ref_writes_and_round_trips(tmp_path, monkeypatch, capsys):
    cfg = compose_cfg(tmp_path, "task=fid_ref", *DIGITS, "metric=raw")
    dest = run_task(cfg)  # dispatch on task.name
    assert dest == tmp_path / "fid-refs" / "digits-fd_raw.npz"
    assert str(dest) in capsys.readouterr().out
    data = digits(limit=256)
    with np.load(dest, allow_pickle=False) as npz:
        assert str(npz["extractor"]) == "raw" and int(npz["num_images"]) == 256
        assert npz["mu"].shape == (64,) and npz["sigma"].shape == (64, 64) and npz["sigma"].dtype == np.float64
        np.testing.assert_allclose(npz["mu"], data.samples.reshape(256, -1).double().mean(0).numpy(), rtol=1e-12)
    caches = list((tmp_path / ".cache" / "reference_stats").glob("*.pt"))
    assert len(caches) == 1  # the cache the sample and train tasks read

    generated = data.samples.flip(-1)[:100]
    cached_fd = build_frechet(compose_cfg(tmp_path, *DIGITS, "metric=raw"), data)

    def refuse(self, samples):
        raise AssertionError("metric.reference set, but the data set's features were extracted")

    monkeypatch.setattr(FrechetDistance, "set_reference", refuse)
    from_file = build_frechet(compose_cfg(tmp_path / "elsewhere", *DIGITS, "metric=raw", f"metric.reference={dest}"),
                              data)
    assert not (tmp_path / "elsewhere" / ".cache" / "reference_stats").exists()
    assert from_file(generated) == pytest.approx(cached_fd(generated), rel=1e-10)
    assert from_file(generated) > 1


def test_fid_ref_reuses_the_cached_statistics(tmp_path, monkeypatch):
    first = run_fid_ref(compose_cfg(tmp_path, "task=fid_ref", *DIGITS, "metric=raw"))
    monkeypatch.setattr(FrechetDistance, "set_reference", lambda self, samples: pytest.fail("extracted again"))
    second = run_fid_ref(compose_cfg(tmp_path, "task=fid_ref", *DIGITS, "metric=raw",
                                     f"task.dest={tmp_path}/copy.npz"))
    assert second == tmp_path / "copy.npz"
    with np.load(first) as a, np.load(second) as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_fid_ref_with_classifier_and_wrong_metric(tmp_path):
    classifier = ["metric=classifier", "+metric.extractor.epochs=1"]
    dest = run_fid_ref(compose_cfg(tmp_path, "task=fid_ref", *DIGITS, *classifier))
    loaded = ref.load_npz(dest)
    data = digits(limit=256)
    assert loaded.extractor.startswith(f"classifier:{data.fingerprint}-classifier-") and len(loaded.mu) == 64
    fd = build_frechet(compose_cfg(tmp_path, *DIGITS, *classifier, f"metric.reference={dest}"), data)
    assert fd(data.samples) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="metric.reference") as info:
        build_frechet(compose_cfg(tmp_path, *DIGITS, "metric=raw", f"metric.reference={dest}"), data)
    assert "'raw'" in str(info.value) and str(dest) in str(info.value)


def test_missing_reference_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(FrechetDistance, "__init__", lambda *a, **k: pytest.fail("built the extractor"))
    missing = tmp_path / "nowhere.npz"
    cfg = compose_cfg(tmp_path, *TINY, f"metric.reference={missing}")
    with pytest.raises(ConfigError, match="metric.reference") as info:
        run_sample(cfg, CHOICES)
    assert str(missing) in str(info.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / ".cache").exists()


def test_fid_ref_rejects_a_bad_dest_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr("edm_lab.tasks.fid_ref.instantiate", lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ValueError, match="task.dest"):
        run_fid_ref(compose_cfg(tmp_path, "task=fid_ref", "metric=raw", f"task.dest={tmp_path}/stats.pt"))
    with pytest.raises(ValueError, match="metric.reference"):  # it would copy that file, not extract the data's
        run_fid_ref(compose_cfg(tmp_path, "task=fid_ref", "metric=raw", f"metric.reference={tmp_path}/x.npz"))
    with pytest.raises(ValueError, match="task.name=nope: expected one of .*fid_ref"):
        run_task(compose_cfg(tmp_path, "task=report", "task.name=nope"))


def test_reference_features_are_extracted_on_the_given_device(tmp_path, monkeypatch):
    """build_frechet moves the extractor before extracting: the sample task passes the trainer's device."""
    events = []
    real_to, real_set = FrechetDistance.to, FrechetDistance.set_reference

    def to(self, device):
        events.append(("to", str(device)))
        return real_to(self, device)

    def set_reference(self, samples):
        events.append(("extract", str(self.device)))
        real_set(self, samples)

    monkeypatch.setattr(FrechetDistance, "to", to)
    monkeypatch.setattr(FrechetDistance, "set_reference", set_reference)
    build_frechet(compose_cfg(tmp_path, *DIGITS, "metric=raw"), digits(limit=256), "cpu")
    assert events == [("to", "cpu"), ("extract", "cpu")]
    events.clear()
    run_sample(compose_cfg(tmp_path / "task", *TINY), CHOICES)
    assert events == [("to", "cpu"), ("extract", "cpu")]  # trainer=cpu: its root device
