"""Shared test settings."""

import os

import torch

# The tiny models gain nothing from intra-op threads, and several torch processes on a 2-core machine
# (tests next to a training run, the 2-process DDP test) slow each other down badly when each spins
# 2 OpenMP threads. TRL_VIDEO_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TRL_VIDEO_TEST_THREADS", "1")))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
