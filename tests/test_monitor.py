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


def test_ground_truth_is_at_distance_zero_and_noise_is_far():
    prompts = [PROMPTS[i % 4] for i in range(24)]
    seeds = list(range(24))
    ref = monitor.world_reference(prompts, seeds)
    feats = video_features(ref)
    same = monitor.distance_stats(ref, feats)
    noise = monitor.distance_stats(torch.rand_like(ref) * 2 - 1, feats)
    assert abs(same["frechet_distance"]) < 1e-6 and noise["frechet_distance"] > 10
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
