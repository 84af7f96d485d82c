"""vidrl-plugin-rsm: Reward Score Matching for trl-video, with the GRPO family as its presets.

Registers the loss ``rsm`` and the methods ``rsm``, ``flow-grpo``, ``flow-grpo-fast``, ``dance-grpo``,
``mix-grpo``, ``tempflow-grpo``, ``branch-grpo`` and the paper's redesigns ``rsm-zo`` (zeroth order: fair
clipping, reallocated branching) and ``rsm-rsd`` (first order: reward score distillation). The samplers are the
core's (``sde`` with ``kind: flow_grpo | dance_grpo``, ``branch``, ``ode``). Its studies are in the repository's
``benchmarks/rsm`` (``trl-video bench rsm.estimators``, ``rsm.grpo``).
"""

from __future__ import annotations

from trl_video import hookimpl

from .config import RSMConfig
from .loss import RSMLoss
from .presets import PRESETS, RSM_CITE, method_spec

__all__ = ["CITATION", "PRESETS", "RSMConfig", "RSMLoss"]
__version__ = "0.1.0"
CITATION = RSM_CITE


@hookimpl
def trl_video_register_methods(register):
    for preset in PRESETS:
        register(preset.name, method_spec(preset))


@hookimpl
def trl_video_register_losses(register):
    register("rsm", RSMLoss)
