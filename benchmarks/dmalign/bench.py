"""DM-Align benchmarks (``benchmarks/dmalign``, from a checkout): ``trl-video bench dmalign.experiments <what>``
(``toy``, ``baselines``, ``train``, ``rescore``, ``table``, ``memory``, ``preferred``; see experiments.py)."""

from __future__ import annotations

from .experiments import bench_main

BENCHMARKS = {"experiments": bench_main}
BENCHMARK_ALIASES = {"dmalign": "experiments"}
