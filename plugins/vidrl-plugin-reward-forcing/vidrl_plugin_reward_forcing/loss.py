"""Reward-Forcing loss: stage 1 ODE regression, stage 2 reward on the self-rolled-out video (+ optional DMD).

Stage 1 (phase ``ode``, steps ``< ode_steps``; brings its own data: the teacher ODE-trajectory dataset):
    ``L_ode = mean || G_phi({x_{t^i}^i}, {t^i}) - {x_0^i} ||^2``                   (CausVid Eq. 5 / Self-Forcing)
    where chunk ``i`` of a teacher trajectory enters at its own level ``t^i`` drawn uniformly from the student's K
    levels, all chunks in one block-causal forward (chunk i sees chunks <= i), and ``G_phi`` = the x0 prediction.

Stage 2 (phase ``generator``; the ``self_rollout`` sampler's graph):
    ``L_R = - E_z [ R(x_hat_T) ]``                                                 (Reward-Forcing Eq. in Sec. 3.2)
    with ``x_hat_T`` the LAST decoded frame of the self-rolled-out video (``frames='last'``) or one random decoded
    frame per sample (``frames='random'``, the Sec. 5.2 ablation).
    Option ``dmd_weight > 0`` (Sec. 5.1 ablation): ``L = w_R L_R + w_D c L_DMD`` with the DMD2 surrogate
    ``L_DMD = 0.5 mean (x - sg(x - g_dmd))^2`` on the whole generated latent video ``x`` (real score = the frozen
    teacher with full attention: ``method_args.teacher`` or the run's starting model, fake score = its trainable copy, updated ``fake_updates`` times per step in
    phase ``fake``) and ``c = ||dL_R/dx|| / ||dL_DMD/dx||`` (detached): both terms push ``x`` with gradients of
    the same norm ("we normalize the losses so that they are on the same scale", App. B.2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from trl_video.components.base import Phase, Trainable, TrainContext
from trl_video.components.samplers import predict
from trl_video.methods.dmd import build_fake_score, dmd_direction, fake_denoising_loss, real_x0, surrogate
from trl_video.rollouts import Rollouts

from .config import RewardForcingConfig
from .errors import RewardForcingError
from .model import bidirectional, is_causal
from .ode import ODETrajectories

EPS = 1e-12


# ----------------------------------------------------------------------------------------------- pure pieces
def chunk_levels(k_index: Tensor, chunk_size: int, num_frames: int) -> Tensor:
    """Per-chunk level indices ``[B, n_chunks]`` -> per-frame ``[B, F]``."""
    return k_index.repeat_interleave(chunk_size, dim=1)[:, :num_frames]


def ode_regression(model: nn.Module, schedule: Any, states: Tensor, x0: Tensor, levels: list[float], emb: Tensor,
                   k_index: Tensor, autocast: Any = None) -> Tensor:
    """``mean || G({x_{t^i}^i}, {t^i}) - x0 ||^2``: states ``[B, K, C, F, H, W]``; ``k_index`` ``[B, n_chunks]``."""
    b, _, _, f = states.shape[:4]
    cs = model.config.chunk_size
    frame_k = chunk_levels(k_index, cs, f)  # [B, F]
    x_in = torch.gather(states, 1, frame_k.view(b, 1, 1, f, 1, 1).expand(b, 1, *states.shape[2:])).squeeze(1)
    lv = torch.tensor(levels, device=states.device)
    t_frames = lv[frame_k]  # [B, F]
    ts = schedule.model_timestep(t_frames).to(x_in.dtype)
    with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
        native = model(x_in, ts, emb.to(x_in.dtype), return_dict=False)[0].float()
    x0_hat = torch.cat([schedule.to_x0(native[:, :, i:i + cs], x_in[:, :, i:i + cs], t_frames[:, i])
                        for i in range(0, f, cs)], dim=2)
    return F.mse_loss(x0_hat, x0.float())


def select_frames(pixels: Tensor, mode: str, generator: torch.Generator | None = None, n: int = 1) -> Tensor:
    """The decoded frames the reward scores: ``[B, 3, n, H, W]`` (last frame, or ``n`` random frames per sample)."""
    if mode == "last":
        return pixels[:, :, -1:]
    b, _, f = pixels.shape[:3]
    idx = torch.randint(f, (b, n), generator=generator).to(pixels.device)
    return torch.stack([pixels[i, :, idx[i]] for i in range(b)])


# ----------------------------------------------------------------------------------------------- the loss
class RewardForcingLoss:
    """Phases: ``[ode]`` for ``step < ode_steps``, then ``[generator]`` (+ ``[fake x N]`` with the DMD option)."""

    name = "reward-forcing"
    sample_grad = True  # the reward flows back through the self-rollout's kept steps
    reward_grad = False  # the loss scores its own frame selection; the trainer's reward is logged only

    def __init__(self) -> None:
        self.cfg = RewardForcingConfig()
        self.ode: ODETrajectories | None = None
        self.fake: nn.Module | None = None
        self.real: nn.Module | None = None  # the DMD real score when method_args.teacher names one

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        cfg = ctx.method_config if isinstance(ctx.method_config, RewardForcingConfig) else RewardForcingConfig()
        self.cfg = cfg
        if not is_causal(ctx.policy.transformer):
            raise RewardForcingError("reward-forcing: the policy is not the causal generator (method 'reward-forcing' "
                                     "converts a Wan model when it loads; was another method's model passed in?)")
        if cfg.ode_steps > 0:
            if not cfg.ode_dataset:
                raise RewardForcingError("reward-forcing: method_args.ode_steps > 0 needs method_args.ode_dataset "
                                         "(build it with `trl-video bench reward_forcing.build-ode`)")
            self.ode = ODETrajectories(cfg.ode_dataset, ctx.policy.latent_shape, seed=ctx.config.seed)
        reward_stage = cfg.ode_steps < ctx.config.max_steps
        if reward_stage and cfg.reward_weight > 0 and not getattr(ctx.reward, "differentiable", False):
            raise RewardForcingError(f"reward-forcing: the reward stage needs a differentiable reward; "
                                     f"'{getattr(ctx.reward, 'name', '?')}' is not")
        if reward_stage and getattr(ctx.reward, "space", "pixel") != "pixel":
            raise RewardForcingError("reward-forcing: the reward scores decoded frames: use a pixel reward")
        grad = ctx.config.sampler_args.get("grad", "last")
        if reward_stage and (cfg.frames == "random" or cfg.dmd_weight > 0) and grad != "all":
            raise RewardForcingError(f"reward-forcing: frames='random' and the DMD term need the graph of every chunk: "
                                     f"set sampler_args.grad: all (got '{grad}')")
        if cfg.dmd_weight > 0:
            if cfg.teacher:
                from trl_video.models.policy import load_policy

                self.real = load_policy(cfg.teacher).transformer.to(ctx.device).requires_grad_(False).eval()
            self.fake = build_fake_score(ctx, prepare=_full_attention, teacher=self.real)
            return {"fake": Trainable(self.fake, lr=cfg.fake_lr)}
        return {}

    def phases(self, step: int) -> list[Phase]:
        if step < self.cfg.ode_steps:
            return [Phase("ode", needs_rollouts=False)]
        phases = [Phase("generator")]
        if self.cfg.dmd_weight > 0:
            phases.append(Phase("fake", groups=("fake",), repeats=self.cfg.fake_updates, uses_graph=False))
        return phases

    # ------------------------------------------------------------------ compute
    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[Tensor, dict[str, float]]:
        if phase.name == "ode":
            return self.ode_loss(ctx)
        if batch is None:
            raise RewardForcingError(f"reward-forcing: phase '{phase.name}' needs rollouts")
        if phase.name == "generator":
            return self.generator_loss(ctx, batch)
        if phase.name == "fake":
            return self.fake_loss(ctx, batch)
        raise RewardForcingError(f"reward-forcing: unknown phase '{phase.name}'")

    def ode_loss(self, ctx: TrainContext) -> tuple[Tensor, dict[str, float]]:
        assert self.ode is not None
        rows = self.ode.next_batch(self.cfg.ode_batch_size or ctx.config.per_process_batch)
        states, x0 = rows["states"].float().to(ctx.device), rows["x0"].float().to(ctx.device)
        emb, _ = ctx.policy.encode_prompts(list(rows["prompt"]))
        model = ctx.policy.transformer
        levels = self.ode.timesteps
        n_chunks = -(-states.shape[3] // model.config.chunk_size)
        k_index = (ctx.rand(states.shape[0], n_chunks) * len(levels)).long().clamp_max(len(levels) - 1)
        loss = ode_regression(model, ctx.policy.schedule, states, x0, levels, emb, k_index, ctx.accelerator.autocast)
        return loss, {"regression": float(loss.detach())}

    def generator_loss(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = batch.latents
        if not x.requires_grad:
            raise RewardForcingError("reward-forcing: the rollout carries no gradient (sampler 'self_rollout' with "
                                     "grad 'last' or 'all')")
        pixels = ctx.policy.decode(x)
        frames = select_frames(pixels, cfg.frames, ctx.generator, cfg.num_random_frames)
        r = ctx.reward(frames, batch.prompts)
        loss_r = -r.float().mean()
        metrics = {"frame_reward": float(r.detach().mean())}
        loss = cfg.reward_weight * loss_r
        if cfg.dmd_weight > 0:
            loss_dmd, scale, met = self._dmd(ctx, batch, x, loss_r)
            loss = loss + cfg.dmd_weight * scale * loss_dmd
            metrics.update(met)
        return loss, metrics

    def _dmd(self, ctx: TrainContext, batch: Rollouts, x: Tensor, loss_r: Tensor) -> tuple[Tensor, float, dict]:
        cfg, sch = self.cfg, ctx.policy.schedule
        emb = batch.prompt_embeds
        t = cfg.dmd_t_min + (cfg.dmd_t_max - cfg.dmd_t_min) * ctx.rand(x.shape[0])
        x_t = sch.add_noise(x.detach(), ctx.randn(*x.shape), t)
        x0_real = real_x0(ctx, x_t, t, emb, cfg.real_guidance_scale, mode=bidirectional, teacher=self.real)
        with torch.no_grad():
            x0_fake = predict(ctx, self.fake, x_t, t, emb)[1]
        g = dmd_direction(x.detach(), x0_real, x0_fake)
        loss_dmd = surrogate(x, g)
        # same scale: the DMD term's gradient on x gets the norm of the reward term's (both w.r.t. the video)
        (g_r,) = torch.autograd.grad(loss_r, x, retain_graph=True)
        g_d_norm = float(g.norm()) / x.numel()  # ||d L_DMD / dx|| = ||g|| / numel
        scale = float(g_r.norm()) / g_d_norm if g_d_norm > EPS else 1.0
        return loss_dmd, scale, {"dmd": float(loss_dmd.detach()), "dmd_scale": scale,
                                 "reward_grad_norm": float(g_r.norm())}

    def fake_loss(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = batch.latents.detach()
        t = cfg.dmd_t_min + (cfg.dmd_t_max - cfg.dmd_t_min) * ctx.rand(x.shape[0])
        loss = fake_denoising_loss(ctx, self.fake, x, batch.prompt_embeds, t)
        return loss, {"denoise": float(loss.detach())}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"ode": self.ode.state_dict()} if self.ode is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ode is not None and "ode" in state:
            self.ode.load_state_dict(state["ode"])


def _full_attention(model: nn.Module) -> None:
    """The fake score model is a bidirectional score (like the real one): switch the causal copy's mask off."""
    if hasattr(model, "use_causal_mask"):
        model.use_causal_mask = False
