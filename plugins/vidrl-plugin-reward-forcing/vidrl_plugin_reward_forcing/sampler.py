"""``self_rollout`` sampler (hook point ``sampler``): the causal generator rolled out chunk by chunk on its own
previous chunks, exactly as at inference (:func:`~.rollout.self_rollout`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from trl_video.components.base import TrainContext
from trl_video.components.samplers import GridSampler, behaviour_policy
from trl_video.evaluation import EvalSampler
from trl_video.rollouts import Rollouts
from trl_video.sampling import sample_batched

from .errors import RewardForcingError
from .model import is_causal
from .rollout import GRAD_MODES, self_rollout, student_timesteps


class SelfRolloutSampler(GridSampler):
    """K-step chunk-wise self-rollout with a KV cache.

    Args:
        num_steps: denoising steps per chunk K (Self-Forcing / Reward-Forcing: 4).
        timesteps: explicit K levels (t in (0, 1], 1 = noise); default: the schedule's shifted K-step grid.
        grad: where the graph is kept: ``"last"`` (last denoising step of the last chunk: enough for a
            last-frame reward), ``"all"`` (last step of every chunk: needed for random-frame rewards or DMD),
            ``"none"``.
        num_frames: latent frames to generate (default: the policy's training length).
        max_context: latent frames of KV-cache context (default: all).
        behaviour: ``current`` or ``ema`` (the trainer's EMA weights).
    """

    name = "self_rollout"
    #: evaluation re-noises item ``seed``'s chunks from ``torch.Generator().manual_seed(seed + RENOISE_SEED)``
    RENOISE_SEED = 7_919

    def __init__(self, num_steps: int = 4, timesteps: list[float] | None = None, grad: str = "last",
                 num_frames: int | None = None, max_context: int | None = None, behaviour: str = "current"):
        super().__init__(len(timesteps) if timesteps else num_steps, behaviour, record_trajectory=False)
        if grad not in GRAD_MODES:
            raise RewardForcingError(f"sampler_args.grad must be one of {GRAD_MODES}, got '{grad}'")
        if timesteps is not None and not all(0.0 < float(t) <= 1.0 for t in timesteps):
            raise RewardForcingError(f"sampler_args.timesteps must lie in (0, 1], got {timesteps}")
        self.timesteps = [float(t) for t in timesteps] if timesteps else None
        self.grad, self.num_frames, self.max_context = grad, num_frames, max_context

    def step_times(self, ctx: TrainContext) -> list[float]:
        return self.timesteps or student_timesteps(ctx.policy.schedule, self.num_steps)

    def initial_noise(self, ctx: TrainContext, n: int) -> Tensor:
        c, f, h, w = ctx.policy.latent_shape
        return ctx.randn(n, c, self.num_frames or f, h, w)

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        if not is_causal(ctx.policy.transformer):
            raise RewardForcingError("sampler 'self_rollout' needs the causal generator: use method "
                                     "'reward-forcing' (it makes the loaded Wan model causal) or a saved causal model")
        ts = self.step_times(ctx)
        noise = self.initial_noise(ctx, len(prompts))
        with behaviour_policy(ctx, self.behaviour) as net:
            res = self_rollout(net, ctx.policy.schedule, embeds, noise, ts, randn=lambda s: ctx.randn(*s),
                               grad=self.grad, max_context=self.max_context, autocast=ctx.accelerator.autocast)
        grid = torch.tensor([*ts, 0.0], device=ctx.device)
        return Rollouts(latents=res.latents, prompts=list(prompts), prompt_embeds=embeds, group_ids=group_ids,
                        timesteps=grid, noise=noise, source="ema" if self.behaviour == "ema" else "online",
                        extras={"chunk_size": torch.tensor(net.config.chunk_size)})

    def evaluation_sampler(self) -> EvalSampler:
        """Evaluation samples the causal generator the way it is used: the same self-rollout (K steps per chunk,
        KV cache), without gradients; the initial noise of a (prompt, seed) pair comes from its seed and its
        re-noising from ``seed + RENOISE_SEED``, so a pair gets the same video in any batch."""

        def sample(policy: Any, prompts: list[str], seeds: list[int], transformer: Any = None) -> Tensor:
            net = transformer if transformer is not None else policy.transformer
            if not is_causal(net):
                raise RewardForcingError("evaluation with sampler 'self_rollout' needs the causal generator; "
                                         "the model to sample is bidirectional")
            ts = self.timesteps or student_timesteps(policy.schedule, self.num_steps)

            def rollout(noise: Tensor, embeds: Tensor, batch_seeds: list[int]) -> Tensor:
                gens = [torch.Generator().manual_seed(int(s) + self.RENOISE_SEED) for s in batch_seeds]

                def renoise(shape: tuple[int, ...]) -> Tensor:
                    return torch.stack([torch.randn(*shape[1:], generator=g) for g in gens]).to(noise.device)

                return self_rollout(net, policy.schedule, embeds, noise, ts, randn=renoise,
                                    max_context=self.max_context).latents

            was_training = net.training
            net.eval()
            try:
                return sample_batched(policy, prompts, seeds, rollout)
            finally:
                net.train(was_training)

        return sample
