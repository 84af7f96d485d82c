"""Estimators (hook point ``estimator``): turn rewards into the learning signal.

Group statistics are computed over the whole process group: rewards and group ids are all-gathered, so a
group whose samples are spread over several ranks is normalised exactly as on one process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rollouts import Rollouts
from .base import BaseEstimator, TrainContext


class NoEstimator(BaseEstimator):
    """Pass-through: the loss uses raw rewards (reward backprop, ReFL)."""

    name = "none"

    def __call__(self, ctx: TrainContext, batch: Rollouts) -> Rollouts:
        return batch


def group_advantages(rewards: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4) -> Tensor:
    """``(r - mean_G r) / (std_G r + eps)`` per group (``std``: group | batch | none). Population std."""
    adv = torch.empty_like(rewards)
    uniq = torch.unique(group_ids)
    batch_std = rewards.std(unbiased=False)
    for g in uniq:
        sel = group_ids == g
        r = rewards[sel]
        centred = r - r.mean()
        if std == "group":
            adv[sel] = centred / (r.std(unbiased=False) + eps)
        elif std == "batch":
            adv[sel] = centred / (batch_std + eps)
        else:
            adv[sel] = centred
    return adv


class GroupAdvantage(BaseEstimator):
    """GRPO-style group-normalised advantage, gathered across processes; sources other than
    ``sources`` (e.g. offline samples) get no group advantage (NaN) and are left to the loss."""

    name = "group"
    needs_groups = True  # validation refuses group_size 1 (every advantage would be 0)

    def __init__(self, std: str = "group", eps: float = 1e-4, sources: tuple[str, ...] = ("online", "ema")):
        if std not in ("group", "batch", "none"):
            from ..errors import TrlVideoError

            raise TrlVideoError(f"estimator_args.std must be group|batch|none, got '{std}'")
        self.std, self.eps, self.sources = std, eps, tuple(sources)

    def __call__(self, ctx: TrainContext, batch: Rollouts) -> Rollouts:
        if batch.rewards is None or batch.group_ids is None:
            return batch
        if batch.source not in self.sources:
            return batch.with_(advantages=torch.full_like(batch.rewards.detach(), float("nan")))
        r = batch.rewards.detach().float()
        all_r, all_g = ctx.gather(r), ctx.gather(batch.group_ids.to(r.device))
        adv_all = group_advantages(all_r, all_g, self.std, self.eps)
        n, rank = len(r), ctx.accelerator.process_index
        adv = adv_all[rank * n:(rank + 1) * n] if ctx.num_processes > 1 else adv_all
        return batch.with_(advantages=adv)


class BatchNormalized(BaseEstimator):
    """Whole-batch normalisation ``(r - mean) / (std + eps)`` over all processes."""

    name = "batch"

    def __init__(self, eps: float = 1e-4):
        self.eps = eps

    def __call__(self, ctx: TrainContext, batch: Rollouts) -> Rollouts:
        if batch.rewards is None:
            return batch
        r = batch.rewards.detach().float()
        all_r = ctx.gather(r)
        return batch.with_(advantages=(r - all_r.mean()) / (all_r.std(unbiased=False) + self.eps))


BUILTIN_ESTIMATORS = {c.name: c for c in (NoEstimator, GroupAdvantage, BatchNormalized)}
