"""DM-Align benchmarks (``benchmarks/dmalign``, from a checkout): ``trl-video bench dmalign.experiments <what>``
(``toy``, ``baselines``, ``train``, ``rescore``, ``table``, ``memory``, ``preferred``; see experiments.py)."""

from __future__ import annotations

from .experiments import bench_main

BENCHMARKS = {"experiments": bench_main}
# the preferred set of recipes/tiny/dmalign_pair.yaml (ground-truth world clips encoded with tiny-cogvideox's VAE)
BUILDS = {"out/dmalign_experiments/preferred_latents": "trl-video bench dmalign.experiments preferred"}
BENCHMARK_ALIASES = {"dmalign": "experiments"}
