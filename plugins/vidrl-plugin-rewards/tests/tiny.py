"""Tiny reward-model folders in the Hub layout: the real architectures from small configs, random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def save_clip_tokenizer(folder: Path, max_length: int = 64) -> None:
    """A CLIP BPE tokenizer with a character-level vocabulary (no merges): real code, tiny files."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)


def clip_config(vocab_size: int = 516, image_size: int = 28, patch: int = 7, act: str = "quick_gelu"):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act=act),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=16)


def save_image_processor(folder: Path, size: int = 28) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)


def save_tiny_clip(folder: Path, seed: int = 0, act: str = "quick_gelu") -> Path:
    """A ``CLIPModel`` folder (config + safetensors) with tokenizer and image processor: the layout of
    openai/clip-vit-large-patch14 and yuvalkirstain/PickScore_v1."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    CLIPModel(clip_config(act=act)).save_pretrained(folder)
    save_clip_tokenizer(folder)
    save_image_processor(folder)
    return folder


def frames(b: int = 2, f: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Videos ``[B, 3, F, H, W]`` in [-1, 1] on the uint8 grid (so PIL-based processors see the same values)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, 3, f, h, w), generator=g).float() / 127.5 - 1)


def open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """Write a transformers ``CLIPModel`` under open_clip's parameter names (as HPS_v2_compressed.pt stores
    them): packed ``in_proj`` q/k/v, ``proj``/``text_projection`` as ``[D, E]`` matrices."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    towers = {"vision_model": "visual.transformer", "text_model": "transformer"}
    leaf = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
    for tower, oc in towers.items():
        n = len(getattr(model, tower).encoder.layers)
        for i in range(n):
            p = f"{tower}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                out[f"{oc}.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{p}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")])
                for hf, ocn in leaf.items():
                    out[f"{oc}.resblocks.{i}.{ocn}.{kind}"] = sd[f"{p}{hf}.{kind}"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


def save_tiny_hps(folder: Path, filename: str = "HPS_v2_compressed.pt", seed: int = 1):
    """xswu/HPSv2 layout (an open_clip checkpoint file) + a folder with the CLIP config, tokenizer and image
    processor (the laion/CLIP-ViT-H-14 layout). Returns (checkpoint folder, config folder, reference model)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    ref = CLIPModel(clip_config(act="gelu")).eval()  # open_clip ViT-H-14 uses GELU
    ckpt = folder / "hps"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_state_dict(ref).items()}}, ckpt / filename)
    base = folder / "clip-h14"
    ref.config.save_pretrained(base)
    save_clip_tokenizer(base)
    save_image_processor(base)
    return ckpt, base, ref


def save_aesthetic_head(folder: Path, dim: int = 16, seed: int = 2) -> Path:
    """trl-lib/ddpo-aesthetic-predictor layout: ``aesthetic-model.pth`` (torch state dict of the MLP)."""
    from vidrl_plugin_rewards.clip import AestheticHead

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticHead(dim).state_dict(), folder / "aesthetic-model.pth")
    return folder
