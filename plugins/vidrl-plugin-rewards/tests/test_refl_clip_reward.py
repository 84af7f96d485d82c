"""ReFL on the tiny world with a CLIP-family reward (tiny random CLIP loaded from a Hub-layout folder)."""

from __future__ import annotations

import tiny_reward_models as tiny
import torch

from trl_video.config import config_from_dict
from trl_video.trainer import VideoRewardTrainer


def test_refl_trains_with_clip_score(tmp_path):
    folder = tiny.save_tiny_clip(tmp_path / "clip")
    cfg = config_from_dict(dict(
        model="tiny-wan-random", method="refl", reward="clip_score",
        reward_args={"model": str(folder), "frames": "uniform", "k": 2}, max_steps=2, prompts_per_step=2,
        group_size=1, sampler_args={"num_steps": 2, "grad_steps": 1}, output_dir=str(tmp_path / "run"),
        report_to="none", save_model_at_end=False, learning_rate=1e-3, seed=0))
    tr = VideoRewardTrainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}
    tr.train()
    assert len(tr.history) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in tr.history)
    assert all(r["grad_norm/policy"] > 0 for r in tr.history)  # the CLIP reward's gradient reached the LoRA
    after = dict(tr.policy.transformer.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / "run" / "checkpoint-2" / "trainable.safetensors").exists()
