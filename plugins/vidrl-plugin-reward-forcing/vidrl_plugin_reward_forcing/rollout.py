"""Autoregressive self-rollout of the causal generator (Self-Forcing's training-time = inference-time loop).

For each chunk of ``chunk_size`` latent frames: start from noise, take K few-step denoising steps (predict x0 at
``t_k``, re-noise it with fresh noise to ``t_{k+1}``), attending to the KV cache of the chunks generated before;
then run the clean chunk once more at t = 0 with ``update_cache=True`` so that later chunks see clean context
(Self-Forcing Alg. 1). The same function serves the training sampler, evaluation and streaming.

Gradients (``grad``): only the LAST denoising step of a chunk is differentiated (its input state and the cache are
detached), on every chunk (``"all"``) or on the last chunk only (``"last"``), which bounds activation memory
to one model call per kept chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import RewardForcingError
from .model import CausalWanTransformer3DModel, KVCache

GRAD_MODES = ("none", "last", "all")


def student_timesteps(schedule, num_steps: int) -> list[float]:
    """The K denoising levels ``t_0 = 1 > ... > t_{K-1}``: the schedule's (shifted) K-step grid without 0."""
    return [float(t) for t in schedule.timesteps(num_steps)[:-1]]


@dataclass
class RolloutResult:
    latents: Tensor  # [B, C, F, H, W] clean video (x0 of every chunk); grad where kept
    chunk_inputs: list[Tensor]  # per chunk, the state x_{t_{K-1}} fed to its last step (detached)
    cache: KVCache


def self_rollout(model: CausalWanTransformer3DModel, schedule, prompt_embeds: Tensor, noise: Tensor,
                 step_times: list[float], *, randn: Callable[[tuple[int, ...]], Tensor], grad: str = "none",
                 chunk_size: int | None = None, max_context: int | None = None, cache: KVCache | None = None,
                 on_chunk: Callable[[int, Tensor], None] | None = None,
                 autocast: Callable[[], Any] | None = None) -> RolloutResult:
    """Generate ``noise.shape[2]`` latent frames chunk by chunk. ``cache``: continue a stream (its frames are
    the context); ``autocast``: a context-manager factory (the accelerator's); ``max_context``: keep at most this many latent frames of context (sliding window, for
    streams longer than the training length); ``on_chunk(i, x0_chunk)`` is called as each chunk is done."""
    if grad not in GRAD_MODES:
        raise RewardForcingError(f"sampler_args.grad must be one of {GRAD_MODES}, got '{grad}'")
    cs = chunk_size or model.config.chunk_size
    b, _, f, h, w = noise.shape
    if f % cs:
        raise RewardForcingError(f"{f} latent frames are not a whole number of chunks of {cs}")
    tpf = model.tokens_per_frame(h, w)
    cache = cache if cache is not None else model.new_cache()
    grad_enabled = torch.is_grad_enabled()
    autocast = autocast or contextlib.nullcontext
    n_chunks = f // cs
    outs, inputs = [], []
    for c in range(n_chunks):
        x = noise[:, :, c * cs:(c + 1) * cs]
        keep = grad_enabled and (grad == "all" or (grad == "last" and c == n_chunks - 1))
        x0 = x
        for k, t in enumerate(step_times):
            last = k == len(step_times) - 1
            tb = torch.full((b,), t, device=noise.device)
            with torch.set_grad_enabled(keep and last), autocast():
                native = model(x, schedule.model_timestep(tb).to(x.dtype), prompt_embeds.to(x.dtype),
                               kv_cache=cache, return_dict=False)[0].float()
                x0 = schedule.to_x0(native, x, tb)
            if last:
                inputs.append(x.detach())
            else:
                nxt = torch.full((b,), step_times[k + 1], device=noise.device)
                x = schedule.add_noise(x0.detach(), randn(tuple(x0.shape)), nxt)
        outs.append(x0)
        if on_chunk is not None:
            on_chunk(c, x0.detach())
        if c < n_chunks - 1 or on_chunk is not None:  # re-encode the clean chunk at t = 0 as context
            with torch.no_grad(), autocast():
                zero = schedule.model_timestep(torch.zeros(b, device=noise.device)).to(x0.dtype)
                model(x0.detach(), zero, prompt_embeds.to(x0.dtype), kv_cache=cache, update_cache=True,
                      return_dict=False)
            if max_context is not None:
                cache.keep_last(max_context, tpf)
    return RolloutResult(torch.cat(outs, dim=2), inputs, cache)
