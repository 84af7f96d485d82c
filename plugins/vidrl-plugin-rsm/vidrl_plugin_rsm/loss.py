"""RSM loss: score matching against a value-guided target (the paper's Eq. 10, derived in the README).

Per trained step t -> s of the sampler (Gaussian transition ``x_s ~ N(mu(x_t), sigma_t^2)``,
``mu = a_t x_t + c_t * score(x_t)``, so ``mu`` is affine in the native output ``n``: ``mu = mu_0 + C_t n``):

    L_t = w_t || s_theta - sg(s_ref + lambda_t g_hat) ||^2  +  trust region
        = W_t || n_theta - sg(n_ref) ||^2  -  sg(F_t) . n_theta  +  const          (native units)

with ``s_theta - s_ref = kappa_t (n_theta - n_ref)`` (``kappa_t`` = the schedule's ``score_scale``,
-(1-t)/t for rectified flow), ``W_t = w_t kappa_t^2`` and the guidance force ``F_t = 2 w_t lambda_t kappa_t g_hat``.
The second form is the one computed: it is the first up to theta-independent constants and stays finite when
``w_t -> 0`` with ``w_t lambda_t`` fixed (no KL, ``beta = 0``; the paper's remark after Thm. 3.2).

* zeroth order (Stein, Thm. 3.7): ``g_hat = (sigma_t / c_t) * A * eps`` with ``eps = (x_s - mu_theta)/sigma_t``
  and ``A`` the (centred, scaled, clipped) reward of the lookahead; ``w_t = beta c_t^2 / (2 sigma_t^2)``,
  ``lambda_t = k_t / beta`` so ``F_t = k_t m rho A C_t eps / sigma_t`` (``m`` the clip mask, ``rho`` = sg(ratio)
  for PPO, 1 for the log-ratio surrogate). With one child per state, full rollout, group advantages and
  ``rho``, ``m`` from PPO clipping this is exactly the gradient of Flow-GRPO's clipped-ratio loss + KL
  (``tests/test_equivalence.py``). Several children per state (loss-side branching) sum their forces: the
  regression target is the sibling average.
* first order: ``g_hat`` = grad_x r(...) through the Tweedie Jacobian (current state), through k ODE steps and
  then Tweedie (lookahead), or grad r(x0) of the terminal sample (reward score distillation); the loss is
  ``|| n_theta - sg(n_ref + lambda_t g_hat / kappa_t) ||^2`` (native weight 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trl_video.components.base import Phase, Trainable, TrainContext
from trl_video.components.samplers import predict, transition
from trl_video.errors import TrlVideoError
from trl_video.models.schedule import gaussian_log_prob
from trl_video.rollouts import Rollouts

from .config import RSMConfig


# ------------------------------------------------------------------------------------------------ pure pieces
def mean_coefficient(schedule: Any, x_t: Tensor, t: Tensor, s: Tensor, eta: float, kind: str,
                     t_first: Tensor | float | None) -> Tensor:
    """``C_t = d mu / d n``: the transition mean is affine in the native output, so C_t = mu(n=1) - mu(n=0)."""
    tb = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    out = []
    for value in (0.0, 1.0):
        n = torch.full_like(x_t, value)
        mean, _ = schedule.sde_step(x_t, schedule.to_x0(n, x_t, tb), schedule.to_eps(n, x_t, tb), t, s, kind, eta,
                                    t_first)
        out.append(mean)
    return out[1] - out[0]


def clip_factors(delta: Tensor, adv: Tensor, clip_range: float, surrogate: str, scale: float = 1.0
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipping of the (scale-normalised) log-ratio ``delta / scale``.

    Returns ``(mask, rho, ratio)``: the gradient of ``scale * max(-A r~, -A clip(r~, 1-eps, 1+eps))`` with
    ``r~ = exp(delta / scale)`` is ``-A * mask * rho * grad(delta)``, ``mask = 0`` where the clipped branch is
    taken (A > 0 and r~ > 1 + eps, or A < 0 and r~ < 1 - eps), ``rho = r~`` ('ratio') or 1 ('log_ratio')."""
    ratio = torch.exp(delta.detach() / scale)
    clipped = ((adv > 0) & (ratio > 1 + clip_range)) | ((adv < 0) & (ratio < 1 - clip_range))
    mask = (~clipped).to(delta.dtype)
    rho = ratio if surrogate == "ratio" else torch.ones_like(ratio)
    return mask, rho, ratio


