import os
import warnings

import pytest
import torch

torch.set_num_threads(1)  # the shared CPU box: one thread is much faster than two contended ones
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*velr: the LRM has random weights.*")

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
SMALL_LRM = {"members": 3, "widths": [8, 8, 16], "heads": 2, "layers": 1}


@pytest.fixture(scope="session")
def cog_policy():
    from trl_video.models.policy import load_policy

    return load_policy("tiny-cogvideox-random")
