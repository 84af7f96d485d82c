"""DM-Align loss: DMD distillation + DM-PairLoss / DM-GroupLoss alignment in one stage.

Roles (paper Alg. 1): the generator ``G_theta`` is the policy (init = teacher, sampled by the core ``fewstep``
sampler with K steps); the real score model is the frozen teacher (``ctx.policy.reference()``: the base with
the LoRA disabled, or the frozen copy under full fine-tuning); the fake score model is a trainable deep copy
of the teacher returned from :meth:`DMAlignLoss.setup` as the ``fake`` :class:`Trainable`.

One training step = two phases, in Alg. 1's order (generator, then fake):

* ``fake`` x N (=5), after the generator phase: denoising loss of the fake model on ``stopgrad(x)``, where ``x = G(x_{t_k}, t_k)`` is the
  generator's x0 prediction at the step ``t_k`` drawn from the K timesteps (``x_{t_k}`` = the generator's own
  rollout state, DMD2's backward simulation):  ``|| n_fake(x_t, t) - target(x, eps, t) ||^2``.
* ``generator``: ``dmd_weight * L_DMD + align_weight * L_align`` with both terms written as DMD2's
  MSE-to-a-stop-gradient-target surrogate ``0.5 * mean((x - sg(x - g))^2)`` whose gradient w.r.t. ``x`` is
  ``g / numel``; gradient descent moves ``x`` along ``-g``.

  DMD (Eq. 3):  ``g_dmd = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|``, ``x_t = F(x, t)``.
  At one point ``x_t`` the scores and the denoisers are related by ``s_a - s_b = alpha_t / sigma_t^2 (x0_a - x0_b)``,
  so ``g_dmd`` is ``-(s_real - s_fake)`` up to the positive factor ``sigma_t^2 / alpha_t`` and DMD2's per-sample
  normalisation.

  Align (Eq. 6 / 7), x0 form (see the sign trap in the README): with one shared ``(t, eps)`` (common random
  numbers) for ``F(x+, t)`` and ``F(x, t)``, ``d = x0_fake(F(x+, t)) - x0_fake(F(x, t))``;
  ``g_align = -c * d / mean|x - x0_fake(F(x+, t))|``; Pair: ``c = 1`` (x moves towards x+); Group:
  ``c_i = -A_i`` with ``x+bar`` the mean of the group's top-n samples (low-advantage samples move towards x+bar,
  high-advantage ones beyond it; summed over a group this is the GRPO direction ``sum_i A_i x_i``).
  ``align_norm='dmd'`` rescales ``g_align`` to the batch norm of ``g_dmd``. The align term acts on the full
  K-step output ``x_final`` (what the reward scored): through the sampler's graph when the sampler kept one
  (``sampler_args.grad: true``), else through the last generator step recomputed from its detached state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from trl_video.components.base import Phase, Trainable, TrainContext
from trl_video.components.samplers import predict
from trl_video.errors import TrlVideoError
from trl_video.methods.dmd import (
    EPS,
    build_fake_score,
    dmd_direction,
    fake_denoising_loss,
    make_fake_trainable,
    per_sample_mean_abs,
    real_x0,
    rescale_to,
    surrogate,
)
from trl_video.rollouts import Rollouts

from .config import DMAlignConfig

# the DMD pieces (direction, surrogate, rescaling, fake model, real score) live in trl_video.methods.dmd
__all__ = ["EPS", "DMAlignLoss", "align_direction", "dmd_direction", "group_coefficients", "rescale_to",
           "surrogate", "top_n_mean"]


# ----------------------------------------------------------------------------------------------- pure maths
def align_direction(x: Tensor, x0_pos: Tensor, x0_gen: Tensor, coef: Tensor | float = 1.0,
                    normalize: bool = True) -> Tensor:
    """Align latent gradient ``g = -c (x0_pos - x0_gen) / mean|x - x0_pos|``: descent moves ``x`` by ``+c`` times
    the fake model's denoised difference, i.e. towards the preferred sample for ``c > 0``."""
    d = (x0_pos - x0_gen).float()
    if normalize:
        d = d / per_sample_mean_abs(x.float() - x0_pos.float()).clamp_min(EPS)
    c = torch.as_tensor(coef, dtype=d.dtype, device=d.device)
    if c.ndim == 1:
        c = c.view(-1, *([1] * (d.ndim - 1)))
    return torch.nan_to_num(-c * d)


