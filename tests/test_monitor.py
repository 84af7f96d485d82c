"""Reward-hacking monitor of ``trl-video eval``: statistics against hand computations, and the monitor in a
tiny run's end-of-training evaluation (held-out rewards, distance, diversity, reward vs distance per checkpoint)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trl_video import monitor
from trl_video.evaluation import video_features

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background",
           "a green circle moving right on a gray background", "a yellow square moving down on a dark background"]


def test_diversity_is_mean_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert monitor.diversity(x) == pytest.approx((5 + 4 + 3) / 3)
    assert monitor.diversity(x[:1]) == 0.0


def _with_moments(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Samples whose empirical mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    z = z - z.mean(0)
    ev, vec = torch.linalg.eigh(torch.cov(z.T))
    white = z @ vec @ torch.diag(ev.rsqrt()) @ vec.T  # empirical covariance = I
    return mean + white @ torch.linalg.cholesky(cov).T


def test_frechet_distance_equals_the_closed_form_for_two_gaussians():
    """Covariances sharing eigenvectors Q: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T, so
    Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) = sum_i (sqrt(a_i) - sqrt(b_i))^2 (hand-derived, no matrix root)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a, b = torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    x = _with_moments(torch.randn(300, 4, generator=g, dtype=torch.float64), mu1, q @ torch.diag(a) @ q.T)
    y = _with_moments(torch.randn(300, 4, generator=g, dtype=torch.float64), mu2, q @ torch.diag(b) @ q.T)
    closed = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert closed == pytest.approx(1 + 4 + 0 + 9 + (2 - 1) ** 2 + 0 + (0.5 - 1) ** 2 + (2 ** 0.5 - 0.5 ** 0.5) ** 2)
    res = monitor.frechet(x, y, num_bootstrap=20)
    assert res["frechet_distance"] == pytest.approx(closed, rel=1e-9)
    assert res["frechet_distance_se"] > 0
    # no standardisation: the distance is in the features' units (scaling them by c scales it by c^2)
    assert monitor.frechet(3 * x, 3 * y, num_bootstrap=0)["frechet_distance"] == pytest.approx(9 * closed, rel=1e-9)


def test_monitor_distance_is_the_evaluate_module_distance():
    """One implementation: the monitor's number is the ``frechet_distance`` module's on the same features, and a
    feature the reference holds nearly constant no longer inflates it (the old reference-std scaling turned a
    0.01 shift of such a feature into ~1e8)."""
    from trl_video.evaluation import load_metric

    prompts = [PROMPTS[i % 4] for i in range(12)]
    ref = video_features(monitor.world_reference(prompts, list(range(12))))
    moved = video_features(monitor.world_reference(prompts, list(range(100, 112))))
    res = monitor.frechet(moved, ref, num_bootstrap=0)
    module = load_metric("frechet_distance").compute(predictions=moved.tolist(), references=ref.tolist(),
                                                      num_bootstrap=0)
    assert res["frechet_distance"] == module["frechet_distance"]
    flat = ref.clone()
    flat[:, 0] = 0.5  # constant in the reference
    shifted = flat.clone()
    shifted[:, 0] = 0.51
    assert monitor.frechet(shifted, flat, num_bootstrap=0)["frechet_distance"] == pytest.approx(1e-4, abs=1e-7)  # eigen-root round-off


def test_ground_truth_is_at_distance_zero_and_noise_is_far():
    prompts = [PROMPTS[i % 4] for i in range(24)]
    seeds = list(range(24))
    ref = monitor.world_reference(prompts, seeds)
    feats = video_features(ref)
    same = monitor.distance_stats(ref, feats)
    other = monitor.distance_stats(monitor.world_reference(prompts, list(range(100, 124))), feats)
    noise = monitor.distance_stats(torch.rand_like(ref) * 2 - 1, feats)
    assert abs(same["frechet_distance"]) < 1e-6
    # fresh ground-truth clips (other seeds) sit within sampling noise; random pixels far beyond it
    assert other["frechet_distance"] < 0.1 < 1.0 < noise["frechet_distance"]
    assert noise["frechet_distance"] > 20 * other["frechet_distance"]
    assert monitor.world_reference(["not a caption"], [0]) is None


def test_monitor_in_end_of_training_eval(tmp_path):
    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    cfg = config_from_dict(dict(
        model="tiny-wan-random", method="refl", reward="alignment", max_steps=2, save_steps=1, save_total_limit=3,
        prompts_per_step=2, group_size=1, sampler_args={"num_steps": 2, "grad_steps": 1},
        output_dir=str(tmp_path / "run"), report_to="none", save_model_at_end=False, eval_at_end=True,
        eval_num_prompts=6, eval_num_steps=2, eval_rewards=["luminance"], seed=0))
    VideoRewardTrainer(cfg).train()
    res = json.loads((tmp_path / "run" / "eval" / "eval_results.json").read_text())
    mon = res["monitor"]
    assert mon["trained_reward"] == "alignment" and set(mon["heldout_rewards"]) == {"luminance"}
    assert mon["heldout_rewards"]["luminance"]["after"] == pytest.approx(res["per_reward"]["luminance"]["after"]["mean"])
    assert mon["reference"]["frechet_distance"] == pytest.approx(0, abs=1e-6)
    assert all(math.isfinite(mon[k][s]) for k in ("frechet_distance_to_reference", "diversity")
               for s in ("before", "after"))
    steps = [p["step"] for p in mon["checkpoints"]]
    assert steps == [0, 1, 2]
    # the last checkpoint is the trained policy: same samples, same reward and distance as "after"
    last = mon["checkpoints"][-1]
    assert last["reward"] == pytest.approx(res["reward_after"], abs=1e-4)
    assert last["frechet_distance"] == pytest.approx(mon["frechet_distance_to_reference"]["after"], rel=1e-3)
    assert (tmp_path / "run" / "eval" / "reward_vs_distance.png").stat().st_size > 1000
