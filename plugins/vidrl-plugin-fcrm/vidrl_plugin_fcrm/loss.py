"""FCRM loss: one-step GFlowNet residual matching in the space of the forward denoising loss.

For a clean sample ``x0`` with condition ``c`` (a rollout, a replayed sample or an offline latent):

    L_theta(x0; c) = 1/N_mc sum_j w(t_j) mean_elements( n_theta(x_t_j, t_j, c) - target(x0, eps_j, t_j) )^2
    x_t_j = alpha(t_j) x0 + sigma(t_j) eps_j           (the schedule's affine path; native output + target,
                                                        so Wan flow velocity and CogVideoX v both work)
    L_ref  : the same with the frozen reference (LoRA disabled) at the SAME (t_j, eps_j)  (common random numbers)
    g      = b_phi(c) - beta * signal(x0, c) + (L_ref - L_theta) / gamma                    (Eq. 4)

``signal`` is the detached group-normalised advantage (default) or the raw reward. The squared residual
E[g^2] is estimated without bias by two independent noising batches A and B (Eq. 7):

    loss = mean_i  sg(g_A,i) g_B,i + sg(g_B,i) g_A,i        (gradient = g_A grad g_B + g_B grad g_A)

``estimator: naive`` uses g_A^2 (biased upward by Var(g_hat), Prop. 1) as an ablation.

Offline branch (App. D.2): offline latents get no group advantage; their reward is normalised with EMA
source statistics ``sigma = sqrt(max(m - mu^2, sigma_min^2))`` (signed, or non-negative
``clip(z + a0, 0, A_max)``), their log-normaliser is a scalar ``b_offline`` (or ``sg(b_phi(c))``), and the
hybrid objective is ``L_online + lambda_offline * L_offline`` with as many offline as online samples.
Pure-offline training is replay ``offline`` (no rollouts at all). Few-step generators (App. D.3): t is
drawn only from the generator's K timesteps, with the same CRN reuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from trl_video.components.base import Phase, Trainable, TrainContext
from trl_video.errors import TrlVideoError
from trl_video.rollouts import Rollouts

from .config import FCRMConfig

Predict = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t [N,...], t [N], embeds [N,L,D]) -> native [N,...]


# ------------------------------------------------------------------------------------------------ pure pieces
def loss_weight(schedule: Any, t: Tensor, weighting: str = "uniform", snr_max: float = 5.0) -> Tensor:
    """w(t) per entry of ``t``: 1 (uniform) or min(alpha^2 / sigma^2, snr_max)."""
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    a, s = schedule.alpha(t).float(), schedule.sigma(t).float()
    return (a**2 / s.clamp_min(1e-8) ** 2).clamp(max=snr_max)


def denoising_losses(predict_theta: Predict, predict_ref: Predict, schedule: Any, x0: Tensor, embeds: Tensor,
                     t: Tensor, eps: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Monte Carlo forward denoising losses of policy and reference with common random numbers.

    ``x0`` [B, ...]; ``t`` [M, B] and ``eps`` [M, B, ...] are M draws per sample (all batches and MC draws
    at once); ``weight`` [M, B] = w(t). Both networks see the SAME noisy inputs ``x_t``. Returns
    ``(L_theta, L_ref)`` of shape [M, B]: per draw, mean over latent elements of w (n - target)^2.
    The reference is evaluated without gradient.
    """
    m, b = t.shape
    x0r = x0.detach().unsqueeze(0).expand(m, *x0.shape).reshape(m * b, *x0.shape[1:])
    tf, ef = t.reshape(m * b), eps.reshape(m * b, *x0.shape[1:])
    x_t = schedule.add_noise(x0r, ef, tf)
    target = schedule.target(x0r, ef, tf)
    emb = embeds.unsqueeze(0).expand(m, *embeds.shape).reshape(m * b, *embeds.shape[1:])
    n_theta = predict_theta(x_t, tf, emb).float()
    with torch.no_grad():
        n_ref = predict_ref(x_t, tf, emb).float()
    l_theta = ((n_theta - target) ** 2).flatten(1).mean(1).view(m, b)
    l_ref = ((n_ref - target) ** 2).flatten(1).mean(1).view(m, b)
    if weight is not None:
        l_theta, l_ref = weight * l_theta, weight * l_ref
    return l_theta, l_ref


def residual(b: Tensor, signal: Tensor, l_ref: Tensor, l_theta: Tensor, beta: float, gamma: float) -> Tensor:
    """g = b - beta * signal + (L_ref - L_theta) / gamma  (Eq. 4; ``signal`` is detached here)."""
    return b - beta * signal.detach() + (l_ref - l_theta) / gamma


