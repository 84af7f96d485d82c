"""VELR loss: truncated mid-step ReFL on an ensemble latent reward model, with online LRM alignment.

Policy phase (every step), on samples ``z0`` from the ``velr_window`` sampler (no grad down to a random
``t_mid``, K grad steps, one-shot x0 prediction; no VAE decode, no pixel reward in the backward pass):

    L_policy = - reward_scale * mean_i Agg_n R_n(z0_i, c_i)
               + beta * mean_i mean_elem || n_theta(x_last_i, t_last, c_i) - n_init(x_last_i, t_last, c_i) ||^2

(paper Eq. 8; the KL between the two models' reverse transitions at ``x_last`` is, up to a per-t constant,
this squared difference of native outputs; ``n_init`` is the frozen initial model = LoRA disabled;
``x_last`` is the detached input of the sampler's last grad evaluation).

Buffer phase (every ``true_reward_every`` steps, after the policy backward so the decode never coexists
with the sampling graph): decode without grad, score the TRUE pixel reward, and insert
``(z0, c, r_true, Var_n R_n)`` into the variance-organised buffer.

LRM phase (after every ``align_every`` steps, ``needs_rollouts=False``): ``align_rounds`` rounds of Huber
regression (Eq. 6) of every member on its own minibatch drawn from the buffer with ``p ∝ variance``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from trl_video.components.base import Phase, Trainable, TrainContext
from trl_video.errors import TrlVideoError
from trl_video.rollouts import Rollouts

from .buffer import VarianceReplayBuffer
from .config import VELRConfig
from .lrm import LRMReward, aggregate, huber_loss, member_variance


class VELRLoss:
    name = "velr"
    sample_grad = True  # the sampler keeps the graph of its K-step window

    def __init__(self) -> None:
        self.reward_grad = False  # set in setup: True when the recipe's reward is the LRM itself
        self.buffer: VarianceReplayBuffer | None = None
        self.lrm: LRMReward | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        cfg: VELRConfig = ctx.method_config
        self.cfg = cfg
        if isinstance(ctx.reward, LRMReward):
            self.mode = "reward"  # `reward: lrm`: the trainer scores the LRM with grad
            self.lrm = ctx.reward
            self.reward_grad = True
            self.true_reward = None
            if cfg.pixel_reward:
                self.true_reward = ctx.build_reward(cfg.pixel_reward, dict(cfg.pixel_reward_args))
            elif cfg.online_alignment or cfg.true_reward_every:
                raise TrlVideoError("velr: with `reward: lrm` set method_args.pixel_reward (the true pixel "
                                    "reward, e.g. alignment) or turn off online_alignment and true_reward_every")
        else:
            self.mode = "internal"  # the recipe's reward is the true reward; the LRM is built here
            args = dict(cfg.lrm_args)
            self.lrm = LRMReward(path=cfg.lrm_path, **args)
            self.reward_grad = False  # the trainer scores the true reward without grad
            self.true_reward = (ctx.build_reward(cfg.pixel_reward, dict(cfg.pixel_reward_args))
                                if cfg.pixel_reward else ctx.reward)
        if cfg.aggregation:
            self.lrm.aggregation = cfg.aggregation
        self.lrm.attach_text_encoder(ctx.policy.encode_prompts)
        emb, _ = ctx.policy.encode_prompts([""])
        pretrained = self.lrm.ensemble is not None
        self.lrm.ensure_built(ctx.policy.latent_shape, int(emb.shape[-1]))
        if not pretrained:
            warnings.warn("velr: the LRM has random weights (no path); pretrain it with `trl-video bench "
                          "velr-pretrain` and pass reward_args {path: ...}", stacklevel=2)
        assert self.lrm.ensemble is not None
        self.lrm.ensemble.to(ctx.device)
        self.buffer = VarianceReplayBuffer(cfg.buffer_size, cfg.buffer_admit)
        self.gen = torch.Generator().manual_seed(ctx.config.seed * 7 + 3 + ctx.accelerator.process_index)
        self.per_step = ctx.config.per_process_batch * ctx.config.gradient_accumulation_steps
        if not cfg.online_alignment:
            return {}
        return {"lrm": Trainable(self.lrm.ensemble, lr=cfg.align_lr, weight_decay=0.0,
                                 max_grad_norm=cfg.align_max_grad_norm)}

    # ------------------------------------------------------------------ phases
    def buffer_len_before(self, step: int) -> int:
        """Buffer size at the start of ``step``: each buffer phase inserts ``per_step`` samples up to the
        capacity (both admission rules keep ``min(capacity, old + new)``), so it is known from the step alone;
        this keeps ``phases(step)`` a pure function the trainer can query ahead to size the LR schedules."""
        every = self.cfg.true_reward_every
        inserts = -(-step // every) if every and self.cfg.online_alignment else 0  # steps s < step with s % every == 0
        return min(self.cfg.buffer_size, inserts * self.per_step)

    def align_steps(self, step: int | None = None) -> int:
        cfg = self.cfg
        if cfg.align_steps_per_round:
            per_round = cfg.align_steps_per_round
        else:
            held = len(self.buffer or []) if step is None else self.buffer_len_before(step)
            n = min(cfg.buffer_size, held + self.per_step)
            per_round = max(1, math.ceil(n / cfg.align_batch_size))
        return cfg.align_rounds * per_round

    def phases(self, step: int) -> list[Phase]:
        cfg = self.cfg
        out = [Phase("policy", groups=("policy",))]
        if cfg.true_reward_every and step % cfg.true_reward_every == 0:
            out.append(Phase("buffer", groups=(), uses_graph=False))
        if cfg.online_alignment and (step + 1) % cfg.align_every == 0:
            out.append(Phase("lrm", groups=("lrm",), repeats=self.align_steps(step), needs_rollouts=False,
                             uses_graph=False))
        return out

    # ------------------------------------------------------------------ compute
    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[torch.Tensor, dict[str, float]]:
        if phase.name == "policy":
            assert batch is not None
            return self._policy(ctx, batch)
        if phase.name == "buffer":
            assert batch is not None
            return self._buffer(ctx, batch)
        if phase.name == "lrm":
            return self._align(ctx)
        raise TrlVideoError(f"velr: unknown phase '{phase.name}'")

    def _policy(self, ctx: TrainContext, batch: Rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.lrm is not None
        if not batch.latents.requires_grad:
            raise TrlVideoError("velr: the samples carry no gradient (use the velr_window / window sampler)")
        if self.mode == "reward" and batch.rewards is not None and batch.rewards.requires_grad:
            r, var = batch.rewards, None  # the trainer already scored the LRM with grad
        else:
            r, var, _ = self.lrm.predict(batch.latents, batch.prompts)
        loss = -self.cfg.reward_scale * r.mean()
        metrics = {"lrm_reward": float(r.detach().mean())}
        if var is not None:
            metrics["lrm_variance"] = float(var.mean())
        if batch.t_mid is not None:
            metrics["t_mid"] = float(batch.t_mid.float().mean())
        if self.cfg.kl_weight > 0:
            kl = self.kl(ctx, batch)
            loss = loss + self.cfg.kl_weight * kl
            metrics["kl"] = float(kl.detach())
        return loss, metrics

    def kl(self, ctx: TrainContext, batch: Rollouts) -> torch.Tensor:
        """``mean || n_theta - n_init ||^2`` at the last grad step (or ReFL's re-noised anchor)."""
        emb = batch.prompt_embeds
        if self.cfg.kl_at == "last_step" and batch.x_last is not None and batch.t_last is not None:
            x, t = batch.x_last.detach(), batch.t_last
            with ctx.accelerator.autocast():
                n_theta = ctx.policy.predict(x, t, emb).float()
                with torch.no_grad(), ctx.policy.reference() as ref:
                    n_ref = ctx.policy.predict(x, t, emb, transformer=ref).float()
            return ((n_theta - n_ref) ** 2).flatten(1).mean(1).mean()
        if self.cfg.kl_at == "last_step" and not getattr(self, "_warned_kl", False):
            warnings.warn("velr: the sampler records no x_last (use sampler velr_window); the KL falls back to "
                          "the re-noised x0 anchor", stacklevel=2)
            self._warned_kl = True
        from trl_video.methods.refl import anchor_mse

        return anchor_mse(ctx, batch.latents, emb).mean()

    @torch.no_grad()
    def _buffer(self, ctx: TrainContext, batch: Rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.lrm is not None and self.buffer is not None
        lat = batch.latents.detach()
        preds = self.lrm.member_predictions(lat, batch.prompts)
        r_l, var = aggregate(preds, self.lrm.aggregation), member_variance(preds)
        if self.mode == "internal" and self.true_reward is ctx.reward and batch.rewards is not None:
            r_true = batch.rewards.detach().float()  # the trainer already scored it (no grad)
        else:
            k = self.cfg.true_reward_batch or len(lat)  # decode without grad, a few samples at a time
            r_true = torch.cat([ctx.score(lat[i:i + k], batch.prompts[i:i + k], reward=self.true_reward)
                                for i in range(0, len(lat), k)])
        if self.cfg.online_alignment:
            self.buffer.insert(lat, batch.prompts, r_true, var)
        gap = r_l - r_true
        metrics = {"true_reward": float(r_true.mean()), "lrm_reward": float(r_l.mean()),
                   "abs_gap": float(gap.abs().mean()), "gap": float(gap.mean()), "variance": float(var.mean()),
                   "buffer_size": float(len(self.buffer))}
        if len(self.buffer):
            metrics["buffer_variance"] = float(self.buffer.variances.mean())
        return torch.zeros((), device=lat.device), metrics

    def _align(self, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.lrm is not None and self.lrm.ensemble is not None and self.buffer is not None
        buf, n_mem, bs = self.buffer, len(self.lrm.ensemble), self.cfg.align_batch_size
        if len(buf) == 0 or buf.latents is None:
            return torch.zeros((), device=ctx.device), {}
        idx = buf.sample(n_mem * bs, self.gen).view(n_mem, bs)
        total = torch.zeros((), device=ctx.device)
        mse = 0.0
        for i in range(n_mem):  # each member regresses on its own variance-weighted minibatch
            rows = idx[i]
            z = buf.latents[rows].to(ctx.device)
            target = buf.rewards[rows].to(ctx.device)
            pred = self.lrm.member_predictions(z, [buf.prompts[j] for j in rows.tolist()], members=[i])[0]
            total = total + huber_loss(pred, target, self.cfg.huber_delta)
            mse += float(((pred.detach() - target) ** 2).mean())
        return total, {"huber": float(total.detach()) / n_mem, "mse": mse / n_mem}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gen": self.gen.get_state()}
        if self.buffer is not None:
            out["buffer"] = self.buffer.state_dict()
        if self.lrm is not None and self.lrm.ensemble is not None:
            out["lrm"] = {k: v.detach().cpu() for k, v in self.lrm.ensemble.state_dict().items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "gen" in state:
            self.gen.set_state(state["gen"])
        if "buffer" in state and self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
        if "lrm" in state and self.lrm is not None and self.lrm.ensemble is not None:
            self.lrm.ensemble.load_state_dict(state["lrm"])