def centre_and_scale(r: Tensor, centring: str, scale_norm: str, eps: float) -> Tensor:
    """Rows of ``r`` [P, B] are sibling sets: subtract the row mean and divide by the row scale."""
    a = r - r.mean(1, keepdim=True) if centring == "sibling" else r
    if scale_norm == "std":
        a = a / (r.std(1, unbiased=False, keepdim=True) + eps)
    elif scale_norm == "mean_abs":
        a = a / (a.abs().mean(1, keepdim=True) + eps)
    return a


def lambda_over_kappa(schedule: Any, t: Tensor, schedule_name: str, like: Tensor) -> Tensor:
    """``lambda_t / kappa_t`` for first-order targets (``kappa_t = -alpha/sigma``), written without 0/0 at t=1:
    alpha2 -> -alpha sigma, alpha -> -sigma, constant -> -sigma / max(alpha, 1e-3)."""
    a, s = schedule.alpha(t).float(), schedule.sigma(t).float()
    if schedule_name == "alpha2":
        v = -a * s
    elif schedule_name == "alpha":
        v = -s
    else:
        v = -s / a.clamp_min(1e-3)
    return v.to(like.device).reshape(*v.shape, *([1] * (like.ndim - v.ndim)))


@dataclass
class Chunk:
    """Transitions of one sampler step: N parent states, M children each."""

    step: int
    x_t: Tensor  # [N, ...]
    x_s: Tensor  # [N, M, ...]
    embeds: Tensor  # [N, L, D]
    adv: Tensor  # [N, M]
    logp_old: Tensor  # [N, M]


