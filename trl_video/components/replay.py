"""Replay components (hook point ``replay``): decide what the loss sees this step.

* ``fresh``: this step's rollouts (on-policy).
* ``fifo``: a FIFO buffer of detached samples (reward stored at insertion, uniform sampling, optional
  advantage filter); saved in checkpoints.
* ``offline``: batches from the offline-latents dataset (no rollouts needed: ``needs_rollouts = False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import TrlVideoError
from ..rollouts import Rollouts
from .base import BaseReplay, TrainContext


class FreshReplay(BaseReplay):
    name = "fresh"
    needs_rollouts = True

    def sample(self, ctx: TrainContext, fresh: Rollouts | None) -> Rollouts:
        assert fresh is not None
        return fresh


class FIFOReplay(FreshReplay):
    """FIFO buffer. ``filter``: keep all | positive | negative advantages at insertion.
    ``batch_size``: samples per step (default: the fresh batch size). ``mix_fresh``: also return the
    fresh batch concatenated with the replayed one."""

    name = "fifo"

    def __init__(self, capacity: int = 20000, filter: str = "all", batch_size: int | None = None,
                 mix_fresh: bool = False, warmup: int = 0):
        if filter not in ("all", "positive", "negative"):
            raise TrlVideoError(f"replay_args.filter must be all|positive|negative, got '{filter}'")
        self.capacity, self.filter, self.batch_size = capacity, filter, batch_size
        self.mix_fresh, self.warmup = mix_fresh, warmup
        self.latents: Tensor | None = None
        self.rewards: Tensor | None = None
        self.advantages: Tensor | None = None
        self.prompts: list[str] = []
        self.inserted = 0

    def __len__(self) -> int:
        return 0 if self.latents is None else self.latents.shape[0]

    def update(self, ctx: TrainContext, fresh: Rollouts) -> None:
        b = fresh.detach().to("cpu")
        keep = torch.ones(len(b), dtype=torch.bool)
        if self.filter != "all":
            if b.advantages is None:
                raise TrlVideoError(f"replay filter '{self.filter}' needs advantages: use estimator 'group'")
            keep = b.advantages > 0 if self.filter == "positive" else b.advantages < 0
        idx = keep.nonzero().flatten()
        if len(idx) == 0:
            return
        b = b.select(idx)
        adv = b.advantages if b.advantages is not None else torch.zeros(len(b))
        rew = b.rewards if b.rewards is not None else torch.zeros(len(b))
        if self.latents is None:
            self.latents, self.rewards, self.advantages = b.latents, rew.float(), adv.float()
        else:
            self.latents = torch.cat([self.latents, b.latents])[-self.capacity:]
            self.rewards = torch.cat([self.rewards, rew.float()])[-self.capacity:]  # type: ignore[list-item]
            self.advantages = torch.cat([self.advantages, adv.float()])[-self.capacity:]  # type: ignore[list-item]
        self.prompts = (self.prompts + list(b.prompts))[-self.capacity:]
        self.inserted += len(b)

    def sample(self, ctx: TrainContext, fresh: Rollouts | None) -> Rollouts:
        n = self.batch_size or (len(fresh) if fresh is not None else 1)
        if len(self) < max(self.warmup, 1):
            if fresh is None:
                raise TrlVideoError("replay buffer is empty and there are no fresh rollouts")
            return fresh
        assert self.rewards is not None and self.advantages is not None
        idx = torch.randint(len(self), (n,), generator=ctx.generator)
        lat = self.latents[idx].to(ctx.device)  # type: ignore[index]
        prompts = [self.prompts[i] for i in idx.tolist()]
        emb, _ = ctx.policy.encode_prompts(prompts)
        out = Rollouts(latents=lat, prompts=prompts, prompt_embeds=emb, rewards=self.rewards[idx].to(ctx.device),
                       advantages=self.advantages[idx].to(ctx.device), source="replay")
        if self.mix_fresh and fresh is not None:
            out = Rollouts.cat([fresh.detach().with_(trajectory=None, log_probs=None, noise=None, group_ids=None,
                                                      extras={}), out])
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.latents is None:
            return {"inserted": self.inserted}
        return {"latents": self.latents, "rewards": self.rewards, "advantages": self.advantages,
                "prompts": list(self.prompts), "inserted": self.inserted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inserted = int(state.get("inserted", 0))
        if "latents" in state:
            self.latents, self.rewards, self.advantages = state["latents"], state["rewards"], state["advantages"]
            self.prompts = list(state["prompts"])


class OfflineReplay(FreshReplay):
    """Offline latents stream as the behaviour distribution (pure-offline training needs no rollouts)."""

    name = "offline"
    needs_rollouts = False

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size

    def sample(self, ctx: TrainContext, fresh: Rollouts | None) -> Rollouts:
        if ctx.offline is None:
            raise TrlVideoError("replay 'offline' needs offline latents: set offline_latents in the recipe")
        n = self.batch_size or ctx.config.per_process_batch
        return ctx.offline.next_batch(ctx, n)

    def state_dict(self) -> dict[str, Any]:
        return {}


BUILTIN_REPLAYS = {c.name: c for c in (FreshReplay, FIFOReplay, OfflineReplay)}
