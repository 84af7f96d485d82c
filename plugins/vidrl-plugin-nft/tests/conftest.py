"""Tests run single-threaded (the suite shares 2 cores)."""

import torch

torch.set_num_threads(1)
