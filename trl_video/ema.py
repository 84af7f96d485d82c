"""EMA copies of trainable groups: diffusers' ``EMAModel``, with an optional decay schedule set by the loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers.training_utils import EMAModel


class ScheduledEMA(EMAModel):
    """``EMAModel`` whose decay after ``n`` optimiser steps is ``schedule(n)`` (n = 1 after the first step).

    Losses that treat the EMA as a second policy need their own schedule rather than diffusers' warm-up
    ``(1 + n) / (10 + n)``: DiffusionNFT's "old" policy follows ``min(rate * n, max)`` and equals the current
    policy after every update while the decay is 0."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], schedule: Callable[[int], float]):
        super().__init__(parameters, decay=1.0, min_decay=0.0)
        self.schedule = schedule

    def get_decay(self, optimization_step: int) -> float:
        decay = float(self.schedule(int(optimization_step)))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay schedule returned {decay} at step {optimization_step}; must be in [0, 1]")
        return decay


def make_ema(parameters: list[torch.nn.Parameter], decay: float | None,
             schedule: Callable[[int], float] | None) -> EMAModel | None:
    """The EMA a group gets: the loss's schedule when it gives one, else ``decay`` (diffusers' warm-up), else none."""
    if schedule is not None:
        return ScheduledEMA(parameters, schedule)
    if decay:
        return EMAModel(parameters, decay=decay)
    return None
