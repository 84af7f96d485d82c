"""The shipped tiny base models: they load as trained weights, reconstruct world clips and follow held-out captions
better than random weights of the same architecture (the full measurement is in each pretrain_report.json)."""

from __future__ import annotations

import warnings

import pytest
import torch

from trl_video import world
from trl_video.components.rewards import AlignmentReward
from trl_video.evaluation import eval_pairs, sample_videos
from trl_video.models.policy import load_policy


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-cogvideox"])
def test_shipped_model_reconstructs_and_beats_random_weights(preset: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the random-weight fallback warns: must not happen
        policy = load_policy(preset)
    assert policy.source == preset
    prompts, seeds = eval_pairs("world:heldout", 8)
    clips = world.render_batch(prompts, seeds)
    with torch.no_grad():
        recon = policy.decode(policy.encode_video(clips))
    assert (recon - clips).abs().mean() < 0.12

    reward = AlignmentReward()
    with torch.no_grad():
        trained = reward(policy.decode(sample_videos(policy, prompts, seeds, num_steps=10)), prompts).mean()
        rand = load_policy(f"{preset}-random")
        random_ = reward(rand.decode(sample_videos(rand, prompts, seeds, num_steps=10)), prompts).mean()
    assert trained > random_ + 0.15, (float(trained), float(random_))
