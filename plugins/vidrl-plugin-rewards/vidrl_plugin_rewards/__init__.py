"""trl-video reward models, reward mixing and the reward service, registered through the ``reward`` hook.

Rewards: ``clip_score``, ``pickscore``, ``hpsv2``, ``hpsv21``, ``aesthetic``, ``imagereward``,
``videoalign``, ``mix``, and ``http://`` / ``https://`` URLs (a ``trl-video reward-serve`` server). Modules are imported
when a reward is built, so listing plugins loads no model code.
"""

from __future__ import annotations

from typing import Any

from trl_video import hookimpl

__version__ = "0.1.0"


def _lazy(module: str, attr: str) -> Any:
    def factory(**kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(**kwargs)

    factory.__name__ = attr
    factory.__doc__ = f"{attr} from {__name__}.{module}"
    return factory


REWARDS = {
    "clip_score": ("clip", "ClipScore"),
    "pickscore": ("clip", "PickScore"),
    "hpsv2": ("clip", "HPSv2"),
    "hpsv21": ("clip", "HPSv21"),
    "aesthetic": ("clip", "Aesthetic"),
    "imagereward": ("blip", "ImageReward"),
    "videoalign": ("videoalign", "VideoAlign"),
    "mix": ("mix", "MixReward"),
    "http://": ("service", "HttpReward"),
    "https://": ("service", "HttpReward"),
}


@hookimpl
def trl_video_register_rewards(register):
    for name, (module, attr) in REWARDS.items():
        register(name, _lazy(module, attr))
