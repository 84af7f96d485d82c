import pytest
import torch

# one thread: on a shared 2-core machine, two spinning intra-op threads are several times slower
torch.set_num_threads(1)

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


@pytest.fixture(scope="session")
def teacher_policy():
    from trl_video.models.policy import load_policy

    return load_policy("tiny-wan")


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def embeds(teacher_policy):
    return teacher_policy.encode_prompts(PROMPTS)[0]
