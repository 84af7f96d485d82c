"""Policy adapter over diffusers video models (Wan, CogVideoX).

Canonical latent layout is diffusers' ``[B, C, F, H, W]``; pixels are ``[B, C, F, H, W]`` in [-1, 1].
Latents handed to the transformer / samplers are *normalised* (Wan: per-channel mean/std from the VAE
config; CogVideoX: times ``scaling_factor``), as in the diffusers pipelines.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
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


def add_lora_adapter(module: nn.Module, lora_config: Any) -> None:
    """Freeze ``module`` and add a peft ``LoraConfig`` adapter (then its only trainable weights) through diffusers'
    ``PeftAdapterMixin.add_adapter``."""
    from diffusers.loaders import PeftAdapterMixin

    if not isinstance(module, PeftAdapterMixin):
        raise TrlVideoError(f"{type(module).__name__} cannot take a LoRA adapter (not a diffusers PeftAdapterMixin)")
    module.requires_grad_(False)
    module.add_adapter(lora_config)


class VideoPolicy(nn.Module):
    """Everything a method needs from the video model, independent of the family."""

    # diffusers / transformers modules: their configs and methods are untyped (nn.Module.__getattr__ otherwise)
    transformer: Any
    vae: Any
    text_encoder: Any

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
        # text embeddings: a bounded LRU on the CPU (a 512x4096 fp32 Wan embedding is 8 MiB), optionally in front
        # of a pre-encoded, memory-mapped embedding dataset (`trl-video encode-prompts`)
        self._prompt_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.text_cache_size = 1024
        self.embedding_store: PromptEmbeddingStore | None = None
        self.text_encoder_calls = 0  # prompts run through the text encoder (the store and cache avoid it)
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
    def configure_text_cache(self, size: int, prompt_embeds: str | None = None) -> None:
        """Bound the LRU cache to ``size`` prompts (0: no cache) and read pre-encoded embeddings from the
        dataset folder ``prompt_embeds`` when given."""
        self.text_cache_size = size
        while len(self._prompt_cache) > size:
            self._prompt_cache.popitem(last=False)
        if prompt_embeds:
            self.embedding_store = PromptEmbeddingStore(prompt_embeds, self)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_text_len, truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        emb = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        self.text_encoder_calls += len(prompts)
        return emb * mask.unsqueeze(-1).to(emb.dtype), mask  # as the diffusers pipelines: zero the padding

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Frozen text embeddings ``[B, L, D]`` and mask ``[B, L]`` on the policy's device. Looked up in the LRU
        cache (CPU), then the pre-encoded store, then computed by the text encoder."""
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for p in dict.fromkeys(prompts):
            hit = self._prompt_cache.get(p)
            if hit is not None:
                self._prompt_cache.move_to_end(p)
                found[p] = hit
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing and self.embedding_store is not None:
            found.update(self.embedding_store.lookup(missing))
            missing = [p for p in missing if p not in found]
        if missing:
            emb, mask = self._encode_text(missing)
            found.update({p: (emb[i].cpu(), mask[i].cpu()) for i, p in enumerate(missing)})
        if self.text_cache_size > 0:
            for p in dict.fromkeys(prompts):
                if p not in self._prompt_cache:
                    self._prompt_cache[p] = found[p]
            while len(self._prompt_cache) > self.text_cache_size:
                self._prompt_cache.popitem(last=False)
        device = self.device
        embs = torch.stack([found[p][0] for p in prompts]).to(device)
        masks = torch.stack([found[p][1] for p in prompts]).to(device)
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
        from ..config import lora_config_for

        self.add_adapter(lora_config_for(rank, target_modules, alpha), init_seed)

    def add_adapter(self, lora_config: Any, init_seed: int | None = None) -> None:
        """Freeze the base transformer and add a peft ``LoraConfig`` adapter (the only trainable weights)."""
        if init_seed is not None:
            torch.manual_seed(init_seed)
        add_lora_adapter(self.transformer, lora_config)

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

    def save_pretrained(self, path: str | Path, merge_lora: bool = True, extra_meta: dict[str, Any] | None = None,
                        transformer: Any = None) -> None:
        """Write a diffusers pipeline folder (``WanPipeline``/``CogVideoXPipeline.from_pretrained`` loads it).
        LoRA adapters are merged into the saved transformer and also written on their own. ``transformer``:
        save this (unsharded) copy instead of ``self.transformer`` (an FSDP-sharded run exports a gathered copy)."""
        path = Path(path)
        transformer = transformer if transformer is not None else self.transformer
        if getattr(transformer, "peft_config", None):
            from peft.utils import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(transformer)
            cls = self.pipeline().__class__
            cls.save_lora_weights(path, transformer_lora_layers=lora_state, safe_serialization=True)
            if merge_lora:
                transformer = copy.deepcopy(transformer)
                transformer.fuse_lora() if hasattr(transformer, "fuse_lora") else None
                transformer.unload_lora() if hasattr(transformer, "unload_lora") else None
        self.pipeline(transformer).save_pretrained(path, safe_serialization=True)
        meta = {"family": self.family, "num_frames": self.num_frames, "height": self.height, "width": self.width,
                "max_text_len": self.max_text_len, **(extra_meta or {})}
        (path / "trl_video.json").write_text(json.dumps(meta, indent=2))


