"""Feature extractors and the Frechet distance (edm_lab.evaluate.features); no downloads anywhere."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from edm_lab.data import ArrayDataset, digits, toy2d
from edm_lab.evaluate import features as feat
from edm_lab.evaluate.features import (
    INCEPTION_WEIGHTS_FILENAME,
    FrechetDistance,
    InceptionWeightsMissing,
    classifier_features,
    frechet_distance_from_features,
    inception_features,
    raw_features,
    resolve_inception_weights,
    to_inception_input,
)
from tests.conftest import GoldenCase, reference_cases

FID_CASES = reference_cases("fid_cases.pt", ident=lambda i, c: f"{c['features_a'].shape[0]}x{c['features_a'].shape[1]}")


# ------------------------------------------------------------------------------------------------
# Golden Frechet distances from the reference implementation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("golden", FID_CASES)
def test_golden_statistics(golden: GoldenCase):
    """The statistics FrechetDistance accumulates (and caches) are the reference's mu and sigma."""
    from edm_lab.evaluate.reference import moments_from_statistics

    _, case = golden.load()
    for name in ("a", "b"):
        x = case[f"features_{name}"]
        fd = FrechetDistance(feat.FlattenFeatures(x.shape[1]), batch_size=7, input_dtype=torch.float64)
        fd.set_reference(x)
        mu, sigma, count = moments_from_statistics(fd.reference_statistics())
        assert count == len(x)
        torch.testing.assert_close(mu, case[f"mu_{name}"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sigma, case[f"sigma_{name}"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("golden", FID_CASES)
def test_golden_frechet_distance(golden: GoldenCase):
    _, case = golden.load()
    value = frechet_distance_from_features(case["features_a"], case["features_b"])
    assert isinstance(value, float)
    assert value == pytest.approx(case["fid"], rel=1e-8), (value, case["fid"])
    # Symmetric in its arguments.
    assert frechet_distance_from_features(case["features_b"], case["features_a"]) == pytest.approx(
        case["fid"], rel=1e-8)


def test_frechet_distance_of_shifted_gaussian_is_squared_shift():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert frechet_distance_from_features(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_distance_reference_survives_reset_and_can_be_replaced():
    ds = toy2d(num_samples=512)
    fd = FrechetDistance(raw_features(ds, cache_dir=None), batch_size=100)
    with pytest.raises(RuntimeError, match="set_reference"):
        fd(ds.samples)
    fd.set_reference(ds.samples)
    noise = torch.rand(512, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = fd(noise)
    assert fd(ds.samples) == pytest.approx(0.0, abs=1e-9)
    assert fd(noise) == first  # fake statistics are reset between calls, the reference is kept
    fd.set_reference(noise)
    assert fd(noise) == pytest.approx(0.0, abs=1e-9)
    assert fd(ds.samples) == pytest.approx(first, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Classifier features
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_data() -> ArrayDataset:
    return digits()


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory, digits_data):
    """One trained digits classifier shared by the tests below (training takes a few seconds)."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return cache_dir, classifier_features(digits_data, cache_dir)


def test_classifier_caches_under_fingerprint(digits_cache, digits_data):
    cache_dir, extractor = digits_cache
    files = list((cache_dir / "extractors").glob("*.pt"))
    assert len(files) == 1
    assert files[0] == extractor.cache_path
    assert files[0].name.startswith(f"{digits_data.fingerprint}-classifier-")
    assert not list((cache_dir / "extractors").glob("*.tmp"))
    state = torch.load(files[0], weights_only=True)  # tensors only
    assert "state_dict" in state


def test_classifier_accuracy_and_interface(digits_cache, digits_data):
    _, extractor = digits_cache
    assert extractor.train_accuracy > 0.97  # chance is 0.10; measured 0.9994
    assert extractor.num_features == 64 and not extractor.training
    extractor.train()
    assert not extractor.training
    out = extractor(digits_data.samples[:5])
    assert out.shape == (5, 64)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_classifier_second_call_loads_without_training(digits_cache, digits_data, monkeypatch):
    cache_dir, extractor = digits_cache
    mtime = extractor.cache_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cache exists")

    monkeypatch.setattr(feat, "_train_classifier", fail)
    again = classifier_features(digits_data, cache_dir)
    assert extractor.cache_path.stat().st_mtime_ns == mtime
    x = digits_data.samples[:64]
    assert torch.equal(again(x), extractor(x))
    assert again.train_accuracy == extractor.train_accuracy


def test_classifier_options_change_the_cache_key(digits_cache, digits_data, monkeypatch):
    cache_dir, extractor = digits_cache
    def trained(*args, **kwargs):
        raise RuntimeError("would train")

    monkeypatch.setattr(feat, "_train_classifier", trained)
    with pytest.raises(RuntimeError, match="would train"):
        classifier_features(digits_data, cache_dir, feature_dim=32)


def test_classifier_training_is_deterministic(tmp_path, digits_cache, digits_data):
    _, extractor = digits_cache
    torch.manual_seed(123)  # the global RNG must not matter
    fresh = classifier_features(digits_data, tmp_path / "other")
    ref, new = extractor.classifier.state_dict(), fresh.classifier.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_classifier_frechet_distance_self_vs_noise(digits_cache, digits_data):
    _, extractor = digits_cache
    fd = FrechetDistance(extractor)
    fd.set_reference(digits_data.samples)
    assert abs(fd(digits_data.samples)) < 1e-6
    noise = torch.rand(digits_data.samples.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    half = fd(digits_data.samples[::2])
    far = fd(noise)
    assert far > 50 and far > 20 * half, (far, half)


def test_classifier_on_vectors(tmp_path):
    ds = toy2d(num_samples=1024)
    extractor = classifier_features(ds, tmp_path, epochs=10)
    assert extractor.train_accuracy > 0.95
    fd = FrechetDistance(extractor)
    fd.set_reference(ds.samples)
    assert abs(fd(ds.samples)) < 1e-3
    assert fd(torch.rand(1024, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1) > 1.0


def test_classifier_needs_labels(tmp_path):
    unlabeled = ArrayDataset("blobs", torch.rand(16, 2) * 2 - 1)
    with pytest.raises(ValueError, match="metric.extractor") as info:
        classifier_features(unlabeled, tmp_path)
    assert "labels" in str(info.value)


def test_classifier_corrupt_cache_is_retrained(tmp_path):
    ds = toy2d(num_samples=256)
    first = classifier_features(ds, tmp_path, epochs=2)
    first.cache_path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match=str(first.cache_path.name)):
        second = classifier_features(ds, tmp_path, epochs=2)
    x = ds.samples[:32]
    assert torch.equal(first(x), second(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classifier_features(ds, tmp_path, epochs=2)  # the rewritten cache loads cleanly


# ------------------------------------------------------------------------------------------------
# Inception features
# ------------------------------------------------------------------------------------------------

def test_resolve_explicit_missing_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(InceptionWeightsMissing) as info:
        resolve_inception_weights(str(missing), download=True)  # an explicit path is never replaced by a download
    assert "metric.extractor.weights_path" in str(info.value) and str(missing) in str(info.value)
    assert not (tmp_path / "hub").exists()


def test_resolve_explicit_existing_path(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"x")
    assert resolve_inception_weights(str(path)) == path


def _no_download(*args, **kwargs):
    raise AssertionError("attempted a download")


def test_resolve_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)  # download=false by default
    with pytest.raises(InceptionWeightsMissing) as info:
        resolve_inception_weights(None)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert INCEPTION_WEIGHTS_FILENAME in message
    assert "metric.extractor.weights_path" in message
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME) in message
    assert "metric.extractor.download=true" in message and "failed" not in message
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3 in message and feat.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3


def _served_file(directory: Path, content: bytes, hash_in_name: str | None) -> str:
    """A file:// URL to `content`, named like torch hub files ("name-<sha256 prefix>.pth") when asked."""
    import hashlib

    if hash_in_name == "right":
        hash_in_name = hashlib.sha256(content).hexdigest()[:8]
    path = directory / (f"weights-inception-{hash_in_name}.pth" if hash_in_name else "weights-inception.pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path.as_uri()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock")) if directory.exists() else []


@pytest.mark.parametrize("hash_in_name", ["right", None])
def test_resolve_downloads_into_the_hub_cache(hash_in_name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    content = b"inception weights " * 1000
    monkeypatch.setattr(feat, "INCEPTION_WEIGHTS_URL", _served_file(tmp_path / "server", content, hash_in_name))
    target = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    assert resolve_inception_weights(None, download=True) == target
    assert target.read_bytes() == content
    assert _leftovers(target.parent) == [INCEPTION_WEIGHTS_FILENAME]  # no temp or partial files
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    assert resolve_inception_weights(None, download=True) == target  # found in the cache now


@pytest.mark.parametrize("problem", ["wrong hash", "no such file"])
def test_failed_download_gives_the_one_message(problem, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    if problem == "wrong hash":
        url = _served_file(tmp_path / "server", b"not the weights", "6726825d")
    else:
        url = (tmp_path / "server" / "missing-6726825d.pth").as_uri()
    monkeypatch.setattr(feat, "INCEPTION_WEIGHTS_URL", url)
    with pytest.raises(InceptionWeightsMissing) as info:
        resolve_inception_weights(None, download=True)
    message = str(info.value)
    hub_path = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    for option in ("metric.extractor.weights_path", str(hub_path), "metric.extractor.download=true", url):
        assert option in message, (option, message)
    assert "download (metric.extractor.download=true) failed" in message
    assert ("invalid hash value" if problem == "wrong hash" else "URLError") in message
    assert _leftovers(hub_path.parent) == []  # nothing, partial or complete, at or beside the final path


def test_resolve_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    target = tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert resolve_inception_weights(None) == target


def test_inception_factory_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsMissing):
        inception_features(digits(limit=4), tmp_path)
    with pytest.raises(ValueError, match="image"):
        inception_features(toy2d(num_samples=8), tmp_path)


def test_to_inception_input():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -3.0]).reshape(1, 1, 1, 7)
    out = to_inception_input(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 7)
    expected = torch.tensor([0, 64, 128, 191, 255, 255, 0], dtype=torch.uint8)
    for c in range(3):
        assert torch.equal(out[0, c, 0], expected)
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(to_inception_input(rgb), (rgb * 127.5 + 128).clip(0, 255).to(torch.uint8))
    with pytest.raises(ValueError):
        to_inception_input(torch.zeros(1, 2, 4, 4))


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised torch-fidelity Inception-v3 state_dict, built without any download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    mp = pytest.MonkeyPatch()
    try:
        # With no weights path the constructor fetches a URL: answer with an empty dict instead and
        # skip loading it, leaving PyTorch's random initialisation in place.
        mp.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_factory_downloads_when_allowed(random_inception_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(feat, "INCEPTION_WEIGHTS_URL", random_inception_weights.as_uri())
    ds = digits(limit=2)
    with pytest.raises(InceptionWeightsMissing):
        inception_features(ds, tmp_path)  # download=false: the offline default
    extractor = inception_features(ds, tmp_path, download=True)
    assert extractor.weights_path == tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    assert extractor.name == feat.INCEPTION_EXTRACTOR_NAME
    saved = torch.load(random_inception_weights, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in extractor.inception.state_dict().items())


def test_inception_loads_local_weights(random_inception_weights, tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    ds = digits(limit=3)
    extractor = inception_features(ds, tmp_path, weights_path=str(random_inception_weights))
    assert extractor.num_features == 2048 and not extractor.training
    saved = torch.load(random_inception_weights, weights_only=True)
    loaded = extractor.inception.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        out = extractor(ds.samples)
    assert out.shape == (3, 2048) and torch.isfinite(out).all()
    # Grayscale goes in as three identical uint8 channels.
    with torch.no_grad():
        direct = extractor.inception(to_inception_input(ds.samples))
    assert torch.equal(out, direct)


def test_reference_statistics_reload_gives_the_same_distance(tmp_path):
    """A cached reference (float64 sums and count) measures exactly like the extracted one."""
    data = toy2d()
    fresh = FrechetDistance(raw_features(data, tmp_path))
    fresh.set_reference(data.samples)
    stats = fresh.reference_statistics()
    assert int(stats["real_features_num_samples"]) == len(data) and stats["real_features_sum"].dtype == torch.float64
    reloaded = FrechetDistance(raw_features(data, tmp_path))
    reloaded.load_reference_statistics(stats)
    generated = data.samples[:500] * 0.9 + 0.05
    assert reloaded(generated) == fresh(generated)
    assert reloaded(generated) > 1e-3


def test_features_are_accumulated_in_float64():
    """float32 features with a large mean and a small spread: float32 sums would lose the covariance."""
    from edm_lab.evaluate.reference import moments_from_statistics

    gen = torch.Generator().manual_seed(0)
    x = (1000 + 0.01 * torch.randn(4000, 2, generator=gen, dtype=torch.float64)).to(torch.float32)
    fd = FrechetDistance(raw_features(ArrayDataset("wide", x), None), batch_size=512)
    fd.set_reference(x)
    mu, sigma, count = moments_from_statistics(fd.reference_statistics())
    assert count == 4000
    torch.testing.assert_close(mu, x.double().mean(0), rtol=1e-12, atol=0)
    # Variances are 1e-4; float32 sums of squares (~4e9) would be off by ~1e-2. The 1e-9 that is left is
    # torchmetrics' sum-of-squares formula cancelling in float64.
    torch.testing.assert_close(sigma, torch.cov(x.double().T), rtol=0, atol=1e-9)
