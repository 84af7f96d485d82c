"""trl-video: reward fine-tuning and RL post-training of video diffusion / flow-matching models."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "trl_video"
#: Decorator for plugin hook implementations: ``@hookimpl def trl_video_register_rewards(register): ...``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["__version__", "hookimpl", "PROJECT_NAME"]


def __getattr__(name: str):  # lazy: importing the package must stay cheap (CLI start-up, plugins)
    if name in {"VideoRewardConfig"}:
        from .config import VideoRewardConfig

        return VideoRewardConfig
    if name in {"VideoRewardTrainer"}:
        from .trainer import VideoRewardTrainer

        return VideoRewardTrainer
    if name == "Rollouts":
        from .rollouts import Rollouts

        return Rollouts
    raise AttributeError(name)
