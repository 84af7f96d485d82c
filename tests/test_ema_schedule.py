"""A loss can put a trainable group's EMA on its own decay schedule (DiffusionNFT's old policy); losses without
the optional ``ema_schedule`` method keep the recipe's ``ema_decay``."""

from __future__ import annotations

import pytest
import torch

from trl_video.components.base import ensure_interface
from trl_video.ema import ScheduledEMA, make_ema


def test_scheduled_ema_uses_the_schedule_after_n_steps() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema([p], decay=0.99, schedule=lambda n: min(0.25 * n, 0.5))
    assert isinstance(ema, ScheduledEMA)
    expected = torch.zeros(3)
    for n in range(1, 5):
        with torch.no_grad():
            p.add_(1.0)
        ema.step([p])
        d = min(0.25 * n, 0.5)
        expected = d * expected + (1 - d) * p.detach()  # the EMA recursion, by hand
        assert ema.cur_decay_value == pytest.approx(d)
        torch.testing.assert_close(ema.shadow_params[0], expected)


def test_make_ema_without_schedule_is_diffusers_ema_or_none() -> None:
    from diffusers.training_utils import EMAModel

    p = torch.nn.Parameter(torch.zeros(2))
    assert type(make_ema([p], decay=0.9, schedule=None)) is EMAModel
    assert make_ema([p], decay=None, schedule=None) is None


def test_a_schedule_outside_0_1_is_an_error() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    ema = make_ema([p], decay=None, schedule=lambda n: 1.5)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        ema.step([p])


def test_a_loss_without_ema_schedule_gets_the_no_schedule_fallback() -> None:
    class OldLoss:  # written before ema_schedule existed: no base class
        sample_grad = reward_grad = False

        def setup(self, ctx):
            return {}

        def phases(self, step):
            return []

        def compute(self, ctx, phase, batch):
            return torch.zeros(()), {}

    loss = ensure_interface("loss", OldLoss(), "old")
    assert loss.ema_schedule("policy") is None
