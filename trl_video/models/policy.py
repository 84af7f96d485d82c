"""Policy adapter over diffusers video models (Wan, CogVideoX).

Canonical latent layout is diffusers' ``[B, C, F, H, W]``; pixels are ``[B, C, F, H, W]`` in [-1, 1].
Latents handed to the transformer / samplers are *normalised* (Wan: per-channel mean/std from the VAE
config; CogVideoX: times ``scaling_factor``), as in the diffusers pipelines.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TrlVideoError
from .schedule import NoiseSchedule

FAMILIES = {
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
}


class VideoPolicy(nn.Module):
    """Everything a method needs from the video model, independent of the family."""

    def __init__(self, family: str, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, scheduler: Any, *, num_frames: int, height: int, width: int,
                 max_text_len: int, source: str = ""):
        super().__init__()
        if family not in ("wan", "cogvideox"):
            raise TrlVideoError(f"unknown model family '{family}' (expected wan or cogvideox)")
        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.num_frames, self.height, self.width = num_frames, height, width
        self.max_text_len = max_text_len
        self.source = source
        self._prompt_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._frozen_reference: nn.Module | None = None
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        if family == "wan":
            self.schedule = NoiseSchedule("flow", shift=float(getattr(scheduler.config, "shift", 1.0)))
        else:
            if scheduler.config.prediction_type != "v_prediction":
                raise TrlVideoError("CogVideoX scheduler must use prediction_type='v_prediction'")
            self.schedule = NoiseSchedule("v", alphas_cumprod=scheduler.alphas_cumprod.clone().float())

    # ------------------------------------------------------------------ shapes
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        cfg = self.vae.config
        if self.family == "wan":
            tf, sf, ch = cfg.scale_factor_temporal, cfg.scale_factor_spatial, cfg.z_dim
        else:
            tf, sf, ch = cfg.temporal_compression_ratio, 2 ** (len(cfg.block_out_channels) - 1), cfg.latent_channels
        return (ch, (self.num_frames - 1) // tf + 1, self.height // sf, self.width // sf)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Frozen text embeddings ``[B, L, D]`` and mask ``[B, L]``; cached per prompt string."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", max_length=self.max_text_len, truncation=True,
                                 return_tensors="pt")
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            emb = self.text_encoder(ids, attention_mask=mask).last_hidden_state
            emb = emb * mask.unsqueeze(-1).to(emb.dtype)  # as the diffusers pipelines: zero the padding
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (emb[i].detach(), mask[i])
        embs = torch.stack([self._prompt_cache[p][0] for p in prompts])
        masks = torch.stack([self._prompt_cache[p][1] for p in prompts])
        return embs, masks

    # ------------------------------------------------------------------ prediction
    def predict(self, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, transformer: nn.Module | None = None) -> Tensor:
        """Native output (flow velocity for Wan, v for CogVideoX) at noisy latents ``x_t`` and times ``t``."""
        net = transformer if transformer is not None else self.transformer
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        ts = self.schedule.model_timestep(t).to(x_t.dtype)
        emb = prompt_embeds.to(x_t.dtype)
        if self.family == "wan":
            return net(hidden_states=x_t, timestep=ts, encoder_hidden_states=emb, return_dict=False)[0]
        out = net(hidden_states=x_t.permute(0, 2, 1, 3, 4), encoder_hidden_states=emb, timestep=ts,
                  image_rotary_emb=self._cogvideox_rotary(x_t), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)

    def _cogvideox_rotary(self, x_t: Tensor) -> tuple[Tensor, Tensor] | None:
        """3-D RoPE for CogVideoX models that use it (2b-1.5/5b), computed by the diffusers pipeline's own
        helper; the tiny preset uses learned positional embeddings instead."""
        cfg = self.transformer.config
        if not getattr(cfg, "use_rotary_positional_embeddings", False):
            return None
        key = tuple(x_t.shape[2:])
        cache = self.__dict__.setdefault("_rope_cache", {})
        if key not in cache:
            from types import SimpleNamespace

            from diffusers import CogVideoXPipeline

            sf = 2 ** (len(self.vae.config.block_out_channels) - 1)
            shim = SimpleNamespace(transformer=self.transformer, vae_scale_factor_spatial=sf)
            cache[key] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                shim, height=key[2] * sf, width=key[3] * sf, num_frames=key[0], device=x_t.device)
        return cache[key]

    def predict_guided(self, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, guidance_scale: float,
                       transformer: nn.Module | None = None) -> Tensor:
        """Classifier-free guidance on the native output, ``u + w (c - u)``, with the unconditional branch on the
        empty prompt (as the diffusers pipelines), both branches in one batch; ``w = 1`` is :meth:`predict`."""
        if guidance_scale == 1.0:
            return self.predict(x_t, t, prompt_embeds, transformer)
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        null = self.encode_prompts([""] * x_t.shape[0])[0].to(prompt_embeds)
        cond, uncond = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([prompt_embeds, null]),
                                    transformer).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def predict_x0(self, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, transformer: nn.Module | None = None) -> Tensor:
        return self.schedule.to_x0(self.predict(x_t, t, prompt_embeds, transformer), x_t, t)

    # ------------------------------------------------------------------ reference / LoRA
    @property
    def uses_lora(self) -> bool:
        return bool(getattr(self.transformer, "peft_config", None))

    def add_lora(self, rank: int, alpha: float | None = None, target_modules: list[str] | None = None,
                 init_seed: int | None = None) -> None:
        """Add a LoRA adapter of this rank (alpha defaults to the rank) through ``trl.get_peft_config``."""
        from trl import get_peft_config

        from ..config import model_config_for

        self.add_adapter(get_peft_config(model_config_for("", lora_r=rank, lora_alpha=alpha,
                                                          lora_target_modules=target_modules)), init_seed)

    def add_adapter(self, lora_config: Any, init_seed: int | None = None) -> None:
        """Freeze the base transformer and add a peft ``LoraConfig`` adapter (the only trainable weights)."""
        self.transformer.requires_grad_(False)
        if init_seed is not None:
            torch.manual_seed(init_seed)
        self.transformer.add_adapter(lora_config)

    def freeze_reference(self) -> None:
        """Full fine-tuning needs a frozen copy for the reference; LoRA uses the base (adapter disabled)."""
        if not self.uses_lora and self._frozen_reference is None:
            ref = copy.deepcopy(self.transformer)
            ref.requires_grad_(False)
            ref.eval()
            object.__setattr__(self, "_frozen_reference", ref)  # not a submodule: not saved, not trained

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Yield the frozen reference network: the base with the adapter disabled (LoRA, no copy in
        memory) or the frozen copy made by :meth:`freeze_reference` (full fine-tuning)."""
        if self.uses_lora:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
        else:
            if self._frozen_reference is None:
                raise TrlVideoError("no reference model: call freeze_reference() before training (full fine-tuning)")
            yield self._frozen_reference

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ VAE
    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        shape = (1, -1, 1, 1, 1)
        if self.family == "wan":
            mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
            std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
            return mean, std
        sf = float(cfg.scaling_factor)
        return torch.zeros((), dtype=like.dtype, device=like.device), torch.tensor(1.0 / sf, dtype=like.dtype)

    def encode_video(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, C, F, H, W]`` in [-1, 1] -> normalised latents."""
        dist = self.vae.encode(pixels.to(self.device)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> pixels ``[B, C, F, H, W]`` clamped to [-1, 1] (differentiable)."""
        mean, std = self._latent_stats(latents)
        z = latents * std + mean
        out = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
        return out.clamp(-1, 1)

    # ------------------------------------------------------------------ save / load
    def pipeline(self, transformer: nn.Module | None = None):
        from diffusers import CogVideoXPipeline, WanPipeline

        cls = WanPipeline if self.family == "wan" else CogVideoXPipeline
        return cls(tokenizer=self.tokenizer, text_encoder=self.text_encoder, transformer=transformer or self.transformer,
                   vae=self.vae, scheduler=self.scheduler)

    def save_pretrained(self, path: str | Path, merge_lora: bool = True, extra_meta: dict[str, Any] | None = None) -> None:
        """Write a diffusers pipeline folder (``WanPipeline``/``CogVideoXPipeline.from_pretrained`` loads it).
        LoRA adapters are merged into the saved transformer and also written on their own."""
        path = Path(path)
        transformer = self.transformer
        if self.uses_lora:
            from peft.utils import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(self.transformer)
            cls = self.pipeline().__class__
            cls.save_lora_weights(path, transformer_lora_layers=lora_state, safe_serialization=True)
            if merge_lora:
                transformer = copy.deepcopy(self.transformer)
                transformer.fuse_lora() if hasattr(transformer, "fuse_lora") else None
                transformer.unload_lora() if hasattr(transformer, "unload_lora") else None
        self.pipeline(transformer).save_pretrained(path, safe_serialization=True)
        meta = {"family": self.family, "num_frames": self.num_frames, "height": self.height, "width": self.width,
                "max_text_len": self.max_text_len, **(extra_meta or {})}
        (path / "trl_video.json").write_text(json.dumps(meta, indent=2))


