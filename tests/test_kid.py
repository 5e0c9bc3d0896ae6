"""The kernel distance (KID) beside the Frechet distance: torchmetrics' estimator, its column in the rows."""
from __future__ import annotations

import pytest
import torch

from edm_lab.evaluate.features import kernel_distance
from edm_lab.tasks.sample import kid_column, run_sample
from tests.test_configs import compose_cfg
from tests.test_sample_task import CHOICES, TINY


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Binkowski et al.'s unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, written out."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_kernel_distance_is_the_unbiased_mmd_and_follows_the_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 6, generator=g, dtype=torch.float64)
    same = torch.randn(300, 6, generator=g, dtype=torch.float64)
    shifted = same + 0.5
    # One subset as large as both sets is the whole sets, in some order: the estimator itself.
    assert kernel_distance(real, shifted, subsets=1, subset_size=300) == pytest.approx(unbiased_mmd2(real, shifted),
                                                                                        rel=1e-10)
    near, far = kernel_distance(real, same, 20, 100), kernel_distance(real, shifted, 20, 100)
    assert abs(near) < 0.1 * far
    # A fixed subset seed: a function of the features alone, and the caller's random state untouched.
    state = torch.get_rng_state()
    assert kernel_distance(real, shifted, 20, 100) == far
    assert torch.equal(torch.get_rng_state(), state)
    # The subset size is capped by the smaller set; too few samples or mismatched dimensions are refused.
    assert kernel_distance(real[:50], shifted, 3, 1000) == kernel_distance(real[:50], shifted, 3, 50)
    with pytest.raises(ValueError, match="N >= 2"):
        kernel_distance(real[:1], shifted)
    with pytest.raises(ValueError, match="dimensions"):
        kernel_distance(real, shifted[:, :3])


def test_rows_carry_the_kernel_distance_beside_the_frechet_distance(tmp_path):
    base = [o for o in TINY if not o.startswith("nfe.steps")] + ["nfe.steps=[2,5]"]
    rows = run_sample(compose_cfg(tmp_path, *base), CHOICES)
    assert kid_column(compose_cfg(tmp_path, *base)) == "kid_raw"
    assert all(isinstance(r["kid_raw"], float) for r in rows)
    assert rows[0]["kid_raw"] > rows[1]["kid_raw"]  # 2 steps are far worse than 5
    assert len(list((tmp_path / ".cache" / "reference_features").glob("*.pt"))) == 1
    off = run_sample(compose_cfg(tmp_path, *base, "metric.kid=null"), CHOICES)
    assert all("kid_raw" not in r for r in off) and off[0]["config_hash"] != rows[0]["config_hash"]
    assert off[0]["fd_raw"] == rows[0]["fd_raw"]  # the Frechet distance does not depend on it
    assert kid_column(compose_cfg(tmp_path, "metric=fid")) is None  # off by default for FID (50k features)
    assert kid_column(compose_cfg(tmp_path, "metric=fid", "metric.kid={subsets:100,subset_size:1000}")) == "kid"