# ------------------------------------------------------------------------------------------------ the loss
class RSMLoss:
    """Reward Score Matching (hook point ``loss``, name ``rsm``); every preset uses it."""

    name = "rsm"
    sample_grad = False
    reward_grad = False

    def __init__(self) -> None:
        self.cfg = RSMConfig()
        self.kind, self.eta, self.num_steps = "ddim", 1.0, 10

    # -------------------------------------------------------------- setup
    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        cfg = ctx.method_config
        self.cfg = cfg if isinstance(cfg, RSMConfig) else RSMConfig(**(vars(cfg) if cfg is not None else {}))
        if ctx.registry is not None:
            from trl_video.plan import resolve_plan

            name, args = resolve_plan(ctx.config, ctx.registry).components["sampler"]
            sampler = ctx.registry.create("sampler", name, **args)
            self.kind = getattr(sampler, "sde_type", "ddim")
            self.eta = float(getattr(sampler, "eta", 0.0))
            self.num_steps = int(sampler.num_steps)
            if self.cfg.guidance == "zeroth_order" and self.cfg.branching is None and self.eta <= 0:
                raise TrlVideoError(f"rsm: zeroth-order guidance on the sampler's transitions needs a stochastic "
                                    f"sampler (sde / branch with eta > 0); '{name}' has eta {self.eta}. Set "
                                    f"method_args.branching for loss-side branches from an ODE trajectory.")
            if self.cfg.branching is not None and self.eta <= 0:
                self.eta = 0.7 if self.kind == "flow_grpo" else 1.0
            if self.cfg.branching is not None and len(self.cfg.branching) != self.num_steps:
                raise TrlVideoError(f"method_args.branching has {len(self.cfg.branching)} entries; the sampler has "
                                    f"num_steps = {self.num_steps}")
        return {}

    def configure(self, cfg: RSMConfig, kind: str, eta: float, num_steps: int) -> RSMLoss:
        """Set up without a trainer (tests, benchmarks)."""
        self.cfg, self.kind, self.eta, self.num_steps = cfg, kind, eta, num_steps
        return self

    def phases(self, step: int) -> list[Phase]:
        return [Phase("policy", repeats=self.cfg.updates_per_batch)]

    # -------------------------------------------------------------- per-step constants
    def step_stds(self, ctx: TrainContext, grid: Tensor) -> Tensor:
        """sigma_t of every step of the grid (these kinds' stds do not depend on x)."""
        x = torch.zeros(1, 1, device=grid.device)
        out = []
        for i in range(len(grid) - 1):
            _, std = ctx.policy.schedule.sde_step(x, x, x, grid[i], grid[i + 1], self.kind, self.eta, grid[1])
            out.append(float(std.reshape(-1)[0]))
        return torch.tensor(out)

    def temporal(self, ctx: TrainContext, grid: Tensor, step: int) -> tuple[float, float]:
        """(k_t, clip scale) of a step: TempFlow-GRPO's noise-aware weight sigma_t / mean sigma, and the
        log-ratio's timestep scale mean sigma / sigma_t used by fair clipping (mean over stochastic steps)."""
        stds = self.step_stds(ctx, grid)
        live = stds[stds > 0]
        mean = float(live.mean()) if len(live) else 1.0
        sig = float(stds[step]) if float(stds[step]) > 0 else mean
        k = sig / mean if self.cfg.temporal_weight == "noise" else 1.0
        scale = mean / sig if self.cfg.clip_mode == "fair" else 1.0
        return k, scale

    # -------------------------------------------------------------- bookkeeping across PPO repeats
    def _slot(self, ctx: TrainContext) -> tuple[int, dict[str, Any]]:
        """(repeat index, per-micro-batch cache): compute is called accum times per repeat."""
        calls = ctx.state.get("rsm_calls", 0)
        ctx.state["rsm_calls"] = calls + 1
        accum = ctx.config.gradient_accumulation_steps
        cache = ctx.state.setdefault("rsm_cache", {}).setdefault(calls % accum, {})
        return calls // accum, cache

    def trained_steps(self, ctx: TrainContext, candidates: list[int], cache: dict[str, Any]) -> list[int]:
        if "steps" not in cache:
            n = max(1, int(len(candidates) * self.cfg.timestep_fraction + 1e-9))
            if self.cfg.timestep_sampling == "random" and n < len(candidates):
                perm = torch.randperm(len(candidates), generator=ctx.generator)[:n].sort().values
                cache["steps"] = [candidates[int(i)] for i in perm]
            else:
                cache["steps"] = candidates[:n]
        return cache["steps"]

    # -------------------------------------------------------------- zeroth order: where transitions come from
    def trajectory_chunks(self, ctx: TrainContext, batch: Rollouts, cache: dict[str, Any]) -> list[Chunk]:
        """The sampler's own SDE transitions with the batch (group) advantages: GRPO / TempFlow-GRPO."""
        if batch.trajectory is None or batch.log_probs is None:
            raise TrlVideoError("rsm: zeroth-order guidance needs trajectories with log-probs (sampler sde/branch "
                                "with record_trajectory)")
        if batch.advantages is None:
            raise TrlVideoError("rsm: the batch has no advantages: use estimator 'group' (the presets' default)")
        finite = torch.isfinite(batch.log_probs).all(0)
        candidates = [i for i in range(batch.log_probs.shape[1]) if bool(finite[i])]
        if not candidates:
            raise TrlVideoError("rsm: no stochastic step in the batch (every log-prob is NaN)")
        adv = batch.advantages.detach().float().clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)
        emb = self._embeds(ctx, batch)
        return [Chunk(i, batch.trajectory[:, i], batch.trajectory[:, i + 1].unsqueeze(1), emb, adv.unsqueeze(1),
                      batch.log_probs[:, i].unsqueeze(1)) for i in self.trained_steps(ctx, candidates, cache)]

    @torch.no_grad()
    def branch_chunks(self, ctx: TrainContext, batch: Rollouts) -> list[Chunk]:
        """Loss-side zeroth-order lookahead: B_i SDE children of each trajectory state at step i, each rolled
        ``lookahead_depth`` steps (ODE) and scored at the Tweedie x0_hat of its landing state (x0 itself when it
        reaches t=0); sibling-centred and scaled rewards are the children's advantages."""
        cfg = self.cfg
        assert cfg.branching is not None
        if batch.trajectory is None:
            raise TrlVideoError("rsm: loss-side branching needs the sampler's trajectory (record_trajectory)")
        grid = batch.timesteps
        S = len(grid) - 1
        emb = self._embeds(ctx, batch)
        chunks = []
        net = ctx.policy.transformer
        for i, b in enumerate(cfg.branching):
            if b <= 0:
                continue
            x_t = batch.trajectory[:, i]
            _, mean, std = transition(ctx, net, x_t, grid[i], grid[i + 1], emb, self.eta, self.kind, grid[1])
            n = x_t.shape[0]
            rep = mean.repeat_interleave(b, 0)
            x_s = rep + std * ctx.randn(*rep.shape)
            logp_old = gaussian_log_prob(x_s, rep, std).view(n, b)
            land = S if cfg.lookahead_depth == 0 else min(S, i + cfg.lookahead_depth)
            x, e = x_s, emb.repeat_interleave(b, 0)
            for j in range(i + 1, land):
                _, x, _ = transition(ctx, net, x, grid[j], grid[j + 1], e, 0.0, self.kind, grid[1])
            x0 = x if land == S else predict(ctx, net, x, grid[land], e)[1]
            prompts = [p for p in batch.prompts for _ in range(b)]
            r = ctx.score(x0, prompts).view(n, b)
            adv = centre_and_scale(r, cfg.centring, cfg.scale_norm, cfg.adv_eps)
            adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
            chunks.append(Chunk(i, x_t, x_s.view(n, b, *x_t.shape[1:]), emb, adv, logp_old))
            ctx.state.setdefault("rsm_branch_reward", []).append(float(r.mean()))
        return chunks

    # -------------------------------------------------------------- zeroth order: the loss on transitions
    def zeroth_order(self, ctx: TrainContext, chunk: Chunk, grid: Tensor, repeat: int, cache: dict[str, Any]
                     ) -> tuple[Tensor, dict[str, float]]:
        cfg, policy = self.cfg, ctx.policy
        i = chunk.step
        t, s = grid[i], grid[i + 1]
        native, mean, std = transition(ctx, policy.transformer, chunk.x_t, t, s, chunk.embeds, self.eta, self.kind,
                                       grid[1])
        n, m = chunk.adv.shape
        x_s = chunk.x_s.flatten(0, 1)
        mean_c = mean.repeat_interleave(m, 0)
        logp = gaussian_log_prob(x_s, mean_c, std).view(n, m)
        delta = logp - chunk.logp_old
        k_t, scale = self.temporal(ctx, grid, i)
        C = mean_coefficient(policy.schedule, chunk.x_t, t, s, self.eta, self.kind, grid[1]).detach()
        sig = std.detach()
        eps = ((x_s - mean_c.detach()) / sig).view(n, m, *chunk.x_t.shape[1:])
        if cfg.trust_region == "clip":
            mask, rho, ratio = clip_factors(delta, chunk.adv, cfg.clip_range, cfg.clip_surrogate, scale)
        else:
            ratio = torch.exp(delta.detach())
            mask, rho = torch.ones_like(ratio), torch.ones_like(ratio)
        coef = (k_t * mask * rho * chunk.adv).view(n, m, *([1] * (chunk.x_t.ndim - 1)))
        # guidance force F = k m rho A C eps / sigma, summed over children and averaged (sibling mean)
        force = (coef * eps).mean(1) * C / sig
        loss = -(force.detach() * native).flatten(1).mean(1)
        kl = torch.zeros((), device=native.device)
        if cfg.beta > 0:
            with torch.no_grad(), policy.reference() as ref:
                n_ref, mean_ref, _ = transition(ctx, ref, chunk.x_t, t, s, chunk.embeds, self.eta, self.kind, grid[1])
            denom = sig**2 if cfg.kl_form == "transition" else sig**2 / (t - s).clamp_min(1e-12)
            w_native = cfg.beta * C**2 / (2 * denom)  # W_t = w_t kappa_t^2 with w_t = beta c_t^2 / (2 sigma_t^2)
            kl_el = ((mean.detach() - mean_ref) ** 2 / (2 * denom)).flatten(1).mean(1)
            loss = loss + (w_native * (native - n_ref) ** 2).flatten(1).mean(1)
            kl = kl_el.mean()
        if cfg.trust_region == "anchor":
            key = f"old_{i}"
            if repeat == 0:
                cache[key] = native.detach()
            loss = loss + cfg.anchor_weight * ((native - cache[key]) ** 2).flatten(1).mean(1)
        met = {"ratio_mean": float(ratio.mean()), "ratio_dev_max": float((ratio - 1).abs().max()),
               "clip_frac": float(1 - mask.mean()), "kl": float(kl), "adv_abs": float(chunk.adv.abs().mean())}
        return loss.mean(), met

    # -------------------------------------------------------------- first order
    def first_order(self, ctx: TrainContext, batch: Rollouts, repeat: int, cache: dict[str, Any]
                    ) -> tuple[Tensor, dict[str, float]]:
        cfg, policy = self.cfg, ctx.policy
        if batch.trajectory is None:
            raise TrlVideoError("rsm: first-order guidance needs the sampler's trajectory (record_trajectory)")
        grid = batch.timesteps
        S = len(grid) - 1
        emb = self._embeds(ctx, batch)
        steps = cfg.train_steps if cfg.train_steps is not None else list(range(S - 1))
        steps = self.trained_steps(ctx, [int(i) for i in steps], cache)
        if "g_hat" not in cache:
            cache["g_hat"] = {i: self.value_gradient(ctx, batch, i, emb) for i in steps}
        total = torch.zeros((), device=ctx.device)
        g_abs = 0.0
        for i in steps:
            g_hat = cache["g_hat"][i]
            x_t = batch.trajectory[:, i]
            t = grid[i]
            tb = t.expand(x_t.shape[0])
            with ctx.accelerator.autocast():
                native = policy.predict(x_t, tb, emb).float()
                with torch.no_grad(), policy.reference() as ref:
                    n_ref = policy.predict(x_t, tb, emb, transformer=ref).float()
            target = n_ref + lambda_over_kappa(policy.schedule, t, cfg.lambda_schedule, x_t) * cfg.guidance_scale * g_hat
            loss = ((native - target.detach()) ** 2).flatten(1).mean(1)
            if cfg.trust_region == "anchor":
                key = f"old_{i}"
                if repeat == 0:
                    cache[key] = native.detach()
                loss = loss + cfg.anchor_weight * ((native - cache[key]) ** 2).flatten(1).mean(1)
            total = total + loss.mean() / len(steps)
            g_abs += float(g_hat.abs().mean()) / len(steps)
        return total, {"g_abs": g_abs}

    def value_gradient(self, ctx: TrainContext, batch: Rollouts, i: int, emb: Tensor) -> Tensor:
        """g_hat at trajectory state i (first order), detached."""
        cfg = self.cfg
        grid = batch.timesteps
        S = len(grid) - 1
        if cfg.guidance == "first_order_terminal":
            x0 = batch.latents.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                r = ctx.score(x0, batch.prompts, grad=True)
                g = torch.autograd.grad(r.sum(), x0)[0]
        else:
            depth = 0 if cfg.guidance == "first_order_current" else cfg.lookahead_depth
            land = S if (cfg.guidance == "first_order_lookahead" and depth == 0) else min(S, i + depth)
            x = batch.trajectory[:, i].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                y = x
                for j in range(i, land):  # differentiated ODE steps (the Jacobian chain)
                    _, y, _ = transition(ctx, ctx.policy.transformer, y, grid[j], grid[j + 1], emb, 0.0, self.kind,
                                         grid[1])
                x0 = y if land == S else predict(ctx, ctx.policy.transformer, y, grid[land], emb)[1]
                r = ctx.score(x0, batch.prompts, grad=True)
                g = torch.autograd.grad(r.sum(), x)[0]
        g = g.detach().float()
        if cfg.first_order_norm == "batch_rms":
            g = g / (g.pow(2).mean().sqrt() + 1e-12)
        return g

    # -------------------------------------------------------------- entry point
    def _embeds(self, ctx: TrainContext, batch: Rollouts) -> Tensor:
        return batch.prompt_embeds if batch.prompt_embeds is not None else ctx.policy.encode_prompts(batch.prompts)[0]

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts) -> tuple[Tensor, dict[str, float]]:
        repeat, cache = self._slot(ctx)
        if self.cfg.guidance != "zeroth_order":
            return self.first_order(ctx, batch, repeat, cache)
        if self.cfg.branching is not None:
            if "chunks" not in cache:
                cache["chunks"] = self.branch_chunks(ctx, batch)
            chunks = cache["chunks"]
        else:
            chunks = self.trajectory_chunks(ctx, batch, cache)
        if not chunks:
            raise TrlVideoError("rsm: method_args.branching selects no step (all entries 0)")
        total = torch.zeros((), device=ctx.device)
        agg: dict[str, float] = {}
        for chunk in chunks:
            loss, met = self.zeroth_order(ctx, chunk, batch.timesteps, repeat, cache)
            total = total + loss / len(chunks)
            for key, v in met.items():
                agg[key] = max(agg.get(key, v), v) if key == "ratio_dev_max" else agg.get(key, 0.0) + v / len(chunks)
        if "rsm_branch_reward" in ctx.state:
            agg["branch_reward"] = sum(ctx.state["rsm_branch_reward"]) / len(ctx.state["rsm_branch_reward"])
        return total, agg


_ = math
