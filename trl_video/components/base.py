"""Interfaces of the five hook points and the context every component receives.

A component is any object with the methods below (duck typing; subclassing is optional).

* Sampler:   ``sample(ctx, prompts, embeds, group_ids) -> Rollouts``
* Reward:    ``__call__(inputs, prompts) -> Tensor[B]`` with attributes ``space`` ("pixel"|"latent") and
             ``differentiable`` (bool); the trainer decodes latents only for pixel rewards.
* Replay:    ``update(ctx, fresh) -> None``; ``sample(ctx, fresh) -> Rollouts`` (what the loss sees);
             ``state_dict()`` / ``load_state_dict()`` (saved in checkpoints).
* Estimator: ``__call__(ctx, batch) -> Rollouts`` (writes ``advantages``; gathers across processes).
* Loss:      ``setup(ctx) -> dict[str, Trainable]`` (auxiliary modules it trains, besides "policy");
             ``phases(step) -> list[Phase]`` (which optimiser groups step, how often, in what order);
             ``compute(ctx, phase, batch) -> (loss, metrics)``; optional ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import VideoRewardConfig
    from ..models.policy import VideoPolicy


@dataclass
class Trainable:
    """An auxiliary module a loss trains with its own optimiser / LR schedule (e.g. b_phi, a fake score
    model, a reward-model ensemble). ``lr``/``weight_decay``/``betas`` default to the trainer config."""

    module: nn.Module
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    max_grad_norm: float | None = None
    ema_decay: float | None = None  # keep an EMA copy of this module's trainable parameters


@dataclass
class Phase:
    """One optimisation phase of a training step.

    ``groups``: optimiser groups whose parameters this phase's loss updates ("policy" or a Trainable's name).
    ``repeats``: how many optimiser steps the phase takes this step (DMD's 5 fake-score updates).
    ``needs_rollouts``: whether ``compute`` uses this step's batch (phases can bring their own data).
    ``uses_graph``: whether this phase backpropagates through the batch's sampling graph (``sample_grad``
    losses). The graph is handed to the first phase that uses it; other phases get the detached batch.
    """

    name: str
    groups: tuple[str, ...] = ("policy",)
    repeats: int = 1
    needs_rollouts: bool = True
    uses_graph: bool = True


@runtime_checkable
class RewardFn(Protocol):
    space: str
    differentiable: bool

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor: ...


@dataclass
class TrainContext:
    """What components see: the policy, config, accelerator, the reward, RNG and shared state."""

    policy: VideoPolicy
    config: VideoRewardConfig
    accelerator: Any
    reward: Any
    method_config: Any
    generator: torch.Generator  # per-rank generator for sampling noise (seeded from config.seed + rank)
    step: int = 0
    modules: dict[str, nn.Module] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)
    offline: Any = None  # an OfflineLatents stream when the recipe names offline latents
    registry: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by components within a step

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def gather(self, t: Tensor) -> Tensor:
        """All-gather along dim 0 across processes (no-op for one process)."""
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.contiguous())

    def score(self, latents: Tensor, prompts: list[str], reward: Any = None, grad: bool = False) -> Tensor:
        """Reward of latents: decodes to pixels only when the reward is a pixel reward."""
        reward = reward or self.reward
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            inputs = self.policy.decode(latents) if reward.space == "pixel" else latents
            r = reward(inputs, prompts)
        from ..errors import TrlVideoError

        name = getattr(reward, "name", type(reward).__name__)
        if not torch.isfinite(r).all():
            bad = list(range(len(prompts))) if r.ndim == 0 else (~torch.isfinite(r)).flatten().nonzero().flatten().tolist()
            raise TrlVideoError(f"reward '{name}' returned NaN/inf for samples {bad[:8]} "
                                f"(prompts: {[prompts[i] for i in bad if i < len(prompts)][:3]})")
        if tuple(r.shape) != (len(prompts),):
            raise TrlVideoError(f"reward '{name}' returned shape {tuple(r.shape)}; expected one value per sample "
                                f"({len(prompts)},)")
        return r.float()


def unwrap(module: Any) -> Any:
    return getattr(module, "module", module)