def _load_pipeline_folder(path: Path, dtype: torch.dtype = torch.float32, **overrides: Any) -> VideoPolicy:
    index = json.loads((path / "model_index.json").read_text())
    family = FAMILIES.get(index.get("_class_name", ""))
    if family is None:
        raise TrlVideoError(f"{path}/model_index.json: unsupported pipeline class '{index.get('_class_name')}' "
                            f"(supported: {', '.join(FAMILIES)})")
    from diffusers import DiffusionPipeline

    libraries = {v[0] for v in index.values() if isinstance(v, list) and v and isinstance(v[0], str)}
    if libraries - {"diffusers", "transformers"}:
        # a component class from a trl-video plugin (e.g. Reward-Forcing's causal transformer): diffusers loads
        # it only once its module is imported, which loading the installed plugins does
        from ..plugins import get_registry

        get_registry()
    # torch_dtype: diffusers keeps each model's `_keep_in_fp32_modules` (e.g. Wan's norms) in fp32
    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, trust_remote_code=False)
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
    """Load a policy from a preset name (``tiny-wan``), a local diffusers folder, or a hub id, with its weights
    in ``dtype`` (diffusers' ``torch_dtype``; the trainer passes the recipe's mixed-precision dtype and then
    keeps the trainable parameters in fp32)."""
    from .presets import PRESETS, build_preset

    if model in PRESETS:
        policy = build_preset(model, dtype=dtype, **overrides)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise TrlVideoError(f"model folder '{path}' has no model_index.json (not a diffusers pipeline folder)")
            policy = _load_pipeline_folder(path, dtype=dtype, **overrides)
        elif model.count("/") == 1 and not model.startswith((".", "/")):
            policy = _load_hub(model, dtype, **overrides)
        else:
            raise TrlVideoError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a folder, nor a hub id")
    return policy


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


# ------------------------------------------------------------------------------------------------ pre-encoded text
EMBEDDINGS_META = "trl_video_embeddings.json"


def encode_prompt_dataset(policy: VideoPolicy, prompts: list[str], out: str | Path, batch_size: int = 32,
                          dtype: str = "float16") -> int:
    """Run the text encoder once over ``prompts`` (deduplicated, plus the empty prompt used by CFG) and save an
    HF dataset (save_to_disk) with columns ``prompt``, ``embeds`` (``[n_tokens, D]``, only the unpadded tokens:
    a Wan prompt of 40 tokens stores 40 x 4096 values instead of 512 x 4096) and ``n_tokens``. Returns the
    number of rows."""
    from datasets import Array2D, Dataset, Features, Value

    unique = list(dict.fromkeys(["", *prompts]))
    emb_dim = int(policy._encode_text([""])[0].shape[-1])

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(0, len(unique), batch_size):
            chunk = unique[i:i + batch_size]
            emb, mask = policy._encode_text(chunk)
            for p, e, m in zip(chunk, emb.float().cpu(), mask.cpu()):
                n = int(m.sum())
                yield {"prompt": p, "embeds": e[:n].numpy().astype(dtype), "n_tokens": n}

    features = Features({"prompt": Value("string"), "embeds": Array2D(shape=(None, emb_dim), dtype=dtype),
                         "n_tokens": Value("int32")})
    import hashlib
    import tempfile

    # an explicit fingerprint: datasets would otherwise hash the generator's closure, i.e. the whole model
    key = hashlib.sha256(json.dumps([policy.source, policy.max_text_len, dtype, unique]).encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="trl-video-encode-") as cache:
        ds = Dataset.from_generator(rows, features=features, fingerprint=key, cache_dir=cache)
        out = Path(out)
        ds.save_to_disk(str(out))
    meta = {"model": policy.source, "family": policy.family, "max_text_len": policy.max_text_len, "dim": emb_dim,
            "dtype": dtype, "num_prompts": len(unique)}
    (out / EMBEDDINGS_META).write_text(json.dumps(meta, indent=2))
    return len(unique)


class PromptEmbeddingStore:
    """Pre-encoded prompt embeddings read from a memory-mapped HF dataset: only the rows asked for are read
    (the dataset itself stays on disk); padding is restored to the policy's text length."""

    def __init__(self, path: str | Path, policy: VideoPolicy):
        from datasets import load_from_disk

        path = Path(path)
        meta_file = path / EMBEDDINGS_META
        if not meta_file.exists():
            raise TrlVideoError(f"prompt_embeds: '{path}' is not a pre-encoded embedding dataset (no {EMBEDDINGS_META}; "
                                f"build one with `trl-video encode-prompts`)")
        meta = json.loads(meta_file.read_text())
        if meta.get("family") != policy.family or int(meta.get("max_text_len", -1)) != policy.max_text_len:
            raise TrlVideoError(f"prompt_embeds: '{path}' was encoded for {meta.get('model')} ({meta.get('family')}, "
                                f"text length {meta.get('max_text_len')}); the model is {policy.source} "
                                f"({policy.family}, text length {policy.max_text_len})")
        self.meta, self.max_len = meta, policy.max_text_len
        self.dataset = load_from_disk(str(path)).with_format("torch")
        self.index = {p: i for i, p in enumerate(self.dataset["prompt"])}
        self.reads = 0

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, prompts: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{prompt: (embeds [L, D], mask [L])}`` for the prompts present in the store."""
        rows = [self.index[p] for p in prompts if p in self.index]
        if not rows:
            return {}
        out = {}
        for row in self.dataset.select(rows):
            e = row["embeds"].float()
            n = int(row["n_tokens"])
            emb = torch.zeros(self.max_len, e.shape[-1])
            emb[:n] = e
            mask = torch.zeros(self.max_len, dtype=torch.long)
            mask[:n] = 1
            out[row["prompt"]] = (emb, mask)
        self.reads += len(rows)
        return out
