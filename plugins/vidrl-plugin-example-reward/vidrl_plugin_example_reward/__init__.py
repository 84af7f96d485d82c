"""A third-party reward in ~20 lines: register it under the entry-point group ``trl_video``."""

import torch

from trl_video import hookimpl


class WarmthReward:
    """Mean of (red - blue) over all pixels of a [-1, 1] video ``[B, 3, F, H, W]``: warmer is better."""

    name = "warmth"
    space = "pixel"  # the trainer decodes latents for us
    differentiable = True  # usable by reward-backprop methods (ReFL)

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (videos[:, 0] - videos[:, 2]).flatten(1).mean(1) / 2


@hookimpl
def trl_video_register_rewards(register):
    register("warmth", WarmthReward)
