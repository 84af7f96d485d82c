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


TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 28, "patch_size": 7}


def save_bert_tokenizer(folder: Path) -> int:
    """bert-base-uncased layout (``vocab.txt``) with the world's words; returns the vocabulary size after
    BLIP's two extra tokens."""
    from trl_video import world

    words = sorted({w for c in world.all_captions() for w in c.text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return len(vocab) + 2


def save_tiny_imagereward(folder: Path, seed: int = 3):
    """THUDM/ImageReward layout: ``ImageReward.pt`` (BLIP's parameter names) + ``med_config.json``, and a
    tokenizer folder. Returns (repo folder, tokenizer folder, (vision, text, head) reference modules)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    from vidrl_plugin_rewards.clip import AestheticHead

    tok_dir = folder / "bert"
    vocab = save_bert_tokenizer(tok_dir)
    torch.manual_seed(seed)
    vis = BlipVisionModel(BlipVisionConfig(**TINY_VIT, layer_norm_eps=1e-6)).eval()
    med = {"vocab_size": vocab, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "pad_token_id": 0, "encoder_width": 768, "add_cross_attention": True}
    txt = BlipTextModel(BlipTextConfig(**{k: v for k, v in med.items() if k not in ("encoder_width", "add_cross_attention")},
                                       encoder_hidden_size=32), add_pooling_layer=False).eval()
    head = AestheticHead(24).eval()
    sd: dict[str, torch.Tensor] = {}
    names = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    block = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in vis.state_dict().items():
        if k in names:
            sd["blip.visual_encoder." + names[k]] = v
            continue
        i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
        mod, leaf = rest.rsplit(".", 1)
        sd[f"blip.visual_encoder.blocks.{i}.{block[mod]}.{leaf}"] = v
    sd.update({f"blip.text_encoder.{k}": v for k, v in txt.state_dict().items()})
    sd.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    sd["blip.vision_proj.weight"] = torch.zeros(8, 32)  # in the real file too, unused by the score
    repo = folder / "ImageReward"
    repo.mkdir(parents=True, exist_ok=True)
    torch.save(sd, repo / "ImageReward.pt")
    (repo / "med_config.json").write_text(json.dumps(med))
    return repo, tok_dir, (vis, txt, head)


# ------------------------------------------------------------------------------------------------ VideoReward
QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
#: Qwen2-VL's chat format (default system turn, content parts, generation prompt), written for the tiny tokenizer
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_qwen2_tokenizer(folder: Path):
    """A Qwen2 byte-level BPE tokenizer with a byte vocabulary (no merges), Qwen2-VL's special tokens and chat
    template: real tokenizer code, tiny files. Returns the tokenizer."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_tokens(QWEN2VL_SPECIALS, special_tokens=True)
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def qwen2vl_config(tok):
    from transformers import Qwen2VLConfig

    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


VIDEOREWARD_NORM = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}


def save_tiny_videoreward(folder: Path, output_dim: int = 1, max_frame_pixels: int = 56 * 84, seed: int = 4,
                          step: int = 7):
    """KwaiVGI/VideoReward layout: ``model_config.json`` + ``checkpoint-<step>/model.pth`` (a full state dict in
    transformers-4.45 names, as VideoAlign's trainer saves it), and a base folder (Qwen/Qwen2-VL-2B-Instruct
    layout: config + tokenizer). Returns (repo, base, reference model, rm_head)."""
    from transformers import Qwen2VLForConditionalGeneration

    base = folder / "Qwen2-VL-tiny"
    tok = save_qwen2_tokenizer(base)
    config = qwen2vl_config(tok)
    config.save_pretrained(base)
    tok.add_tokens(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"], special_tokens=True)  # VideoAlign's step
    config.text_config.vocab_size = len(tok)  # resize_token_embeddings(len(tokenizer))
    torch.manual_seed(seed)
    ref = Qwen2VLForConditionalGeneration(config).eval()
    rm_head = torch.nn.Linear(32, output_dim, bias=False).eval()
    sd = {}
    for k, v in ref.state_dict().items():  # transformers 5 -> 4.45 names
        if k.startswith("model.visual."):
            sd[k[len("model."):]] = v
        elif k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        else:
            sd[k] = v
    sd.update({f"rm_head.{k}": v for k, v in rm_head.state_dict().items()})
    repo = folder / "VideoReward"
    (repo / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
    (repo / "checkpoint-3").mkdir(parents=True, exist_ok=True)  # an older one: the latest is loaded
    torch.save(sd, repo / f"checkpoint-{step}" / "model.pth")
    torch.save({}, repo / "checkpoint-3" / "model.pth")
    (repo / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": max_frame_pixels, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": str(base), "output_dim": output_dim, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": False},
        "inference_config": VIDEOREWARD_NORM}))
    return repo, base, ref, rm_head
