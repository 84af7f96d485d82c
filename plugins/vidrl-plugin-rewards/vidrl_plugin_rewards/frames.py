"""Frame selection: which frames of a video ``[B, 3, F, H, W]`` an image reward scores.

``last`` / ``first``: one frame; ``uniform`` (k evenly spaced, endpoints included); ``random`` (k distinct
frames per sample, from the reward's own seeded generator); ``all``. The video's score is the mean of its
frames' scores; the per-frame scores stay available (:meth:`FrameRewardMixin.score_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trl_video.errors import TrlVideoError

MODES = ("last", "first", "uniform", "random", "all")


@dataclass
class FrameSelection:
    mode: str = "last"
    k: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TrlVideoError(f"frames: unknown mode '{self.mode}'; expected one of {', '.join(MODES)}")
        if self.k < 1:
            raise TrlVideoError(f"frames: k must be >= 1, got {self.k}")
        self._gen = torch.Generator().manual_seed(self.seed)

    def indices(self, batch: int, num_frames: int) -> Tensor:
        """``[batch, K]`` frame indices (long)."""
        f = num_frames
        if self.mode == "last":
            idx = torch.full((1,), f - 1)
        elif self.mode == "first":
            idx = torch.zeros(1, dtype=torch.long)
        elif self.mode == "all":
            idx = torch.arange(f)
        elif self.mode == "uniform":
            k = min(self.k, f)
            idx = torch.linspace(0, f - 1, k).round().long() if k > 1 else torch.full((1,), f - 1)
        else:  # random: k distinct frames per sample
            k = min(self.k, f)
            return torch.stack([torch.randperm(f, generator=self._gen)[:k].sort().values for _ in range(batch)])
        return idx.long().unsqueeze(0).expand(batch, -1).clone()

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._gen.set_state(state["generator"])


def gather_frames(video: Tensor, idx: Tensor) -> Tensor:
    """``video [B, 3, F, H, W]``, ``idx [B, K]`` -> images ``[B*K, 3, H, W]`` (sample-major), differentiable."""
    b, c, _, h, w = video.shape
    k = idx.shape[1]
    sel = idx.to(video.device).view(b, 1, k, 1, 1).expand(b, c, k, h, w)
    return video.gather(2, sel).permute(0, 2, 1, 3, 4).reshape(b * k, c, h, w)


class FrameRewardMixin:
    """An image reward ``score_images(images [N, 3, H, W] in [-1, 1], prompts [N]) -> [N]`` applied to videos."""

    frames: FrameSelection

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def score_frames(self, video: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Per-frame scores ``[B, K]`` and the frame indices ``[B, K]`` they belong to."""
        if video.ndim == 4:  # images: one frame each
            video = video.unsqueeze(2)
        b, _, f = video.shape[:3]
        idx = self.frames.indices(b, f)
        k = idx.shape[1]
        images = gather_frames(video, idx)
        scores = self.score_images(images, [p for p in prompts for _ in range(k)])
        return scores.view(b, k), idx

    def __call__(self, video: Tensor, prompts: list[str]) -> Tensor:
        return self.score_frames(video, prompts)[0].mean(1)