def double_sampling(g_a: Tensor, g_b: Tensor) -> Tensor:
    """Per-sample surrogate sg(g_A) g_B + sg(g_B) g_A: its gradient g_A grad g_B + g_B grad g_A is an unbiased
    estimate of grad g^2 when A and B are independent unbiased estimates of g (its value, 2 g_A g_B, is an
    unbiased estimate of 2 g^2)."""
    return g_a.detach() * g_b + g_b.detach() * g_a


def naive_square(g: Tensor) -> Tensor:
    """The biased single-estimate g_hat^2 (E = g^2 + Var(g_hat)); ablation only."""
    return g**2


class LogNormalizer(nn.Module):
    """b_phi(c): MLP (SiLU, hidden 256) on the masked mean-pooled frozen prompt embedding; the last linear
    layer is zero-initialised so b_phi = 0 at step 0 (App. D.1)."""

    def __init__(self, in_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(max(0, layers)):
            mods += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.out = nn.Linear(d, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.body = nn.Sequential(*mods)

    @staticmethod
    def pool(embeds: Tensor, mask: Tensor | None) -> Tensor:
        if embeds.ndim == 2:
            return embeds
        if mask is None:
            return embeds.mean(1)
        m = mask.to(embeds.dtype).unsqueeze(-1)
        return (embeds * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, embeds: Tensor, mask: Tensor | None = None) -> Tensor:
        pooled = self.pool(embeds.float(), mask)
        return self.out(self.body(pooled)).squeeze(-1)


class ScalarNormalizer(nn.Module):
    """A source-level scalar log-normaliser b_offline (zero-initialised)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, n: int) -> Tensor:
        return self.b.expand(n)


class EMARewardNormalizer:
    """Source-level reward statistics with EMA mean / second moment (App. D.2):
    ``mu <- d mu + (1-d) mean(r)``, ``m <- d m + (1-d) mean(r^2)`` (the first batch initialises them),
    ``sigma = sqrt(max(m - mu^2, sigma_min^2))``."""

    def __init__(self, decay: float = 0.9, sigma_min: float = 1e-3):
        self.decay, self.sigma_min = decay, sigma_min
        self.mu, self.m, self.count = 0.0, 0.0, 0

    def update(self, r: Tensor) -> None:
        r = r.detach().double()
        bm, bm2 = float(r.mean()), float((r**2).mean())
        if self.count == 0:
            self.mu, self.m = bm, bm2
        else:
            self.mu = self.decay * self.mu + (1 - self.decay) * bm
            self.m = self.decay * self.m + (1 - self.decay) * bm2
        self.count += 1

    @property
    def sigma(self) -> float:
        return math.sqrt(max(self.m - self.mu**2, self.sigma_min**2))

    def advantage(self, r: Tensor, kind: str = "signed", eps: float = 1e-4, a0: float = 1.0,
                  a_max: float = 3.0) -> Tensor:
        z = (r.detach().float() - self.mu) / (self.sigma + eps)
        if kind == "nonnegative":
            return (z + a0).clamp(0.0, a_max)
        return z

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "m": self.m, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mu, self.m, self.count = float(state["mu"]), float(state["m"]), int(state["count"])


def fewstep_timesteps(ctx: TrainContext) -> list[float]:
    """The K timesteps of the recipe's sampler (``fewstep``: its ``step_times``)."""
    times = getattr(ctx.sampler, "step_times", None)
    if not times:
        name = getattr(ctx.sampler, "name", type(ctx.sampler).__name__)
        raise TrlVideoError(f"method_args.timestep_dist 'sampler' needs a few-step sampler with fixed timesteps "
                            f"(`fewstep`); the recipe's sampler is '{name}'. Set method_args.timestep_set instead.")
    return [float(t) for t in times]


# ------------------------------------------------------------------------------------------------ the loss
class FCRMLoss:
    """FCRM residual-matching loss (hook point ``loss``, name ``fcrm``)."""

    name = "fcrm"
    sample_grad = False  # any black-box sampler: samples are detached terminal points
    reward_grad = False

    def __init__(self) -> None:
        self.cfg: FCRMConfig | None = None
        self.t_set: Tensor | None = None
        self.offline_norm = EMARewardNormalizer()
        self.groups: tuple[str, ...] = ("policy", "b_phi")

    # -------------------------------------------------------------- setup / phases
    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        cfg = ctx.method_config
        if not isinstance(cfg, FCRMConfig):
            cfg = FCRMConfig(**(vars(cfg) if cfg is not None else {}))
        self.cfg = cfg
        self.offline_norm.decay, self.offline_norm.sigma_min = cfg.offline_norm_decay, cfg.offline_sigma_min
        if cfg.timestep_set is not None:
            self.t_set = torch.tensor([float(t) for t in cfg.timestep_set])
        elif cfg.timestep_dist == "sampler":
            self.t_set = torch.tensor(fewstep_timesteps(ctx))
        emb, _ = ctx.policy.encode_prompts(["a"])
        self.b_phi = LogNormalizer(emb.shape[-1], cfg.b_phi_hidden, cfg.b_phi_layers)
        out = {"b_phi": Trainable(self.b_phi, lr=cfg.b_phi_lr, weight_decay=cfg.b_phi_weight_decay)}
        self.b_offline: ScalarNormalizer | None = None
        pure_offline = ctx.config.replay == "offline"
        uses_offline = ctx.config.offline_latents is not None and (cfg.offline_mix or pure_offline)
        if uses_offline and cfg.offline_normalizer == "scalar":
            self.b_offline = ScalarNormalizer()
            out["b_offline"] = Trainable(self.b_offline, lr=cfg.b_phi_lr, weight_decay=0.0)
        # pure-offline with a scalar normaliser: b_phi gets no gradient, so its group is not stepped
        skip_b_phi = pure_offline and self.b_offline is not None
        self.groups = ("policy", *(n for n in out if not (n == "b_phi" and skip_b_phi)))
        return out

    def phases(self, step: int) -> list[Phase]:
        return [Phase("fcrm", groups=self.groups)]

    # -------------------------------------------------------------- noise draws
    def draw_t(self, ctx: TrainContext, *shape: int) -> Tensor:
        cfg = self.cfg
        assert cfg is not None
        if self.t_set is not None:
            idx = torch.randint(len(self.t_set), shape, generator=ctx.generator)
            return self.t_set[idx].to(ctx.device)
        if cfg.timestep_dist == "logit_normal":
            u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(*shape, generator=ctx.generator))
        else:
            u = torch.rand(*shape, generator=ctx.generator)
        return (cfg.t_min + (cfg.t_max - cfg.t_min) * u).to(ctx.device)

    def draw(self, ctx: TrainContext, x0: Tensor, batches: int) -> tuple[Tensor, Tensor]:
        """``batches`` independent noising batches of N_mc draws each: t [batches*N_mc, B], eps [..., B, ...]."""
        m = batches * self.cfg.n_mc  # type: ignore[union-attr]
        t = self.draw_t(ctx, m, x0.shape[0])
        eps = torch.randn(m, *x0.shape, generator=ctx.generator).to(ctx.device)
        return t, eps

    # -------------------------------------------------------------- one FCRM branch
    def branch(self, ctx: TrainContext, batch: Rollouts, signal: Tensor, b: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Mean over samples of the double-sampled (or naive) squared residual, and diagnostics."""
        cfg = self.cfg
        assert cfg is not None
        x0 = batch.latents.detach().float()
        embeds = batch.prompt_embeds if batch.prompt_embeds is not None else ctx.policy.encode_prompts(batch.prompts)[0]
        nb = 2 if cfg.estimator == "double" else 1
        t, eps = self.draw(ctx, x0, nb)
        w = loss_weight(ctx.policy.schedule, t, cfg.weighting, cfg.snr_max)
        policy = ctx.policy

        def predict_theta(x_t: Tensor, tt: Tensor, emb: Tensor) -> Tensor:
            with ctx.accelerator.autocast():
                return policy.predict(x_t, tt, emb)

        def predict_ref(x_t: Tensor, tt: Tensor, emb: Tensor) -> Tensor:
            with ctx.accelerator.autocast(), policy.reference() as ref:
                return policy.predict(x_t, tt, emb, transformer=ref)

        l_theta, l_ref = denoising_losses(predict_theta, predict_ref, policy.schedule, x0, embeds, t, eps, w)
        # average the N_mc draws of each noising batch: [nb, B]
        l_theta = l_theta.view(nb, cfg.n_mc, -1).mean(1)
        l_ref = l_ref.view(nb, cfg.n_mc, -1).mean(1)
        g = residual(b.unsqueeze(0), signal.unsqueeze(0), l_ref, l_theta, cfg.beta, cfg.gamma)
        if cfg.estimator == "double":
            per = double_sampling(g[0], g[1])
            j_hat = (g[0] * g[1]).detach()  # unbiased estimate of g^2
            var_hat = (0.5 * (g[0] - g[1]) ** 2).detach()  # unbiased estimate of Var(g_hat)
        else:
            per = naive_square(g[0])
            j_hat = per.detach()
            var_hat = torch.zeros_like(j_hat)
        met = {"g_mean": float(g.detach().mean()), "g_abs": float(g.detach().abs().mean()),
               "residual_sq": float(j_hat.mean()), "mc_var": float(var_hat.mean()),
               "L_theta": float(l_theta.detach().mean()), "L_ref": float(l_ref.detach().mean()),
               "delta_L": float((l_ref - l_theta).detach().mean()), "b_mean": float(b.detach().float().mean()),
               "signal_mean": float(signal.detach().float().mean()), "signal_std":
                   float(signal.detach().float().std(unbiased=False)) if len(signal) > 1 else 0.0}
        return per.mean(), met

    # -------------------------------------------------------------- online / offline
    def _mask(self, ctx: TrainContext, prompts: list[str]) -> Tensor:
        return ctx.policy.encode_prompts(prompts)[1]

    def online(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        assert cfg is not None
        if cfg.signal == "advantage":
            if batch.advantages is None:
                raise TrlVideoError("fcrm: signal 'advantage' needs advantages: use estimator 'group' (the method's "
                                    "default) or method_args.signal=reward")
            signal = batch.advantages
        else:
            if batch.rewards is None:
                raise TrlVideoError("fcrm: the batch carries no rewards")
            signal = batch.rewards
        signal = signal.detach().float()
        if not torch.isfinite(signal).all():
            raise TrlVideoError(f"fcrm: non-finite {cfg.signal} in a '{batch.source}' batch (offline samples belong "
                                f"to the offline branch)")
        emb = batch.prompt_embeds if batch.prompt_embeds is not None else ctx.policy.encode_prompts(batch.prompts)[0]
        b = self.b_phi(emb, self._mask(ctx, batch.prompts).to(emb.device))
        return self.branch(ctx, batch, signal, b)

    def offline_rewards(self, ctx: TrainContext, batch: Rollouts) -> Tensor:
        cfg = self.cfg
        assert cfg is not None
        r = batch.rewards
        have = r is not None and bool(torch.isfinite(r).all())
        if cfg.offline_reward == "dataset" and not have:
            raise TrlVideoError("fcrm: offline_reward 'dataset' but the offline latents have no (finite) reward column")
        if cfg.offline_reward == "recompute" or not have:
            r = ctx.score(batch.latents.detach(), batch.prompts)
        return r.detach().float()  # type: ignore[union-attr]

    def offline(self, ctx: TrainContext, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        assert cfg is not None
        r = self.offline_rewards(ctx, batch)
        if cfg.offline_advantage == "reward":
            signal = r
        else:
            self.offline_norm.update(ctx.gather(r))
            signal = self.offline_norm.advantage(r, cfg.offline_advantage, cfg.offline_eps, cfg.offline_a0,
                                                 cfg.offline_a_max)
        emb = batch.prompt_embeds if batch.prompt_embeds is not None else ctx.policy.encode_prompts(batch.prompts)[0]
        if self.b_offline is not None:
            b = self.b_offline(len(batch))
        else:  # the online b_phi(c) with its gradient stopped on offline samples
            b = self.b_phi(emb, self._mask(ctx, batch.prompts).to(emb.device)).detach()
        loss, met = self.branch(ctx, batch, signal, b)
        met.update({"reward_mean": float(r.mean()), "norm_mu": self.offline_norm.mu,
                    "norm_sigma": self.offline_norm.sigma})
        return loss, met

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        assert cfg is not None
        if batch.source == "offline":  # pure-offline training: replay 'offline' is the behaviour distribution
            loss, met = self.offline(ctx, batch)
            return loss, {f"offline/{k}": v for k, v in met.items()}
        loss, met = self.online(ctx, batch)
        metrics = {f"online/{k}": v for k, v in met.items()}
        if cfg.offline_mix and ctx.offline is not None and cfg.lambda_offline > 0:
            off = ctx.offline.next_batch(ctx, cfg.offline_batch_size or len(batch))
            l_off, m_off = self.offline(ctx, off)
            loss = loss + cfg.lambda_offline * l_off
            metrics.update({f"offline/{k}": v for k, v in m_off.items()})
        return loss, metrics

    # -------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"offline_norm": self.offline_norm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "offline_norm" in state:
            self.offline_norm.load_state_dict(state["offline_norm"])