def _load_pipeline_folder(path: Path, **overrides: Any) -> VideoPolicy:
    index = json.loads((path / "model_index.json").read_text())
    family = FAMILIES.get(index.get("_class_name", ""))
    if family is None:
        raise TrlVideoError(f"{path}/model_index.json: unsupported pipeline class '{index.get('_class_name')}' "
                            f"(supported: {', '.join(FAMILIES)})")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), trust_remote_code=False)
    meta_path = path / "trl_video.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return _from_pipeline(pipe, family, meta, str(path), **overrides)


def _from_pipeline(pipe: Any, family: str, meta: dict[str, Any], source: str, **overrides: Any) -> VideoPolicy:
    defaults = {"wan": dict(num_frames=81, height=480, width=832, max_text_len=512),
                "cogvideox": dict(num_frames=49, height=480, width=720, max_text_len=226)}[family]
    dims = {k: overrides.get(k) or meta.get(k) or defaults[k] for k in defaults}
    return VideoPolicy(family, pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                       source=source, **dims)


def load_policy(model: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> VideoPolicy:
    """Load a policy from a preset name (``tiny-wan``), a local diffusers folder, or a hub id."""
    from .presets import PRESETS, build_preset

    if model in PRESETS:
        policy = build_preset(model, **overrides)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise TrlVideoError(f"model folder '{path}' has no model_index.json (not a diffusers pipeline folder)")
            policy = _load_pipeline_folder(path, **overrides)
        elif model.count("/") == 1 and not model.startswith((".", "/")):
            policy = _load_hub(model, dtype, **overrides)
        else:
            raise TrlVideoError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a folder, nor a hub id")
    return policy.to(dtype=dtype) if dtype != torch.float32 else policy


def _load_hub(repo_id: str, dtype: torch.dtype, **overrides: Any) -> VideoPolicy:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        raise TrlVideoError(f"cannot load model '{repo_id}' from the hub: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}") from exc
    family = FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise TrlVideoError(f"model '{repo_id}' is a {type(pipe).__name__}; supported: {', '.join(FAMILIES)}")
    return _from_pipeline(pipe, family, {}, repo_id, **overrides)
