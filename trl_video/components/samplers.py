"""Samplers (hook point ``sampler``).

All samplers walk the same t-grid ``1 = t_0 > ... > t_S = 0`` with the schedule's DDIM-form step, which
is exact Euler for rectified flow and DDIM for VP models; ``eta > 0`` makes a step stochastic with the
posterior variance and gives it a Gaussian log-prob (Flow-GRPO-style SDE sampling).

* ``ode``: deterministic, no grad.
* ``sde``: stochastic on chosen steps, records per-step log-probs. ``sde_type`` picks the transition:
  ``ddim`` (the posterior-variance step above), ``flow_grpo`` (Flow-GRPO's own SDE, ``eta`` = its noise level
  a, 0.7 in the paper) or ``dance_grpo`` (DanceGRPO's, ``eta`` = its eta); ``window_size`` makes only a
  window of steps stochastic, drawn per step (``window_mode: random``, Flow-GRPO-Fast) or sliding with the
  training step (``sliding``, MixGRPO); ``same_noise: true`` starts the members of a group from one noise
  (DanceGRPO's ``init_same_noise``).
* ``fewstep``: K-step generator sampling (predict x0, re-noise to the next of the K timesteps).
* ``branch``: ODE prefix shared by a group, one SDE step at a branching step, ODE to the end.
* ``window``: gradients kept only on a window of K steps starting at a (random) step; the rest runs
  under no_grad. ``finish="continue"`` runs to t=0 (ReFL / DRaFT-K); ``finish="x0"`` stops after the
  window with a one-shot x0 prediction (truncated mid-step sampling, VELR).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .. import sampling
from ..models.schedule import gaussian_log_prob
from ..rollouts import Rollouts
from .base import BaseSampler, TrainContext


@contextlib.contextmanager
def behaviour_policy(ctx: TrainContext, behaviour: str) -> Iterator[Any]:
    """Temporarily run the policy as the behaviour distribution: current | ema | reference."""
    if behaviour == "current":
        yield ctx.policy.transformer
    elif behaviour == "ema":
        ema = ctx.ema.get("policy")
        if ema is None:
            from ..errors import TrlVideoError

            raise TrlVideoError("sampler behaviour 'ema' needs policy EMA: set ema_decay in the recipe")
        params = ctx.policy.trainable_parameters()
        ema.store(params)
        ema.copy_to(params)
        try:
            yield ctx.policy.transformer
        finally:
            ema.restore(params)
    elif behaviour == "reference":
        with ctx.policy.reference() as ref:
            yield ref
    else:
        from ..errors import TrlVideoError

        raise TrlVideoError(f"unknown sampler behaviour '{behaviour}' (current|ema|reference)")


def predict(ctx: TrainContext, net: Any, x: Tensor, t: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(native, x0_hat, eps_hat) at (x, t), in the trainer's mixed precision (:func:`trl_video.sampling.predict`)."""
    return sampling.predict(ctx.policy, x, t, emb, net=net, autocast=ctx.accelerator.autocast)


