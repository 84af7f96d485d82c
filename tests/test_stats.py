"""The statistics module against independent references (closed forms and direct loops)."""

from __future__ import annotations

import math
import statistics

import torch

from trl_video.stats import bootstrap, frechet_distance, mean_sem, median_bandwidth, mmd2


def test_mean_sem_matches_the_statistics_module() -> None:
    xs = [0.3, 1.7, -0.4, 2.2, 0.9]
    out = mean_sem(torch.tensor(xs, dtype=torch.float64))
    assert math.isclose(out["mean"], statistics.fmean(xs), rel_tol=1e-12)
    assert math.isclose(out["std"], statistics.stdev(xs), rel_tol=1e-12)
    assert math.isclose(out["sem"], statistics.stdev(xs) / math.sqrt(5), rel_tol=1e-12)
    assert mean_sem(torch.tensor([4.0])) == {"mean": 4.0, "std": 0.0, "sem": 0.0}


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form() -> None:
    # for commuting (diagonal) covariances: |mu_a - mu_b|^2 + sum_i (sqrt(va_i) - sqrt(vb_i))^2
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5])
    va, vb = a.var(0), b.var(0)  # the empirical moments the formula is evaluated on (nearly diagonal)
    expect = float((a.mean(0) - b.mean(0)).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum())
    assert abs(frechet_distance(a, b) - expect) < 0.02
    assert abs(frechet_distance(a, a)) < 1e-9


def test_mmd2_matches_a_direct_double_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 2, 1, 1, 1, generator=g), torch.randn(5, 2, 1, 1, 1, generator=g) + 0.5
    h = 0.8

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.exp(-float(((a.double() - b.double()) ** 2).sum()) / (2 * h * h))

    sxx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    sxy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert math.isclose(mmd2(x, y, h), sxx + syy - 2 * sxy, rel_tol=1e-9, abs_tol=1e-12)
    d = [math.dist(x[i].flatten().tolist(), x[j].flatten().tolist()) for i in range(7) for j in range(7) if i != j]
    assert math.isclose(median_bandwidth(x), statistics.median(d), rel_tol=1e-6)


def test_bootstrap_se_of_the_mean_is_close_to_the_sem_and_keeps_pairs() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, generator=g, dtype=torch.float64)
    res = bootstrap(lambda v: float(v.mean()), x, n=400, seed=0)
    assert abs(res["se"] / mean_sem(x)["sem"] - 1) < 0.15
    # paired: the statistic of (x, x) resamples the same rows, so x - x is exactly 0 every time
    paired = bootstrap(lambda a, b: float((a - b).abs().max()), x, x.clone(), n=20)
    assert paired["se"] == 0.0 and paired["value"] == 0.0


def test_frechet_distance_of_an_affine_image_has_the_closed_form() -> None:
    """FD of b = c a + m (any covariance): |mu_b - mu_a|^2 + (1 - c)^2 Tr(S_a)."""
    import pytest

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g)).double()
    m = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3], dtype=torch.float64)
    for c in (1.0, 0.5, 2.0):
        b = c * a + m
        want = float((b.mean(0) - a.mean(0)).pow(2).sum() + (1 - c) ** 2 * torch.trace(torch.cov(a.T)))
        assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-6)
