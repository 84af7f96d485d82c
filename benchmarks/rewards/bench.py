"""Rewards benchmarks (``benchmarks/rewards``, from a checkout): ``trl-video bench rewards.reward-overlap`` (one
training step with a slow remote reward, serial vs overlapped scoring, reward_overlap.py)."""

from __future__ import annotations


def reward_overlap_main(argv: list[str]) -> int:
    from .reward_overlap import bench_reward_overlap

    return bench_reward_overlap(argv)


BENCHMARKS = {"reward-overlap": reward_overlap_main}
