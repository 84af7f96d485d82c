"""ReFL: reward backpropagation through the last K sampling steps and the decoder (AlignProp / VADER /
DRaFT-K style), with an anchor to the reference model.

Loss on a batch of K-step-differentiable samples ``x0`` with prompts ``c``:

    L = - reward_scale * mean_i r(decode(x0_i), c_i)
        + kl_weight * mean_i E_{t, eps} || v_theta(x_t, t, c_i) - v_ref(x_t, t, c_i) ||^2,   x_t = a_t sg(x0_i) + s_t eps

The anchor is the denoising-space KL surrogate (the KL between the two models' reverse processes is a
time-weighted integral of this squared native-output difference); ``v_ref`` is the base with the LoRA
adapter disabled (no second copy in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components.base import BaseLoss, Phase, TrainContext
from ..config import MethodConfig, doc_field
from ..errors import TrlVideoError
from ..plugins import MethodSpec
from ..rollouts import Rollouts


@dataclass
class ReFLConfig(MethodConfig):
    """Configuration of the built-in ReFL method."""

    kl_weight: float = doc_field(0.0, "Weight of the anchor to the reference model.", ge=0.0)
    kl_timesteps: int = doc_field(1, "Noise levels t drawn per sample for the anchor.", ge=1)
    reward_scale: float = doc_field(1.0, "Multiplier of the reward term.")


def anchor_mse(ctx: TrainContext, x0: torch.Tensor, embeds: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """Per-sample ``E_{t,eps} ||n_theta(x_t) - n_ref(x_t)||^2`` (mean over elements), x0 detached."""
    sch, policy = ctx.policy.schedule, ctx.policy
    x0 = x0.detach()
    total = torch.zeros(x0.shape[0], device=x0.device)
    for _ in range(draws):
        t = ctx.rand(x0.shape[0]).clamp(0.02, 0.98)
        x_t = sch.add_noise(x0, ctx.randn(*x0.shape), t)
        with ctx.accelerator.autocast():
            n_theta = policy.predict(x_t, t, embeds).float()
            with torch.no_grad(), policy.reference() as ref:
                n_ref = policy.predict(x_t, t, embeds, transformer=ref).float()
        total = total + ((n_theta - n_ref) ** 2).flatten(1).mean(1)
    return total / draws


class ReFLLoss(BaseLoss):
    name = "refl"
    sample_grad = True  # the sampler keeps a graph through its window of steps
    reward_grad = True  # the reward is computed with gradients

    def setup(self, ctx: TrainContext) -> dict:
        if not getattr(ctx.reward, "differentiable", False):
            raise TrlVideoError(f"method 'refl' needs a differentiable reward; '{getattr(ctx.reward, 'name', '?')}' "
                                f"is not (use a GRPO-style method such as fcrm or rsm)")
        self.cfg: ReFLConfig = ctx.method_config
        return {}

    def phases(self, step: int) -> list[Phase]:
        return [Phase("policy")]

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[torch.Tensor, dict[str, float]]:
        assert batch is not None  # the policy phase uses this step's rollouts
        rewards = batch.rewards
        if rewards is None or not rewards.requires_grad:
            raise TrlVideoError("refl: rewards carry no gradient (is the sampler 'window' and the reward differentiable?)")
        loss = -self.cfg.reward_scale * rewards.mean()
        metrics = {"reward_term": float(rewards.detach().mean())}
        if self.cfg.kl_weight > 0:
            assert batch.prompt_embeds is not None
            kl = anchor_mse(ctx, batch.latents, batch.prompt_embeds, self.cfg.kl_timesteps).mean()
            loss = loss + self.cfg.kl_weight * kl
            metrics["kl"] = float(kl.detach())
        return loss, metrics


REFL = MethodSpec(
    name="refl",
    config_cls=ReFLConfig,
    defaults={"sampler": "window", "estimator": "none", "replay": "fresh", "loss": "refl"},
    default_args={"sampler": {"num_steps": 8, "grad_steps": 1}},
    description="Reward backprop through the last K sampling steps and the VAE decoder, with a reference anchor.",
    paper="Xu et al. 2023 (ImageReward/ReFL); Prabhudesai et al. 2024 (VADER); Clark et al. 2024 (DRaFT)",
    citation=("@article{prabhudesai2024vader, title={Video Diffusion Alignment via Reward Gradients}, "
              "author={Prabhudesai, Mihir and Mendonca, Russell and Qin, Zheyang and Fragkiadaki, Katerina "
              "and Pathak, Deepak}, journal={arXiv:2407.08737}, year={2024}}"),
)
