"""Reward-Forcing experiments (``benchmarks/reward_forcing``, from a checkout):
``trl-video bench reward_forcing.experiments ode|reward|stream`` (= ``python benchmarks/reward_forcing/experiments.py``)."""

from __future__ import annotations


def experiments_main(argv: list[str]) -> int:
    from .experiments import main

    return int(main(argv) or 0)


BENCHMARKS = {"experiments": experiments_main}
