"""The sampling engine: one denoising step and the two loops built from it, shared by the samplers (hook point
``sampler``), evaluation and the benchmarks.

Every sampler walks a t-grid ``1 = t_0 > ... > t_S = 0`` with the schedule's DDIM-form step (exact Euler for
rectified flow, DDIM for VP models; ``eta > 0`` adds the posterior variance). Works with anything that has
``schedule``, ``latent_shape`` and ``predict`` / ``predict_guided`` like :class:`~trl_video.models.policy.VideoPolicy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: ``noise(k, shape)``: the fresh noise a few-step sampler re-noises with before its step ``k`` (k >= 1)
RenoiseFn = Callable[[int, tuple[int, ...]], Tensor]


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: Any = None) -> Tensor:
    """One standard-normal tensor of ``shape`` per seed (``torch.Generator().manual_seed(seed)``), stacked: the same
    seed gives the same noise whatever the batch it is in."""
    x = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return x.to(device) if device is not None else x


def predict(policy: Any, x: Tensor, t: Tensor, embeds: Tensor, *, net: Any = None, guidance_scale: float = 1.0,
            autocast: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(native, x0_hat, eps_hat)`` of the model at ``(x, t)``; ``t`` a scalar or ``[B]``. ``guidance_scale > 1``:
    classifier-free guidance (:meth:`VideoPolicy.predict_guided`); ``autocast``: the mixed-precision context the
    network runs in (its output is cast back to float32)."""
    tb = t.expand(x.shape[0]) if t.ndim == 0 else t
    with autocast() if autocast is not None else contextlib.nullcontext():
        if guidance_scale == 1.0:
            native = policy.predict(x, tb, embeds, transformer=net)
        else:
            native = policy.predict_guided(x, tb, embeds, guidance_scale, transformer=net)
    native = native.float() if autocast is not None else native
    sch = policy.schedule
    return native, sch.to_x0(native, x, tb), sch.to_eps(native, x, tb)


def denoise_step(policy: Any, x: Tensor, t: Tensor, s: Tensor, embeds: Tensor, *, net: Any = None, eta: float = 0.0,
                 guidance_scale: float = 1.0, autocast: Callable[[], Any] | None = None, sde_type: str = "ddim",
                 t_first: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step ``t -> s``: ``(mean, std, x0_hat, eps_hat)``; the caller draws ``x_s = mean + std * noise``
    (``std`` is 0 for ``eta = 0``). ``sde_type``: the DDIM-posterior step (``ddim``) or a GRPO paper's flow SDE
    (``flow_grpo`` | ``dance_grpo``, ``eta`` its noise level, ``t_first`` the grid's second point), see
    :meth:`NoiseSchedule.sde_step`."""
    _, x0, eps = predict(policy, x, t, embeds, net=net, guidance_scale=guidance_scale, autocast=autocast)
    mean, std = policy.schedule.sde_step(x, x0, eps, t, s, sde_type, eta, t_first)
    return mean, std, x0, eps


def ode_sample(policy: Any, x: Tensor, embeds: Tensor, grid: Tensor, *, start: int = 0, end: int | None = None,
               net: Any = None, guidance_scale: float = 1.0, autocast: Callable[[], Any] | None = None,
               on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """The deterministic sampler: steps ``start .. end-1`` of ``grid`` from ``x`` (at ``grid[start]``) to
    ``grid[end]`` (default: the end of the grid, t = 0). ``on_step(i, x_next)`` sees every new state."""
    end = len(grid) - 1 if end is None else end
    for i in range(start, end):
        x, _, _, _ = denoise_step(policy, x, grid[i], grid[i + 1], embeds, net=net, guidance_scale=guidance_scale,
                                  autocast=autocast)
        if on_step is not None:
            on_step(i, x)
    return x


def fewstep_sample(policy: Any, x: Tensor, embeds: Tensor, times: Sequence[float] | Tensor, renoise: RenoiseFn, *,
                   net: Any = None, autocast: Callable[[], Any] | None = None,
                   on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """The K-step generator (consistency-style): at each of the K timesteps predict x0, then re-noise it with
    ``renoise(k, shape)`` to the next timestep; returns the last x0 prediction. ``on_step(k, x_k)`` sees each
    re-noised state."""
    grid = torch.as_tensor([float(t) for t in times], dtype=torch.float32)
    x0 = x
    for k in range(len(grid)):
        _, x0, _ = predict(policy, x, grid[k].to(x.device), embeds, net=net, autocast=autocast)
        if k + 1 < len(grid):
            t_next = grid[k + 1].to(x.device).expand(x0.shape[0])
            x = policy.schedule.add_noise(x0, renoise(k + 1, tuple(x0.shape)), t_next)
            if on_step is not None:
                on_step(k + 1, x)
    return x0


@torch.no_grad()
def sample_batched(policy: Any, prompts: list[str], seeds: list[int], fn: Callable[[Tensor, Tensor, list[int]], Tensor],
                   batch_size: int = 16) -> Tensor:
    """Run ``fn(noise, embeds, seeds)`` over batches of (prompt, seed) pairs, the noise of each pair drawn from its
    seed (:func:`seeded_noise`), and concatenate: evaluation and benchmarks sample this way so that every
    model sees the same noises."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        x = seeded_noise(policy.latent_shape, ss, device=getattr(policy, "device", None))
        emb, _ = policy.encode_prompts(ps)
        out.append(fn(x, emb, ss))
    return torch.cat(out)
