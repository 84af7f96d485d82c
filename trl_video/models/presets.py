"""Model presets.

* ``tiny-wan`` / ``tiny-cogvideox``: the project's own small models trained on the embedded world
  (``trl_video/assets/<name>``, reproduced by ``trl-video pretrain``). If the folder is missing
  (e.g. while pretraining them) the random-weight architecture is built instead, with a warning.
* ``tiny-wan-random`` / ``tiny-cogvideox-random``: same real diffusers architectures, random weights.
* ``wan2.1-t2v-1.3b``, ``cogvideox-2b``, ``cogvideox1.5-5b``: aliases of the real hub models (GPU users).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .. import world

ASSETS = Path(__file__).resolve().parent.parent / "assets"

HUB_ALIASES = {
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "cogvideox-2b": "THUDM/CogVideoX-2b",
    "cogvideox1.5-5b": "THUDM/CogVideoX1.5-5B",
}
PRESETS = ("tiny-wan", "tiny-cogvideox", "tiny-wan-random", "tiny-cogvideox-random", *HUB_ALIASES)

TINY_TEXT_LEN = 16
TINY_TEXT_DIM = 32


def tiny_wan_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True], latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
                           scale_factor_temporal=2, scale_factor_spatial=4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                        in_channels=8, out_channels=8, text_dim=TINY_TEXT_DIM, freq_dim=64,
                                        ffn_dim=128, num_layers=4, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler)


def tiny_cogvideox_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(16, 32, 32),
                                 latent_channels=8, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4, sample_height=32, sample_width=32, scaling_factor=1.0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=16, in_channels=8,
                                              out_channels=8, time_embed_dim=64, text_embed_dim=TINY_TEXT_DIM,
                                              num_layers=4, sample_width=8, sample_height=8, sample_frames=9,
                                              patch_size=2, temporal_compression_ratio=4,
                                              max_text_seq_length=TINY_TEXT_LEN)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=3.0)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler)


def build_random(family: str, seed: int = 0, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None):
    from .policy import VideoPolicy
    from .text import build_text_encoder, build_tokenizer

    comps = tiny_wan_components(seed) if family == "wan" else tiny_cogvideox_components(seed)
    tokenizer = build_tokenizer(world.WORDS, TINY_TEXT_LEN)
    text_encoder = build_text_encoder(family, vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, seed=seed + 1)
    return VideoPolicy(family, comps["transformer"], comps["vae"], text_encoder, tokenizer, comps["scheduler"],
                       num_frames=num_frames or world.NUM_FRAMES, height=height or world.SIZE,
                       width=width or world.SIZE,
                       max_text_len=TINY_TEXT_LEN, source=f"tiny-{family}-random")


def build_preset(name: str, **overrides: Any):
    from .policy import _load_hub, _load_pipeline_folder

    dtype = overrides.pop("dtype", torch.float32)
    if name in HUB_ALIASES:
        return _load_hub(HUB_ALIASES[name], dtype, **overrides)
    family = "wan" if "wan" in name else "cogvideox"
    if name.endswith("-random"):
        policy = build_random(family, seed=int(overrides.get("seed", 0) or 0), num_frames=overrides.get("num_frames"),
                              height=overrides.get("height"), width=overrides.get("width"))
        return policy.to(dtype=dtype) if dtype != torch.float32 else policy
    folder = ASSETS / name
    if (folder / "model_index.json").exists():
        policy = _load_pipeline_folder(folder, dtype=dtype, **overrides)
        policy.source = name
        return policy
    warnings.warn(f"preset '{name}': no trained weights at {folder}; using random weights "
                  f"(run `trl-video pretrain --family {family}` to build them)", stacklevel=2)
    policy = build_random(family, num_frames=overrides.get("num_frames"), height=overrides.get("height"),
                          width=overrides.get("width"))
    return policy.to(dtype=dtype) if dtype != torch.float32 else policy
