"""Tests of the benchmarks' helpers: the folders are imported as ``trl_video_benchmarks.<method>``."""

import os

import torch

torch.set_num_threads(1)  # the shared CPU box: one thread is much faster than two contended ones
os.environ.setdefault("HF_HUB_OFFLINE", "1")
