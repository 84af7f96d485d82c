"""Streaming generation: chunks of latent frames from the causal generator, decoded as they arrive.

:class:`StreamingWanDecoder` keeps the causal Wan VAE's per-layer feature cache between calls, so decoding a video
latent frame by latent frame gives the same pixels as one ``vae.decode`` of the whole video (test:
``test_streaming_decode_equals_full_decode``) at a constant cost per frame. It drives diffusers'
``AutoencoderKLWan.decoder`` the way ``AutoencoderKLWan._decode`` does, one latent frame per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .rollout import self_rollout, student_timesteps


class StreamingWanDecoder:
    """Incremental decoder of normalised Wan latents ``[B, C, f, H, W]`` (any number of frames per call)."""

    def __init__(self, policy: Any):
        self.policy, self.vae = policy, policy.vae
        self.cache: list[Any] = [None] * self.vae._cached_conv_counts["decoder"]
        self.first = True

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        mean, std = self.policy._latent_stats(latents)
        z = self.vae.post_quant_conv((latents * std + mean).to(next(self.vae.parameters()).dtype))
        outs = []
        for i in range(z.shape[2]):
            idx = [0]
            outs.append(self.vae.decoder(z[:, :, i:i + 1], feat_cache=self.cache, feat_idx=idx,
                                         first_chunk=self.first))
            self.first = False
        out = torch.cat(outs, dim=2)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1, 1)


@dataclass
class StreamStats:
    chunk_seconds: list[float] = field(default_factory=list)  # wall time at which each chunk's pixels were ready
    frames: int = 0

    @property
    def time_to_first_chunk(self) -> float:
        return self.chunk_seconds[0]

    @property
    def chunks_per_second(self) -> float:
        return len(self.chunk_seconds) / self.chunk_seconds[-1]


def stream(policy: Any, prompt: str, latent_frames: int, *, seed: int = 0, num_steps: int = 4,
           max_context: int | None = None, on_pixels: Callable[[int, Tensor], None] | None = None) -> StreamStats:
    """Generate ``latent_frames`` latent frames chunk by chunk and decode each chunk at once; ``on_pixels(i, px)``
    receives chunk ``i``'s pixel frames ``[3, f, H, W]`` as soon as they exist."""
    model = policy.transformer
    c, _, h, w = policy.latent_shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, c, latent_frames, h, w, generator=g)
    emb, _ = policy.encode_prompts([prompt])
    decoder = StreamingWanDecoder(policy)
    stats = StreamStats()
    t0 = time.perf_counter()

    def emit(i: int, x0: Tensor) -> None:
        px = decoder(x0)
        stats.chunk_seconds.append(time.perf_counter() - t0)
        stats.frames += px.shape[2]
        if on_pixels is not None:
            on_pixels(i, px[0])

    with torch.no_grad():
        self_rollout(model, policy.schedule, emb, noise, student_timesteps(policy.schedule, num_steps),
                     randn=lambda s: torch.randn(*s, generator=g), max_context=max_context, on_chunk=emit)
    return stats

