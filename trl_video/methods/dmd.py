"""Distribution Matching Distillation (DMD / DMD2), shared by every method that distils with it
(DM-Align, Reward-Forcing's reward + DMD ablation).

Pieces (Yin et al., DMD2, NeurIPS 2024, Eq. 2-3 and their released ``distribution_matching_loss``):

* :func:`dmd_direction`: the latent gradient ``g = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|`` at
  ``x_t = F(x, t)``. At one point ``x_t`` scores and denoisers are related by
  ``s_a - s_b = alpha_t / sigma_t^2 (x0_a - x0_b)``, so ``g`` is ``-(s_real - s_fake)`` up to a positive factor
  and DMD2's per-sample normalisation.
* :func:`surrogate`: ``0.5 * mean((x - sg(x - g))^2)``, whose gradient w.r.t. ``x`` is ``g / numel``.
* :func:`rescale_to`: scale one latent gradient to another's norm (to put two objectives on one scale).
* :func:`build_fake_score`: the fake score model, a trainable copy of the teacher.
* :func:`real_x0` / :func:`fake_denoising_loss`: the frozen teacher's (optionally CFG) denoiser and the fake
  model's denoising loss on stop-gradient generator samples (DMD2 Eq. 4).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin  # the real class (diffusers' top level types a stub)
from torch import Tensor, nn

from ..components.base import TrainContext
from ..components.samplers import predict
from ..config import lora_config_for
from ..models.policy import add_lora_adapter

EPS = 1e-8


def per_sample_mean_abs(x: Tensor) -> Tensor:
    """``mean |x|`` over every dimension but the first, shaped to broadcast against ``x``."""
    return x.abs().flatten(1).mean(1).view(-1, *([1] * (x.ndim - 1)))


def dmd_direction(x: Tensor, x0_real: Tensor, x0_fake: Tensor, normalize: bool = True) -> Tensor:
    """DMD2's latent gradient ``g`` (descent moves ``x`` along ``-g``, towards the real denoiser):
    ``(x0_fake - x0_real) / mean|x - x0_real|`` per sample."""
    g = (x0_fake - x0_real).float()
    if normalize:
        g = g / per_sample_mean_abs(x.float() - x0_real.float()).clamp_min(EPS)
    return torch.nan_to_num(g)


def rescale_to(g: Tensor, ref: Tensor) -> tuple[Tensor, float]:
    """Scale ``g`` so that its (batch) Frobenius norm equals ``ref``'s; returns (scaled, factor)."""
    n_g, n_r = g.norm(), ref.norm()
    if n_g <= EPS or n_r <= EPS:
        return g, 1.0
    f = (n_r / n_g).detach()
    return g * f, float(f)


def surrogate(x: Tensor, g: Tensor) -> Tensor:
    """DMD2's surrogate ``0.5 * mean((x - sg(x - g))^2)``: d/dx = g / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g.detach().float()))


def build_fake_score(ctx: TrainContext, lora_rank: int = 0, prepare: Callable[[nn.Module], Any] | None = None,
                     teacher: nn.Module | None = None) -> nn.Module:
    """The fake score model: a deep copy of the teacher (default: the policy's reference, i.e. the base transformer
    without the generator's LoRA), fully trainable, or frozen with its own LoRA when ``lora_rank > 0``.
    ``prepare`` may adapt the copy (e.g. switch a causal generator's copy to full attention)."""
    with torch.no_grad(), (contextlib.nullcontext(teacher) if teacher is not None else ctx.policy.reference()) as ref:
        fake = copy.deepcopy(ref)
    if isinstance(fake, PeftAdapterMixin) and getattr(fake, "peft_config", None):
        fake.unload_lora()  # drop the generator's adapter layers: the copy is the bare teacher
    if prepare is not None:
        prepare(fake)
    fake.train()
    make_fake_trainable(fake, lora_rank, ctx.config.lora_target_modules)
    if ctx.config.gradient_checkpointing and isinstance(fake, ModelMixin):
        fake.enable_gradient_checkpointing()
    return fake


def make_fake_trainable(fake: nn.Module, lora_rank: int, lora_target_modules: list[str]) -> None:
    """Fully trainable (``lora_rank == 0``), or frozen with its own LoRA adapter of that rank (alpha = rank) on the
    recipe's ``lora_target_modules``, built like the policy's (``trl.get_peft_config``)."""
    if lora_rank > 0:
        add_lora_adapter(fake, lora_config_for(lora_rank, list(lora_target_modules)))
    else:
        fake.requires_grad_(True)


def real_x0(ctx: TrainContext, x_t: Tensor, t: Tensor, emb: Tensor, guidance_scale: float = 1.0,
            mode: Callable[[Any], Any] | None = None, teacher: nn.Module | None = None) -> Tensor:
    """The frozen teacher's x0 prediction at ``x_t`` (classifier-free guidance when ``guidance_scale != 1``; CFG
    on the native output is CFG on x0, affine in it at a fixed ``x_t``). ``teacher``: the real score network
    (default: the policy's reference); ``mode(net)``: an optional context manager it runs under (e.g. full
    attention for a causal copy)."""
    src = contextlib.nullcontext(teacher) if teacher is not None else ctx.policy.reference()
    with torch.no_grad(), src as ref, (mode or _null)(ref):
        if guidance_scale == 1.0:
            return predict(ctx, ref, x_t, t, emb)[1]
        with ctx.accelerator.autocast():
            native = ctx.policy.predict_guided(x_t, t, emb, guidance_scale, transformer=ref).float()
        return ctx.policy.schedule.to_x0(native, x_t, t)


def fake_denoising_loss(ctx: TrainContext, fake: nn.Module, x: Tensor, emb: Tensor, t: Tensor,
                        target: str = "native") -> Tensor:
    """Denoising loss of the fake model on stop-gradient generator samples ``x`` at levels ``t`` (DMD2 Eq. 4):
    ``|| n_fake(x_t, t) - target(x, eps, t) ||^2`` on the native output, or on x0 (``target='x0'``)."""
    sch = ctx.policy.schedule
    x = x.detach()
    eps = ctx.randn(*x.shape)
    x_t = sch.add_noise(x, eps, t)
    native, x0_hat, _ = predict(ctx, fake, x_t, t, emb)
    if target == "native":
        return F.mse_loss(native, sch.target(x, eps, t).float())
    return F.mse_loss(x0_hat, x.float())


@contextlib.contextmanager
def _null(_: Any):
    yield
