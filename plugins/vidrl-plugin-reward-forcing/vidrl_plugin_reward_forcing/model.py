"""Chunk-wise autoregressive (block-causal) version of diffusers' ``WanTransformer3DModel``.

``CausalWanTransformer3DModel`` is a subclass with the same weights and two extra config fields
(``chunk_size``: latent frames per chunk, 1 = frame-wise; ``causal``: the default attention pattern). Only the
self-attention changes: each block's ``attn1`` gets :class:`BlockCausalAttnProcessor`, which

* masks attention block-causally: a token of latent frame ``f`` sees the tokens of frame ``g`` iff
  ``g // chunk_size <= f // chunk_size`` (its own chunk and every earlier one; Self-Forcing / CausVid);
* reads the keys/values of earlier frames from a :class:`KVCache` (streaming) and optionally appends the current
  frames' keys/values to it (the clean context re-encoded at t = 0 after a chunk is generated, Self-Forcing).

With ``causal=False`` and no cache the forward is the teacher's forward (test: ``test_full_mask_is_teacher``).
The per-chunk noise level is a per-frame timestep ``[B, F]``, fed to the model as Wan 2.2's per-token timestep.
RoPE positions are absolute (``frame_offset`` = latent frames already in the cache), so a streamed chunk sees the
same positions as in a full-sequence forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from .errors import RewardForcingError

# a saved pipeline names this module as the transformer's library; diffusers' loader picks the load method by
# looking the base classes up in that module, so ModelMixin must be importable from here
__all__ = ["CausalWanTransformer3DModel", "KVCache", "ModelMixin", "bidirectional", "block_causal_mask"]


# ----------------------------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Per-layer self-attention keys/values ``[B, L, heads, head_dim]`` of the frames generated so far
    (normed, rotated: exactly what attention consumes), plus how many latent frames they cover."""

    num_layers: int
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    num_frames: int = 0  # latent frames covered
    start_frame: int = 0  # absolute index of the first cached frame (> 0 once the window slides)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.num_frames

    def keep_last(self, frames: int, tokens_per_frame: int) -> None:
        """Slide the attention window: keep only the last ``frames`` cached frames (RoPE stays absolute)."""
        drop = self.num_frames - frames
        if drop <= 0:
            return
        cut = drop * tokens_per_frame
        self.keys = [k[:, cut:] if k is not None else None for k in self.keys]
        self.values = [v[:, cut:] if v is not None else None for v in self.values]
        self.num_frames -= drop
        self.start_frame += drop


