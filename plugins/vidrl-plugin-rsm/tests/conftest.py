"""Shared fixtures: the tiny random Wan (real diffusers architecture) with a LoRA whose B is non-zero."""

from __future__ import annotations

import pytest
import torch

from trl_video.components.base import TrainContext
from trl_video.components.rewards import AlignmentReward
from trl_video.config import VideoRewardConfig
from trl_video.models.presets import build_random

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


@pytest.fixture(scope="module")
def policy():
    pol = build_random("wan")
    pol.add_lora(4, init_seed=0)
    with torch.no_grad():  # LoRA B starts at zero; random values make the policy differ from the reference
        g = torch.Generator().manual_seed(123)
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return pol


def make_ctx(policy, seed: int = 0, **cfg) -> TrainContext:
    from accelerate import Accelerator

    config = VideoRewardConfig(model="tiny-wan-random", report_to="none", save_model_at_end=False, max_steps=1,
                               prompts_per_step=1, group_size=2, seed=seed, **cfg)
    return TrainContext(policy=policy, config=config, accelerator=Accelerator(), reward=AlignmentReward(),
                        method_config=None, generator=torch.Generator().manual_seed(1000 + seed))
