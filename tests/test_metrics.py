"""The package's ``evaluate`` modules, loaded with ``evaluate.load(<local path>)``, against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trl_video.evaluation import METRICS_DIR, load_metric, save_results, video_features


def test_reward_gain_is_the_paired_mean_with_its_standard_error() -> None:
    before, after = [0.1, 0.4, 0.3, 0.2], [0.5, 0.4, 0.6, 0.3]
    d = [a - b for a, b in zip(after, before)]  # 0.4, 0.0, 0.3, 0.1
    mean = sum(d) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    out = load_metric("reward_gain").compute(predictions=after, references=before)
    assert out["gain"] == pytest.approx(0.2) and out["gain_sem"] == pytest.approx(std / 2)
    assert out["before"] == pytest.approx(0.25) and out["after"] == pytest.approx(0.45) and out["num_pairs"] == 4
    assert out["gain_in_sem"] == pytest.approx(0.2 / (std / 2))


def test_frechet_distance_closed_form() -> None:
    """FD of b = c a + m: |m + (c - 1) mu_a|^2 + (1 - c)^2 Tr(S_a) (S_b = c^2 S_a commutes with S_a)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.3, 0], [0, 0.5, 0.2],
                                                                             [0, 0, 2.0]], dtype=torch.float64)
    c, m = 0.5, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b = c * a + m
    expected = float((m + (c - 1) * a.mean(0)).pow(2).sum() + (1 - c) ** 2 * torch.trace(torch.cov(a.T)))
    out = load_metric("frechet_distance").compute(predictions=b.tolist(), references=a.tolist(), num_bootstrap=50)
    assert out["frechet_distance"] == pytest.approx(expected, rel=1e-6)
    assert 0 < out["frechet_distance_se"] < expected
    same = load_metric("frechet_distance").compute(predictions=a.tolist(), references=a.tolist(), num_bootstrap=0)
    assert abs(same["frechet_distance"]) < 1e-8 and same["frechet_distance_se"] is None


def test_diversity_pairwise_distances() -> None:
    feats = [[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [0.0, 1.0]]
    groups = ["p", "p", "q", "q"]  # within p: 5; within q: 0
    out = load_metric("diversity").compute(predictions=feats, references=groups)
    pair = [5.0, 1.0, 1.0, math.sqrt(18), math.sqrt(18), 0.0]  # all 6 pairs
    assert out["diversity"] == pytest.approx(sum(pair) / 6)
    assert out["diversity_within"] == pytest.approx(2.5) and out["diversity_within_sem"] == pytest.approx(2.5)
    assert out["num_groups"] == 2


def test_modules_ship_in_the_package_and_save_writes_provenance(tmp_path: Path) -> None:
    for name in ("reward_gain", "frechet_distance", "diversity"):
        assert (METRICS_DIR / name / f"{name}.py").exists()
    save_results(tmp_path / "r.json", {"gain": 0.5, "nested": {"a": [1, 2]}})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["gain"] == 0.5 and data["nested"] == {"a": [1, 2]} and "_evaluate_version" in data


def test_video_features_see_colour_and_motion() -> None:
    from trl_video import world

    clips = world.render_batch(["a red circle moving left on a dark background",
                                "a red circle moving right on a dark background"], [0, 0])
    f = video_features(clips)
    assert f.shape == (2, 13)
    assert f[0, 9] < 0 < f[1, 9]  # horizontal displacement of the object's centroid
    assert f[0, 2] > f[0, 3] and f[0, 2] > f[0, 4]  # red object