@dataclass
class _LayerContext:
    """What one self-attention layer needs for a forward: RoPE of the current tokens, the mask over
    [cached | current] keys, the cache snapshot taken at call time (so a recomputation under gradient
    checkpointing reads the same tensors) and where to write the current keys/values (or nowhere)."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    past_k: Tensor | None
    past_v: Tensor | None
    write: tuple[KVCache, int] | None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's interleaved-pair rotary embedding on ``[B, L, heads, d]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


class BlockCausalAttnProcessor:
    """Self-attention processor of the causal model (see the module docstring). The layer context comes in
    through the ``rotary_emb`` argument, which ``WanTransformerBlock`` hands to ``attn1`` only."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: Any = None) -> Tensor:
        ctx = rotary_emb
        if not isinstance(ctx, _LayerContext):
            raise RewardForcingError("BlockCausalAttnProcessor is driven by CausalWanTransformer3DModel.forward")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = _rotate(query.unflatten(2, (attn.heads, -1)), ctx.cos, ctx.sin)
        key = _rotate(key.unflatten(2, (attn.heads, -1)), ctx.cos, ctx.sin)
        value = value.unflatten(2, (attn.heads, -1))
        if ctx.past_k is not None:
            key = torch.cat([ctx.past_k, key], dim=1)
            value = torch.cat([ctx.past_v, value], dim=1)
        if ctx.write is not None:
            cache, layer = ctx.write
            cache.keys[layer], cache.values[layer] = key, value
        out = dispatch_attention_fn(query, key, value, attn_mask=ctx.mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def block_causal_mask(q_frames: range, k_frames: range, tokens_per_frame: int, chunk_size: int,
                      device: torch.device | str = "cpu") -> Tensor | None:
    """Boolean ``[Lq, Lk]`` (True = may attend): query frame ``f`` sees key frame ``g`` iff
    ``g // chunk_size <= f // chunk_size``. ``None`` when nothing is masked (plain attention)."""
    qc = torch.tensor(list(q_frames), device=device) // chunk_size
    kc = torch.tensor(list(k_frames), device=device) // chunk_size
    allowed = kc.view(1, -1) <= qc.view(-1, 1)  # [Fq, Fk]
    if bool(allowed.all()):
        return None
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# ----------------------------------------------------------------------------------------------- the model
class CausalWanTransformer3DModel(WanTransformer3DModel):
    """``WanTransformer3DModel`` with block-causal self-attention over latent-frame chunks and a KV cache.

    Extra config: ``chunk_size`` (latent frames per autoregressive chunk; 1 = frame-wise, Self-Forcing uses 3
    of 21) and ``causal`` (default attention of a plain forward; :func:`bidirectional` switches it off).
    """

    @register_to_config
    def __init__(self, patch_size: tuple[int, ...] = (1, 2, 2), num_attention_heads: int = 40,
                 attention_head_dim: int = 128, in_channels: int = 16, out_channels: int = 16, text_dim: int = 4096,
                 freq_dim: int = 256, ffn_dim: int = 13824, num_layers: int = 40, cross_attn_norm: bool = True,
                 qk_norm: str | None = "rms_norm_across_heads", eps: float = 1e-6, image_dim: int | None = None,
                 added_kv_proj_dim: int | None = None, rope_max_seq_len: int = 1024,
                 pos_embed_seq_len: int | None = None, chunk_size: int = 1, causal: bool = True) -> None:
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
                         pos_embed_seq_len=pos_embed_seq_len)
        if chunk_size < 1:
            raise RewardForcingError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
        if patch_size[0] != 1:
            raise RewardForcingError("the causal Wan model needs a temporal patch size of 1 (every Wan2.1 model)")
        self.use_causal_mask = causal
        for block in self.blocks:
            block.attn1.set_processor(BlockCausalAttnProcessor())

    # ------------------------------------------------------------------ construction from the teacher
    @classmethod
    def from_teacher(cls, teacher: WanTransformer3DModel, chunk_size: int = 1) -> CausalWanTransformer3DModel:
        """The same architecture with the bidirectional teacher's weights (strict state-dict load)."""
        cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_") and k not in ("chunk_size", "causal")}
        model = cls(**cfg, chunk_size=chunk_size)
        model.load_state_dict(teacher.state_dict(), strict=True)
        p = next(teacher.parameters())
        model = model.to(device=p.device)
        return model if p.dtype == torch.float32 else model.to(dtype=p.dtype)

    # ------------------------------------------------------------------ helpers
    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def _rope(self, first: int, frames: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        end = first + frames
        if end > self.config.rope_max_seq_len:
            raise RewardForcingError(f"frame position {end} exceeds the model's rope_max_seq_len "
                                     f"{self.config.rope_max_seq_len}: stream with a smaller max_context or fewer frames")
        shape_only = torch.empty((1, 1, end, height, width), device="meta")
        cos, sin = self.rope(shape_only)
        cut = first * self.tokens_per_frame(height, width)
        return cos[:, cut:].to(device), sin[:, cut:].to(device)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict[str, Any] | None = None, *, frame_offset: int | None = None,
                kv_cache: KVCache | None = None, update_cache: bool = False,
                causal: bool | None = None) -> Any:
        """Native output (flow velocity) of the frames in ``hidden_states`` ``[B, C, F, H, W]``.

        ``timestep``: ``[B]`` (one level) or ``[B, F]`` (one level per latent frame, e.g. per chunk).
        ``kv_cache``: earlier frames' keys/values to attend to; ``frame_offset`` defaults to the frames they
        cover (absolute positions). ``update_cache``: append this call's keys/values to the cache.
        ``causal``: block-causal mask (default: the model's ``use_causal_mask``); ``False`` = full attention.
        """
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            raise RewardForcingError("attention_kwargs['scale'] (LoRA scale) is not supported by the causal model")
        if encoder_hidden_states_image is not None:
            raise RewardForcingError("the causal Wan model is text-to-video only (no image conditioning)")
        b, _, f, h, w = hidden_states.shape
        _, ph, pw = self.config.patch_size
        tpf = self.tokens_per_frame(h, w)
        offset = (kv_cache.end_frame if kv_cache is not None else 0) if frame_offset is None else frame_offset
        use_mask = self.use_causal_mask if causal is None else causal
        cos, sin = self._rope(offset, f, h, w, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        ts_seq_len = None
        if timestep.ndim == 2:
            if bool((timestep == timestep[:, :1]).all()):
                timestep = timestep[:, 0]
            else:  # one level per frame -> per token (Wan 2.2's per-token timestep path)
                timestep = timestep.repeat_interleave(tpf, dim=1)
                ts_seq_len = timestep.shape[1]
                timestep = timestep.flatten()
        temb, timestep_proj, text, _ = self.condition_embedder(timestep, encoder_hidden_states, None,
                                                               timestep_seq_len=ts_seq_len)
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))

        q_frames = range(offset, offset + f)
        past_start = kv_cache.start_frame if kv_cache is not None and kv_cache.num_frames else offset
        k_frames = range(past_start, offset + f)
        mask = block_causal_mask(q_frames, k_frames, tpf, self.config.chunk_size, x.device) if use_mask else None
        if update_cache and kv_cache is None:
            raise RewardForcingError("update_cache needs a kv_cache")
        for i, block in enumerate(self.blocks):
            past_k = kv_cache.keys[i] if kv_cache is not None else None
            past_v = kv_cache.values[i] if kv_cache is not None else None
            lctx = _LayerContext(cos, sin, mask, past_k, past_v, (kv_cache, i) if update_cache else None)
            if torch.is_grad_enabled() and self.gradient_checkpointing and not update_cache:
                x = self._gradient_checkpointing_func(block, x, text, timestep_proj, lctx)
            else:
                x = block(x, text, timestep_proj, lctx)
        if update_cache:
            assert kv_cache is not None
            if kv_cache.num_frames == 0:
                kv_cache.start_frame = offset
            kv_cache.num_frames += f

        if temb.ndim == 3:
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, f, h // ph, w // pw, 1, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return (out,) if not return_dict else Transformer2DModelOutput(sample=out)


@contextlib.contextmanager
def bidirectional(model: Any) -> Iterator[Any]:
    """Run a causal model with full attention inside the block (the teacher's computation); no-op for others."""
    base = getattr(model, "base_model", model)  # peft wrappers
    target = base if isinstance(base, CausalWanTransformer3DModel) else model
    if not isinstance(target, CausalWanTransformer3DModel):
        yield model
        return
    old = target.use_causal_mask
    target.use_causal_mask = False
    try:
        yield model
    finally:
        target.use_causal_mask = old


def is_causal(model: Any) -> bool:
    return isinstance(getattr(model, "module", model), CausalWanTransformer3DModel)
