"""``velr_window``: the core ``window`` sampler (no grad down to a random ``t_mid``, K grad steps, one-shot x0
prediction) that also records where its last network evaluation happened, for VELR's KL term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trl_video.components.base import TrainContext
from trl_video.components.samplers import WindowGradSampler
from trl_video.rollouts import Rollouts


class VELRWindowSampler(WindowGradSampler):
    """Truncated mid-step sampling (paper Sec. 4.3, App. C.2: 50 steps, t_mid in steps 15-25, K = 10).

    Identical to ``window`` with ``finish="x0"``; additionally ``Rollouts.x_last`` (detached) and
    ``Rollouts.t_last`` hold the input of the last network evaluation with gradients (the one-shot x0
    prediction at ``t_{mid+K}``), where VELR's loss evaluates the KL to the initial model.
    """

    name = "velr_window"

    def __init__(self, num_steps: int = 50, grad_steps: int = 10, start_range: list[int] | None = (15, 25),  # type: ignore[assignment]
                 finish: str = "x0", behaviour: str = "current", record_trajectory: bool = False, eta: float = 0.0,
                 checkpointing: bool = False):
        super().__init__(num_steps, grad_steps, list(start_range) if start_range is not None else None, finish,
                         behaviour, record_trajectory, eta, checkpointing)
        self._last: tuple[Tensor, Tensor] | None = None

    def _predict(self, ctx: TrainContext, net: Any, x: Tensor, t: Tensor, embeds: Tensor, checkpoint: bool):
        self._last = (x.detach(), t.detach())
        return super()._predict(ctx, net, x, t, embeds, checkpoint)

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        out = super().sample(ctx, prompts, embeds, group_ids)
        assert self._last is not None
        x, t = self._last
        out.x_last = x
        out.t_last = torch.as_tensor(t, device=x.device).expand(len(prompts)).clone()
        self._last = None
        return out
