"""Helpers of the asset builder (benchmarks/assets)."""

from __future__ import annotations

import torch

from trl_video.bench_discovery import import_benchmark
from trl_video.models.policy import load_policy


def test_wan_training_decode_equals_decode_up_to_the_clamp() -> None:
    policy = load_policy("tiny-wan-random")
    z = 3 * torch.randn(1, *policy.latent_shape)  # large latents: the raw output leaves [-1, 1]
    with torch.no_grad():
        raw = import_benchmark("assets", "pretrain").decode_unclamped(policy.vae, z)
        ref = policy.vae.decode(z).sample
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(raw.clamp(-1, 1), ref)
