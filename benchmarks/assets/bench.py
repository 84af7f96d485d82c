"""Building the embedded tiny base models (``trl_video/assets/``): ``trl-video pretrain ...`` (= ``trl-video bench
assets.pretrain ...``), from a checkout. Asset building reaches into diffusers internals (the unclamped VAE decode),
so it stays out of the installed package."""

from __future__ import annotations

from .pretrain import main as pretrain_main

BENCHMARKS = {"pretrain": pretrain_main}
