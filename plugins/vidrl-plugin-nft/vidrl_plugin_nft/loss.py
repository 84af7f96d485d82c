"""The DiffusionNFT loss (Zheng et al. 2025, arXiv 2509.16117), on clean samples and the forward process only.

The paper's text is not among the project's seeds, so lines cite its named definitions rather than equation
numbers (they follow the arXiv text and the authors' public training script). Notation: x0 a clean sample of the old policy, its reward turned into an optimality probability
r in [0, 1]; x_t = alpha_t x0 + sigma_t eps the forward process; v_old the old policy's prediction, v_theta the
trained one. The implicit positive and negative policies (the paper's implicit parameterisation)

    v+ = (1 - beta) v_old + beta v_theta,        v- = (1 + beta) v_old - beta v_theta

are both regressed onto the forward-process target, the positive one on the sample's "good" share r and the
negative one on the "bad" share 1 - r (the paper's NFT objective):

    L = E[ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ] / beta.

The x0 prediction is affine in the velocity at fixed (x_t, t) (flow: x0 = x_t - t v; VP v-prediction:
x0 = alpha x_t - sigma v), so the same mixtures hold for x0 predictions; the loss is written on x0 with the
paper's adaptive loss weighting (each sample's squared error divided by its detached mean absolute error),
as its code does. At theta = old the gradient is (2r - 1) times the plain diffusion (flow-matching) loss's
gradient on the sample (tests/test_nft_loss.py checks this closed form): good samples are pulled in, bad ones
pushed away, with no likelihood and no sampler in the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trl_video import sampling
from trl_video.components.base import BaseLoss, Phase, TrainContext
from trl_video.components.samplers import behaviour_policy
from trl_video.errors import TrlVideoError
from trl_video.rollouts import Rollouts

from .config import NFTConfig

#: smallest adaptive weight (the paper's code clips the mean absolute error there)
MIN_WEIGHT = 1e-5


def optimality_probability(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clip(clip(A, -c, c) / (2c) + 1/2, 0, 1): 1 for the best samples of a group, 0 for the worst."""
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def nft_objective(x0: Tensor, x0_theta: Tensor, x0_old: Tensor, r: Tensor, beta: float,
                  adaptive_weighting: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample DiffusionNFT loss ``[B]`` from clean samples ``x0``, the trained and the old policy's x0
    predictions at the same noisy input, and the optimality probabilities ``r`` (implicit policies + NFT objective)."""
    x0_old = x0_old.detach()
    x0_pos = beta * x0_theta + (1.0 - beta) * x0_old  # implicit positive policy
    x0_neg = (1.0 + beta) * x0_old - beta * x0_theta  # implicit negative policy
    err_pos, err_neg = (x0_pos - x0).pow(2), (x0_neg - x0).pow(2)
    if adaptive_weighting:  # adaptive loss weighting: self-normalised, weights carry no gradient
        with torch.no_grad():
            w_pos = _per_sample_mean((x0_pos - x0).abs().double()).clamp_min(MIN_WEIGHT).to(x0.dtype)
            w_neg = _per_sample_mean((x0_neg - x0).abs().double()).clamp_min(MIN_WEIGHT).to(x0.dtype)
    else:
        w_pos = w_neg = torch.ones(len(x0), dtype=x0.dtype, device=x0.device)
    loss_pos = _per_sample_mean(err_pos) / w_pos
    loss_neg = _per_sample_mean(err_neg) / w_neg
    loss = (r * loss_pos + (1.0 - r) * loss_neg) / beta  # the NFT objective
    return loss, {"positive": loss_pos.detach(), "negative": loss_neg.detach()}


def training_timesteps(grid: Tensor, timestep_fraction: float, per_step: int | None, batch: int,
                       rand: Callable[..., Tensor]) -> Tensor:
    """``[B, m]`` grid times per sample: a random order of the first ``int(S * fraction)`` points of the
    ``S``-step grid (1 -> 0), cut to ``per_step`` (the paper shuffles them per sample and uses all)."""
    steps = len(grid) - 1
    k = max(1, int(steps * timestep_fraction))
    m = k if per_step is None else min(per_step, k)
    order = torch.argsort(rand(batch, k), dim=1)[:, :m]
    return grid[:k].to(order.device)[order]


class NFTLoss(BaseLoss):
    """DiffusionNFT: forward-process training on clean samples of the old policy; see the module docstring."""

    name = "nft"
    sample_grad = False  # the samples are data: no graph through the sampler, any (black-box) solver works
    reward_grad = False

    def setup(self, ctx: TrainContext) -> dict[str, Any]:
        cfg = ctx.method_config if isinstance(ctx.method_config, NFTConfig) else NFTConfig()
        self.cfg = cfg
        return {}

    def ema_schedule(self, group: str) -> Callable[[int], float] | None:
        # the policy's EMA is DiffusionNFT's old policy: it samples the rollouts and gives v_old
        if group != "policy":
            return None
        return getattr(self, "cfg", NFTConfig()).old_decay

    def phases(self, step: int) -> list[Phase]:
        return [Phase("policy")]

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        if batch is None or batch.advantages is None or batch.timesteps is None:
            raise TrlVideoError("loss 'nft' needs rollouts with advantages and the sampler's timesteps "
                                "(estimator: group; a grid sampler)")
        x0 = batch.latents.detach().float()
        emb = batch.prompt_embeds
        keep = ~torch.isnan(batch.advantages)  # samples without a group advantage (e.g. offline) are skipped
        r = optimality_probability(batch.advantages.float().nan_to_num(0.0), cfg.adv_clip_max)
        times = training_timesteps(batch.timesteps.float(), cfg.timestep_fraction, cfg.timesteps_per_step,
                                   len(x0), ctx.rand)
        autocast = ctx.accelerator.autocast
        m = times.shape[1]
        noisy = [ctx.policy.schedule.add_noise(x0, ctx.randn(*x0.shape), times[:, j]) for j in range(m)]
        # the no-grad targets first, each network swapped in once for every timestep: the old policy (the EMA's
        # weights copied into the parameters) and, for the KL, the reference
        with torch.no_grad():
            with behaviour_policy(ctx, "ema") as old_net:
                x0_old = [sampling.predict(ctx.policy, x_t, times[:, j], emb, net=old_net, autocast=autocast)[1]
                          for j, x_t in enumerate(noisy)]
            v_ref: list[Tensor] = []
            if cfg.kl_weight > 0:
                with behaviour_policy(ctx, "reference") as ref_net:
                    v_ref = [sampling.predict(ctx.policy, x_t, times[:, j], emb, net=ref_net, autocast=autocast)[0]
                             for j, x_t in enumerate(noisy)]
        total = torch.zeros((), device=x0.device)
        policy_sum, kl_sum = 0.0, 0.0
        for j, x_t in enumerate(noisy):
            v_theta, x0_theta, _ = sampling.predict(ctx.policy, x_t, times[:, j], emb, autocast=autocast)
            per_sample, _ = nft_objective(x0, x0_theta, x0_old[j], r, cfg.beta, cfg.adaptive_weighting)
            policy_loss = (per_sample * keep).sum() / keep.sum().clamp_min(1) * cfg.adv_clip_max
            loss = policy_loss
            if v_ref:
                kl = _per_sample_mean((v_theta - v_ref[j]).pow(2)).mean()
                loss = loss + cfg.kl_weight * kl
                kl_sum += float(kl.detach())
            total = total + loss / m
            policy_sum += float(policy_loss.detach())
        return total, {"policy_loss": policy_sum / m, "kl": kl_sum / m,
                       "r_mean": float(r[keep].mean()) if keep.any() else 0.0, "train_timesteps": float(m)}
