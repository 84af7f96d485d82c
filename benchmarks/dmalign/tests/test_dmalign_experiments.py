"""Helpers of the DM-Align experiments (benchmarks/dmalign)."""

from __future__ import annotations

import torch

from trl_video.bench_discovery import import_benchmark
from trl_video.models.policy import load_policy


def test_teacher_best_preferred_set_keeps_the_higher_reward_sample():
    """--preferred teacher-best: per caption, the better of two 50-step teacher samples by the alignment reward."""
    from trl_video.evaluation import sample_videos

    E = import_benchmark("dmalign", "experiments")
    pol = load_policy("tiny-wan-random")
    prompts, seeds = ["a red circle moving left", "a blue square moving up"], [3, 4]
    got = E.preferred_latents(pol, prompts, seeds, "teacher-best", guidance_scale=2.0)
    cands = [sample_videos(pol, prompts, [(s * 7 + j) * 1009 for s in seeds], 50, guidance_scale=2.0) for j in (1, 2)]
    rewards = [E.alignment_reward(pol.decode(c), prompts, per_sample=True) for c in cands]
    for i in range(2):
        best = 0 if rewards[0][i] >= rewards[1][i] else 1
        torch.testing.assert_close(got[i], cands[best][i])
    assert not torch.allclose(cands[0], cands[1])


def test_paired_gap_of_identical_sets_is_zero_and_a_shifted_set_is_worse():
    E = import_benchmark("dmalign", "experiments")
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(200, 4, generator=g) @ torch.randn(4, 4, generator=g)).double()
    gap = E.paired_gap(a, a, a + 1.0, n=20)
    assert gap["fd_minus_teacher_ode"] == 0.0 and gap["fd_minus_teacher_ode_se"] == 0.0
    worse = E.paired_gap(a + 3.0, a, a, n=30)
    assert worse["fd_minus_teacher_ode"] > 8.0 and worse["fd_minus_teacher_ode_p"] == 1.0
