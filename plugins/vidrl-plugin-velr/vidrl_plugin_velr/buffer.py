"""VELR's variance-organised replay buffer for online LRM alignment (paper Sec. 4.3, App. C.2).

Each item is ``(latents, prompt, true pixel reward, ensemble variance at insertion)``. Inserting a batch
evicts the lowest-variance items so the buffer keeps the samples the ensemble is most uncertain about;
alignment minibatches are drawn with probability proportional to the variance. Items live on the CPU
(full-size latents are MBs each) and move to the device per minibatch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

ADMIT = ("always", "top")


class VarianceReplayBuffer:
    """``admit="always"`` (default, App. C.2: "we replace the samples with the smallest variance using
    those from the current batch"): every new sample enters and evicts the lowest-variance OLD items;
    ``admit="top"`` keeps the ``capacity`` highest-variance items of old + new (Sec. 4.3's wording)."""

    def __init__(self, capacity: int = 256, admit: str = "always", floor: float = 1e-12):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if admit not in ADMIT:
            raise ValueError(f"buffer admit must be one of {ADMIT}, got '{admit}'")
        self.capacity, self.admit, self.floor = capacity, admit, floor
        self.latents: Tensor | None = None
        self.prompts: list[str] = []
        self.rewards = torch.zeros(0)
        self.variances = torch.zeros(0)

    def __len__(self) -> int:
        return len(self.prompts)

    def insert(self, latents: Tensor, prompts: list[str], rewards: Tensor, variances: Tensor) -> None:
        latents = latents.detach().float().cpu()
        rewards, variances = rewards.detach().float().cpu().flatten(), variances.detach().float().cpu().flatten()
        if not (len(latents) == len(prompts) == len(rewards) == len(variances)):
            raise ValueError("buffer.insert: latents, prompts, rewards and variances differ in length")
        n_old = len(self)
        if self.latents is None:
            lat, pr, rw, va = latents, list(prompts), rewards, variances
        else:
            lat = torch.cat([self.latents, latents])
            pr, rw, va = self.prompts + list(prompts), torch.cat([self.rewards, rewards]), torch.cat([self.variances,
                                                                                                        variances])
        excess = len(pr) - self.capacity
        if excess > 0:
            if self.admit == "top" or excess > n_old:
                # keep the highest-variance items overall (or, with a batch larger than the buffer, of the new)
                pool = torch.arange(len(pr)) if self.admit == "top" else torch.arange(n_old, len(pr))
                keep = pool[torch.argsort(va[pool], descending=True, stable=True)[:self.capacity]]
            else:
                drop = torch.argsort(va[:n_old], stable=True)[:excess]  # lowest-variance old items
                mask = torch.ones(len(pr), dtype=torch.bool)
                mask[drop] = False
                keep = mask.nonzero().flatten()
            keep = keep.sort().values
            lat, rw, va = lat[keep], rw[keep], va[keep]
            pr = [pr[i] for i in keep.tolist()]
        self.latents, self.prompts, self.rewards, self.variances = lat, pr, rw, va

    def probabilities(self) -> Tensor:
        """Sampling probabilities ``p_i = sigma_i^2 / sum_j sigma_j^2`` (a floor keeps p > 0)."""
        v = self.variances.clamp_min(self.floor)
        return v / v.sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` indices drawn with replacement, proportionally to the variance."""
        if len(self) == 0:
            raise ValueError("buffer is empty")
        return torch.multinomial(self.probabilities(), n, replacement=True, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {"latents": self.latents if self.latents is not None else torch.zeros(0), "prompts": list(self.prompts),
                "rewards": self.rewards, "variances": self.variances, "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts = list(state["prompts"])
        self.latents = state["latents"] if self.prompts else None
        self.rewards, self.variances = state["rewards"].float(), state["variances"].float()