def transition(ctx: TrainContext, net: Any, x_t: Tensor, t: Tensor, s: Tensor, emb: Tensor, eta: float,
               kind: str = "ddim", t_first: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(native, mean, std)`` of the sampler transition x_t -> x_s under ``net`` (with grad if enabled)."""
    native, x0, eps = predict(ctx, net, x_t, t, emb)
    mean, std = ctx.policy.schedule.sde_step(x_t, x0, eps, t, s, kind, eta, t_first)
    return native, mean, std


def transition_log_prob(ctx: TrainContext, net: Any, x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor, emb: Tensor,
                        eta: float, kind: str = "ddim", t_first: Tensor | float | None = None) -> Tensor:
    """log p(x_s | x_t) of the SDE step under ``net`` (with grad if enabled). Used by samplers when
    recording and by losses when recomputing, so the two are the same computation."""
    _, mean, std = transition(ctx, net, x_t, t, s, emb, eta, kind, t_first)
    return gaussian_log_prob(x_s, mean, std)


def _check_stochastic_steps(steps: list[int], num_steps: int, key: str) -> None:
    """The last step lands on t=0 where the posterior variance is 0: it cannot be stochastic."""
    bad = [i for i in steps if not 0 <= i < num_steps - 1]
    if bad:
        from ..errors import TrlVideoError

        raise TrlVideoError(f"sampler_args.{key} must be step indices in [0, num_steps - 1 = {num_steps - 1}), "
                            f"got {bad}")


class GridSampler(BaseSampler):
    """Base of the built-in samplers: ``num_steps`` steps on the schedule's t-grid, a behaviour policy."""

    name = "grid"

    def __init__(self, num_steps: int = 20, behaviour: str = "current", record_trajectory: bool = True):
        if num_steps < 1:
            from ..errors import TrlVideoError

            raise TrlVideoError(f"sampler_args.num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.behaviour = behaviour
        self.record_trajectory = record_trajectory

    def grid(self, ctx: TrainContext) -> Tensor:
        return ctx.policy.schedule.timesteps(self.num_steps, device=ctx.device)

    def initial_noise(self, ctx: TrainContext, n: int) -> Tensor:
        return ctx.randn(n, *ctx.policy.latent_shape)

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        raise NotImplementedError


SDE_KINDS = ("ddim", "flow_grpo", "dance_grpo")


class ODESampler(GridSampler):
    name = "ode"

    def __init__(self, num_steps: int = 20, behaviour: str = "current", record_trajectory: bool = True, eta: float = 0.0,
                 sde_steps: list[int] | str | None = None, sde_type: str = "ddim", window_size: int = 0,
                 window_mode: str = "random", window_range: list[int] | None = None, window_shift_every: int = 1,
                 window_stride: int = 1, same_noise: bool = False):
        super().__init__(num_steps, behaviour, record_trajectory)
        # the members of a group start from one noise (DanceGRPO's init_same_noise): the group's reward spread then
        # comes from the SDE steps alone, which are what the log-probs credit
        self.same_noise = bool(same_noise)
        from ..errors import TrlVideoError

        if sde_type not in SDE_KINDS:
            raise TrlVideoError(f"sampler_args.sde_type must be one of {'|'.join(SDE_KINDS)}, got '{sde_type}'")
        if window_mode not in ("random", "sliding"):
            raise TrlVideoError(f"sampler_args.window_mode must be random|sliding, got '{window_mode}'")
        self.eta, self.sde_type = eta, sde_type
        self.sde_steps = sde_steps
        # the last step (to t=0) has zero posterior variance under ddim; the flow SDEs keep g_t sqrt(t) > 0 there
        self.last_stochastic = num_steps if sde_type != "ddim" else num_steps - 1
        if isinstance(sde_steps, list):
            _check_stochastic_steps(sde_steps, num_steps, "sde_steps")
        lo, hi = window_range if window_range is not None else (0, self.last_stochastic - window_size)
        if window_size and not (1 <= window_size <= self.last_stochastic and 0 <= lo <= hi
                                and hi + window_size <= self.last_stochastic):
            raise TrlVideoError(f"sampler_args: need 1 <= window_size and 0 <= window_range[0] <= window_range[1] "
                                f"<= {self.last_stochastic} - window_size, got size {window_size}, range {[lo, hi]}")
        self.window_size, self.window_mode, self.window_range = window_size, window_mode, (lo, hi)
        self.window_shift_every, self.window_stride = max(1, window_shift_every), max(1, window_stride)

    def window(self, ctx: TrainContext) -> list[int]:
        """The SDE window of this training step: ``random`` draws its start uniformly in ``window_range``
        (the same on every rank; Flow-GRPO-Fast); ``sliding`` moves it by ``window_stride`` every
        ``window_shift_every`` steps and wraps around (MixGRPO)."""
        lo, hi = self.window_range
        if self.window_mode == "random":
            g = torch.Generator().manual_seed(ctx.config.seed * 15485863 + ctx.step)
            start = int(torch.randint(lo, hi + 1, (1,), generator=g))
        else:
            start = lo + (ctx.step // self.window_shift_every) * self.window_stride % (hi - lo + 1)
        return list(range(start, start + self.window_size))

    def stochastic(self, i: int) -> bool:
        if self.eta <= 0:
            return False
        if self.sde_steps is None or self.sde_steps == "all":
            return i < self.last_stochastic
        return i in set(self.sde_steps)  # type: ignore[arg-type]

    def group_noise(self, ctx: TrainContext, group_ids: Tensor) -> Tensor:
        """One initial noise per group, seeded by (config seed, step, group id) so that members of a group on
        different processes share it too."""
        shape = ctx.policy.latent_shape
        return torch.stack([
            torch.randn(*shape, generator=torch.Generator().manual_seed(
                (ctx.config.seed * 1_000_003 + ctx.step) * 10_007 + int(gid)))
            for gid in group_ids.tolist()]).to(ctx.device)

    @torch.no_grad()
    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        grid = self.grid(ctx)
        if self.window_size:
            self.sde_steps = self.window(ctx)
        x = noise = self.group_noise(ctx, group_ids) if self.same_noise else self.initial_noise(ctx, len(prompts))
        traj = [x] if self.record_trajectory else []
        logps = torch.full((len(prompts), self.num_steps), float("nan"), device=ctx.device)
        with behaviour_policy(ctx, self.behaviour) as net:
            for i in range(self.num_steps):
                t, s = grid[i], grid[i + 1]
                eta = self.eta if self.stochastic(i) else 0.0
                mean, std, _, _ = sampling.denoise_step(ctx.policy, x, t, s, embeds, net=net, eta=eta,
                                                        autocast=ctx.accelerator.autocast, sde_type=self.sde_type,
                                                        t_first=grid[1])
                if eta > 0:
                    x_next = mean + std * ctx.randn(*mean.shape)
                    logps[:, i] = gaussian_log_prob(x_next, mean, std)
                else:
                    x_next = mean
                x = x_next
                if self.record_trajectory:
                    traj.append(x)
        return Rollouts(latents=x, prompts=list(prompts), prompt_embeds=embeds, group_ids=group_ids,
                        trajectory=torch.stack(traj, 1) if traj else None, timesteps=grid, log_probs=logps,
                        noise=noise, source="ema" if self.behaviour == "ema" else "online", eta=self.eta)


class SDESampler(ODESampler):
    name = "sde"

    def __init__(self, num_steps: int = 10, behaviour: str = "current", record_trajectory: bool = True, eta: float = 1.0,
                 sde_steps: list[int] | str | None = "all", sde_type: str = "ddim", window_size: int = 0,
                 window_mode: str = "random", window_range: list[int] | None = None, window_shift_every: int = 1,
                 window_stride: int = 1, same_noise: bool = False):
        super().__init__(num_steps, behaviour, record_trajectory, eta, sde_steps, sde_type, window_size, window_mode,
                         window_range, window_shift_every, window_stride, same_noise)


class FewStepSampler(GridSampler):
    """K-step generator: at each t_k predict x0, then re-noise with fresh noise to t_{k+1}."""

    name = "fewstep"

    def __init__(self, timesteps: list[float] | None = None, num_steps: int = 4, behaviour: str = "current",
                 record_trajectory: bool = True, grad: bool = False):
        ts = timesteps or [1.0 - k / num_steps for k in range(num_steps)]
        super().__init__(len(ts), behaviour, record_trajectory)
        self.step_times = [float(t) for t in ts]
        self.grad = grad

    def grid(self, ctx: TrainContext) -> Tensor:
        return torch.tensor([*self.step_times, 0.0], device=ctx.device)

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        grid = self.grid(ctx)
        noise = self.initial_noise(ctx, len(prompts))
        traj = [noise]
        with behaviour_policy(ctx, self.behaviour) as net, torch.set_grad_enabled(self.grad):
            x0 = sampling.fewstep_sample(ctx.policy, noise, embeds, self.step_times,
                                         lambda k, shape: ctx.randn(*shape), net=net,
                                         autocast=ctx.accelerator.autocast,
                                         on_step=lambda k, x: traj.append(x.detach()))
        traj.append(x0.detach())
        return Rollouts(latents=x0, prompts=list(prompts), prompt_embeds=embeds, group_ids=group_ids,
                        trajectory=torch.stack(traj, 1), timesteps=grid, noise=noise,
                        source="ema" if self.behaviour == "ema" else "online")


class BranchSampler(ODESampler):
    """TempFlow-GRPO-style branching: the samples of one group share noise and an ODE prefix up to the
    branching step, take one SDE step there (their only randomness), then follow the ODE."""

    name = "branch"

    def __init__(self, num_steps: int = 10, behaviour: str = "current", record_trajectory: bool = True, eta: float = 1.0,
                 branch_steps: list[int] | None = None, sde_type: str = "ddim"):
        super().__init__(num_steps, behaviour, record_trajectory, eta, None, sde_type, same_noise=True)
        self.branch_steps = branch_steps or list(range(0, max(1, num_steps - 1)))
        _check_stochastic_steps(self.branch_steps, num_steps, "branch_steps")

    @torch.no_grad()
    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        # all ranks draw the same branch step (shared config seed + step), so groups stay consistent
        g = torch.Generator().manual_seed(ctx.config.seed * 7919 + ctx.step)
        b = self.branch_steps[int(torch.randint(len(self.branch_steps), (1,), generator=g))]
        self.sde_steps = [b]
        out = super().sample(ctx, prompts, embeds, group_ids)
        out.branch_step = torch.full((len(prompts),), b, dtype=torch.long)
        return out


class WindowGradSampler(GridSampler):
    """Gradients only on a window of ``grad_steps`` steps (truncated backprop).

    ``start_range=(lo, hi)``: the first grad step index is drawn uniformly in [lo, hi] each call (same on
    all ranks); ``None`` means the last ``grad_steps`` steps. ``finish="continue"`` denoises to t=0 with
    grad; ``finish="x0"`` stops right after the window and returns a one-shot x0 prediction.
    ``checkpointing`` recomputes activations in the backward pass to save memory.
    """

    name = "window"

    def __init__(self, num_steps: int = 20, grad_steps: int = 1, start_range: list[int] | None = None,
                 finish: str = "continue", behaviour: str = "current", record_trajectory: bool = False,
                 eta: float = 0.0, checkpointing: bool = False):
        super().__init__(num_steps, behaviour, record_trajectory)
        from ..errors import TrlVideoError

        if not 1 <= grad_steps <= num_steps:
            raise TrlVideoError(f"sampler_args.grad_steps must be in [1, num_steps={num_steps}], got {grad_steps}")
        if start_range is not None and not (len(start_range) == 2
                                            and 0 <= start_range[0] <= start_range[1] <= num_steps - grad_steps):
            raise TrlVideoError(f"sampler_args.start_range must be [lo, hi] with 0 <= lo <= hi <= num_steps - "
                                f"grad_steps = {num_steps - grad_steps}, got {list(start_range)}")
        if finish not in ("continue", "x0"):
            raise TrlVideoError(f"sampler_args.finish must be 'continue' or 'x0', got '{finish}'")
        self.grad_steps, self.start_range, self.finish = grad_steps, start_range, finish
        self.eta, self.checkpointing = eta, checkpointing

    def _predict(self, ctx: TrainContext, net: Any, x: Tensor, t: Tensor, embeds: Tensor, checkpoint: bool):
        if checkpoint and self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(lambda xx: predict(ctx, net, xx, t, embeds)[1:], x,
                                                     use_reentrant=False)
        return predict(ctx, net, x, t, embeds)[1:]

    def window_start(self, ctx: TrainContext) -> int:
        if self.start_range is None:
            return self.num_steps - self.grad_steps
        lo, hi = self.start_range
        g = torch.Generator().manual_seed(ctx.config.seed * 104729 + ctx.step)
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        grid = self.grid(ctx)
        start = self.window_start(ctx)
        end = min(start + self.grad_steps, self.num_steps)
        x = noise = self.initial_noise(ctx, len(prompts))
        sch = ctx.policy.schedule
        x0 = x
        with behaviour_policy(ctx, self.behaviour) as net:
            for i in range(self.num_steps if self.finish == "continue" else end):
                # no graph before the window; from its start on, every step is differentiated
                with torch.set_grad_enabled(i >= start and torch.is_grad_enabled()):
                    x0, eps = self._predict(ctx, net, x, grid[i], embeds, checkpoint=i >= start)
                    mean, std = sch.ddim_step(x0, eps, grid[i], grid[i + 1], self.eta)
                    x = mean + std * ctx.randn(*mean.shape) if self.eta > 0 else mean
            if self.finish == "x0" and end < self.num_steps:
                x0, _ = self._predict(ctx, net, x, grid[end], embeds, checkpoint=True)  # one-shot x0 at t_end
            latents = x0 if self.finish == "x0" else x
        return Rollouts(latents=latents, prompts=list(prompts), prompt_embeds=embeds, group_ids=group_ids,
                        timesteps=grid, noise=noise, eta=self.eta,
                        window_start=torch.full((len(prompts),), start, dtype=torch.long),
                        t_mid=grid[start].expand(len(prompts)).clone())


Sampler = GridSampler  # the former name of the base class

BUILTIN_SAMPLERS = {c.name: c for c in (ODESampler, SDESampler, FewStepSampler, BranchSampler, WindowGradSampler)}
_ = math