def top_n_mean(latents: Tensor, rewards: Tensor, group_ids: Tensor, n: int) -> Tensor:
    """For every sample, the mean of the ``n`` highest-reward latents of its group (``x+bar``), detached."""
    out = torch.empty_like(latents)
    for g in torch.unique(group_ids):
        sel = (group_ids == g).nonzero().flatten()
        k = min(n, len(sel))
        top = sel[torch.topk(rewards[sel].float(), k).indices]
        out[sel] = latents[top].mean(0, keepdim=True).to(out.dtype)
    return out.detach()


def group_coefficients(advantages: Tensor, sign: str = "paper") -> Tensor:
    """Per-sample coefficient ``c_i`` of the align direction: ``-A_i`` ('paper') or ``+A_i`` ('flipped')."""
    a = torch.nan_to_num(advantages.detach().float(), nan=0.0)
    return -a if sign == "paper" else a


# ----------------------------------------------------------------------------------------------- the loss
class DMAlignLoss:
    """Phases ``[generator (sampling graph), fake x N (no graph)]``; trains the ``fake`` Trainable it creates."""

    name = "dmalign"
    sample_grad = True  # the sampler's graph reaches the generator phase (align term through x_final)
    reward_grad = False  # rewards only rank samples / give advantages

    def __init__(self) -> None:
        self.cfg: DMAlignConfig | None = None
        self.fake: torch.nn.Module | None = None
        self._pair_index: dict[str, list[int]] | None = None
        self.generator_calls = 0
        self.fake_calls = 0

    @staticmethod
    def uses_advantages(cfg: DMAlignConfig) -> bool:
        """Only the Group alignment reads advantages (validation: group estimator with group_size 1)."""
        return cfg.align == "group" and cfg.align_weight > 0

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        cfg = ctx.method_config if isinstance(ctx.method_config, DMAlignConfig) else DMAlignConfig()
        self.cfg = cfg
        if cfg.align == "pair" and cfg.align_weight > 0:
            if ctx.offline is None:
                raise TrlVideoError("dmalign: align 'pair' needs preferred latents: set offline_latents in the recipe "
                                    "(an offline-latents dataset, e.g. from `trl-video encode --videos ...`)")
            self._pair_index = {}
            for i, p in enumerate(ctx.offline.ds["prompt"]):
                self._pair_index.setdefault(str(p), []).append(i)
        if cfg.align == "group" and cfg.align_weight > 0 and ctx.config.group_size < 2:
            raise TrlVideoError("dmalign: align 'group' needs group_size >= 2 (samples per prompt to rank)")
        self.sample_grad = cfg.align != "none" and cfg.align_weight > 0
        self.fake = build_fake(ctx, cfg)
        return {"fake": Trainable(self.fake, lr=cfg.fake_lr)}

    @staticmethod
    def planned_trainables(config: Any, method_config: Any, transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """For ``trl-video plan`` (called on the meta device): the fake score, a copy of the teacher transformer,
        fully trainable or frozen with its own LoRA, as :func:`build_fake` makes it."""
        cfg = method_config if isinstance(method_config, DMAlignConfig) else DMAlignConfig()
        fake = type(transformer).from_config(transformer.config)
        make_fake_trainable(fake, cfg.fake_lora_rank, config.lora_target_modules)
        return {"fake": fake}

    def phases(self, step: int) -> list[Phase]:
        # Alg. 1 order: the generator step (l. 6-15) uses the fake model as it was BEFORE seeing this batch; then
        # the fake takes its N steps on stopgrad(x) (l. 16-21). The reverse order lets the fake fit the very
        # samples the DMD gradient is taken on (x0_fake ~ x), which turns DMD into score distillation sampling.
        n = self.cfg.fake_updates if self.cfg is not None else 5
        return [Phase("generator", groups=("policy",)), Phase("fake", groups=("fake",), repeats=n, uses_graph=False)]

    # ------------------------------------------------------------------ helpers
    def step_index(self, ctx: TrainContext, num_steps: int) -> int:
        """k in [0, K): the same for both phases of a step and on every rank (seeded by seed and step)."""
        if self.cfg.dmd_step == "last":
            return num_steps - 1
        g = torch.Generator().manual_seed(int(ctx.config.seed) * 7907 + int(ctx.step) + 1)
        return int(torch.randint(num_steps, (1,), generator=g))

    def _noise_level(self, ctx: TrainContext, n: int) -> Tensor:
        return self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * ctx.rand(n)

    @staticmethod
    def _check_batch(batch: Rollouts) -> int:
        if batch.trajectory is None or batch.timesteps is None:
            raise TrlVideoError("dmalign needs the sampler's trajectory and timesteps: use sampler 'fewstep' "
                                "(the K-step generator) with record_trajectory true")
        k = len(batch.timesteps) - 1
        if batch.trajectory.shape[1] != k + 1:
            raise TrlVideoError(f"dmalign: trajectory has {batch.trajectory.shape[1]} states for a {k}-step grid; "
                                f"use sampler 'fewstep'")
        return k

    @staticmethod
    def _x_key(batch: Rollouts, k: int) -> tuple[str, int, int]:
        return ("dmalign_x", k, batch.trajectory.data_ptr())  # a detached copy shares the storage

    def generator_x0(self, ctx: TrainContext, batch: Rollouts, k: int) -> Tensor:
        """``G(x_{t_k}, t_k)``: the generator's x0 prediction from its own (detached) rollout state at step k."""
        x_t = batch.trajectory[:, k].detach()
        t = batch.timesteps[k].expand(x_t.shape[0])
        return predict(ctx, ctx.policy.transformer, x_t, t, batch.prompt_embeds)[1]

    def real_x0(self, ctx: TrainContext, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        return real_x0(ctx, x_t, t, emb, self.cfg.real_guidance_scale)

    def fake_x0(self, ctx: TrainContext, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        with torch.no_grad():
            return predict(ctx, self.fake, x_t, t, emb)[1]

    # ------------------------------------------------------------------ compute
    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        if phase.name == "fake":
            return self.fake_loss(ctx, batch)
        if phase.name == "generator":
            return self.generator_loss(ctx, batch)
        raise TrlVideoError(f"dmalign: unknown phase '{phase.name}'")

    def fake_loss(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        """Denoising loss of the fake model on stopgrad generator samples (Eq. 4 / Alg. 1 lines 17-20)."""
        self.fake_calls += 1
        K = self._check_batch(batch)
        k = self.step_index(ctx, K)
        if self.cfg.fake_data == "final":
            x = batch.latents.detach()
        else:  # stopgrad(x) of this step's generator phase (Alg. 1 l. 18), i.e. before the generator update
            key = self._x_key(batch, k)
            if key not in ctx.state:
                with torch.no_grad():
                    ctx.state[key] = self.generator_x0(ctx, batch, k).detach()
            x = ctx.state[key]
        t = self._noise_level(ctx, x.shape[0])
        loss = fake_denoising_loss(ctx, self.fake, x, batch.prompt_embeds, t,
                                   "native" if self.cfg.fake_loss == "native" else "x0")
        return loss, {"denoise": float(loss.detach()), "k": float(k)}

    def generator_loss(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        self.generator_calls += 1
        cfg, sch = self.cfg, ctx.policy.schedule
        K = self._check_batch(batch)
        k = self.step_index(ctx, K)
        emb = batch.prompt_embeds
        n = len(batch)
        metrics: dict[str, float] = {"k": float(k), "t_k": float(batch.timesteps[k])}

        # ---- DMD (Eq. 3) at the generator's x0 prediction from step k
        x = self.generator_x0(ctx, batch, k)
        ctx.state[self._x_key(batch, k)] = x.detach()  # what the fake phase trains on after this update
        t = self._noise_level(ctx, n)
        x_t = sch.add_noise(x.detach(), ctx.randn(*x.shape), t)
        x0_real = self.real_x0(ctx, x_t, t, emb)
        x0_fake = self.fake_x0(ctx, x_t, t, emb)
        g_dmd = dmd_direction(x.detach(), x0_real, x0_fake, cfg.normalize)
        loss_dmd = surrogate(x, g_dmd)
        loss = cfg.dmd_weight * loss_dmd
        metrics.update(dmd=float(loss_dmd.detach()), dmd_grad_rms=float(g_dmd.pow(2).mean().sqrt()),
                       real_fake_gap=float((x0_real - x0_fake).pow(2).mean()))

        # ---- alignment (Eq. 6 / 7, x0 form) on the full K-step output
        if cfg.align != "none" and cfg.align_weight > 0:
            if batch.latents.requires_grad:
                x_fin = batch.latents  # the sampler's graph through the whole K-step rollout
            elif k == K - 1:
                x_fin = x
            else:
                x_fin = self.generator_x0(ctx, batch, K - 1)
            x_pos, coef, extra = self.align_targets(ctx, batch)
            metrics.update(extra)
            t2 = self._noise_level(ctx, n)
            eps2 = ctx.randn(*x_fin.shape)  # common random numbers for F(x+, t) and F(x, t)
            y = torch.cat([sch.add_noise(x_pos, eps2, t2), sch.add_noise(x_fin.detach(), eps2, t2)])
            x0_both = self.fake_x0(ctx, y, torch.cat([t2, t2]), torch.cat([emb, emb]))
            x0_pos, x0_gen = x0_both[:n], x0_both[n:]
            g_al = align_direction(x_fin.detach(), x0_pos, x0_gen, coef, cfg.normalize)
            factor = 1.0
            if cfg.align_norm == "dmd" and cfg.dmd_weight > 0:
                g_al, factor = rescale_to(g_al, g_dmd)
            loss_al = surrogate(x_fin, g_al)
            loss = loss + cfg.align_weight * loss_al
            metrics.update(align=float(loss_al.detach()), align_scale=factor,
                           dist_to_target=float((x_fin.detach() - x_pos).pow(2).mean()))
        return loss, metrics

    def align_targets(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(x+ per sample, coefficient c per sample, metrics)."""
        n = len(batch)
        if self.cfg.align == "pair":
            x_pos, matched = self.preferred_latents(ctx, batch.prompts)
            return x_pos, torch.ones(n, device=x_pos.device), {"pair_matched": matched}
        if batch.advantages is None or batch.group_ids is None or batch.rewards is None:
            raise TrlVideoError("dmalign: align 'group' needs rewards, group ids and advantages (estimator 'group')")
        lat = batch.latents.detach()
        all_lat, all_r, all_g = ctx.gather(lat), ctx.gather(batch.rewards.detach()), ctx.gather(batch.group_ids)
        xbar = top_n_mean(all_lat, all_r, all_g, self.cfg.top_n)
        if ctx.num_processes > 1:
            rank = ctx.accelerator.process_index
            xbar = xbar[rank * n:(rank + 1) * n]
        coef = group_coefficients(batch.advantages, self.cfg.group_sign)
        return xbar, coef, {"adv_abs": float(coef.abs().mean())}

    def preferred_latents(self, ctx: TrainContext, prompts: list[str]) -> tuple[Tensor, float]:
        """x+ for each prompt: a preferred latent with the same caption when there is one (else random)."""
        off = ctx.offline
        idx: list[int | None] = [None] * len(prompts)
        if self.cfg.pair_match == "prompt" and self._pair_index:
            for i, p in enumerate(prompts):
                rows = self._pair_index.get(p)
                if rows:
                    idx[i] = rows[int(torch.randint(len(rows), (1,), generator=ctx.generator))]
        missing = [i for i, j in enumerate(idx) if j is None]
        out = torch.empty(len(prompts), *ctx.policy.latent_shape, device=ctx.device)
        have = [i for i, j in enumerate(idx) if j is not None]
        if have:
            rows = off.ds[[idx[i] for i in have]]["latents"]
            out[have] = torch.as_tensor(rows).float().to(ctx.device)
        if missing:
            out[missing] = off.next_batch(ctx, len(missing)).latents.float().to(ctx.device)
        return out, len(have) / max(len(prompts), 1)

    # ------------------------------------------------------------------ checkpoint state (none beyond modules)
    def state_dict(self) -> dict[str, Any]:
        return {"generator_calls": self.generator_calls, "fake_calls": self.fake_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator_calls = int(state.get("generator_calls", 0))
        self.fake_calls = int(state.get("fake_calls", 0))


def build_fake(ctx: TrainContext, cfg: DMAlignConfig) -> torch.nn.Module:
    """The fake score model (:func:`trl_video.methods.dmd.build_fake_score`), with its own LoRA when
    ``fake_lora_rank > 0``."""
    return build_fake_score(ctx, cfg.fake_lora_rank)
