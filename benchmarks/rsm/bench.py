"""RSM benchmarks (``benchmarks/rsm``, from a checkout): ``trl-video bench rsm.estimators`` (the isolated estimator
study, estimators.py), ``trl-video bench rsm.grpo`` (presets side by side on the CPU world, grpo_cpu.py) and
``trl-video bench rsm.spread`` (where a GRPO group's reward spread comes from, reward_spread.py); the former names
``rsm-estimators`` / ``rsm-grpo`` still work."""

from __future__ import annotations


def estimators_main(argv: list[str]) -> int:
    from .estimators import main

    return main(argv)


def spread_main(argv: list[str]) -> int:
    from .reward_spread import main

    return main(argv)


def grpo_main(argv: list[str]) -> int:
    from .grpo_cpu import main

    return main(argv)


BENCHMARKS = {"estimators": estimators_main, "grpo": grpo_main, "spread": spread_main}
BENCHMARK_ALIASES = {"rsm-estimators": "estimators", "rsm-grpo": "grpo"}
