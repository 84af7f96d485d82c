"""ImageReward (Xu et al. 2023) on transformers' BLIP modules.

Score (``ImageReward.score`` of the official package):
    e_img = ViT(x)                                   # BLIP ViT-L/16 at 224 px, all tokens
    h     = BERT(prompt, cross-attending to e_img)   # BLIP's image-grounded text encoder, [CLS] token
    r     = (MLP(h) - 0.16717362830052426) / 1.0333394966054072
with MLP = 768-1024-128-64-16-1 linear layers (dropout, no activations) and the prompt tokenised by BERT's
uncased tokenizer (plus BLIP's [DEC]/[ENC] tokens) padded to 35 tokens.

Weights: ``THUDM/ImageReward`` (``ImageReward.pt``: a state dict in BLIP's own names, ``med_config.json``: the
text encoder's BERT config), renamed on load to ``BlipVisionModel`` / ``BlipTextModel``. The ``image-reward``
package is not used: it pins ``timm==0.6.13`` (open-clip and current timm users need timm >= 1) and
``fairscale==0.4.13``, and its BLIP copy imports transformers 4.x internals.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trl_video.errors import TrlVideoError

from .clip import AestheticHead
from .frames import FrameRewardMixin, FrameSelection
from .hub import from_pretrained, load_state_dict, materialise_position_ids, resolve_file
from .preprocess import ImageTransform

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
#: BLIP ViT-L/16 at 224 px (timm VisionTransformer with LayerNorm eps 1e-6)
VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}

_VIT_RENAMES = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))


def blip_vit_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BLIP's timm-style ViT names -> ``BlipVisionModel`` names (same tensors: both pack q/k/v in one qkv)."""
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", key)
        if m:
            rest = m.group(2)
            for a, b in _VIT_RENAMES:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[f"encoder.layers.{m.group(1)}.{rest}"] = v
        elif key == "cls_token":
            out["embeddings.class_embedding"] = v
        elif key == "pos_embed":
            out["embeddings.position_embedding"] = v
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embedding." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("norm."):
            out["post_layernorm." + key.rsplit(".", 1)[1]] = v
        else:
            raise TrlVideoError(f"ImageReward checkpoint: unexpected vision parameter '{key}'")
    return out


def transformers_to_blip_vit(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`blip_vit_to_transformers`: ``BlipVisionModel`` names -> BLIP's timm-style names."""
    singles = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
               "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
               "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
               "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if key in singles:
            out[singles[key]] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        rest = m.group(2) if m else ""
        theirs = next((a + rest[len(b):] for a, b in _VIT_RENAMES if rest.startswith(b)), None)
        if m is None or theirs is None:
            raise TrlVideoError(f"BlipVisionModel: parameter '{key}' has no BLIP name")
        out[f"blocks.{m.group(1)}.{theirs}"] = v
    return out


def save_imagereward(folder: str | Path, vision: torch.nn.Module, text: torch.nn.Module, head: torch.nn.Module,
                     med_config: dict[str, Any]) -> Path:
    """Write ``ImageReward.pt`` (BLIP's parameter names, the THUDM/ImageReward layout) and ``med_config.json``
    into ``folder``, so that :class:`ImageReward` (and the official package's key names) load it: for reward
    models trained or fine-tuned with transformers' BLIP modules."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"blip.visual_encoder.{k}": v for k, v in transformers_to_blip_vit(vision.state_dict()).items()}
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items() if not k.endswith("position_ids")})
    sd.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med_config, indent=2))
    return folder


class ImageReward(FrameRewardMixin):
    name = "imagereward"
    space = "pixel"
    differentiable = True

    def __init__(self, model: str = "THUDM/ImageReward", checkpoint: str = "ImageReward.pt",
                 med_config: str = "med_config.json", tokenizer: str = "bert-base-uncased",
                 vision: dict[str, Any] | None = None, frames: str = "last", k: int = 1, seed: int = 0,
                 max_text_length: int = 35):
        from transformers import (
            BertTokenizer,
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        self.frames = FrameSelection(frames, k, seed)
        self.max_text_length = max_text_length
        vcfg = BlipVisionConfig(**{**VIT_LARGE, **(vision or {})})
        bert = json.loads(open(resolve_file(model, med_config)).read())
        tcfg = BlipTextConfig(
            vocab_size=bert["vocab_size"], hidden_size=bert["hidden_size"], intermediate_size=bert["intermediate_size"],
            num_hidden_layers=bert["num_hidden_layers"], num_attention_heads=bert["num_attention_heads"],
            max_position_embeddings=bert["max_position_embeddings"], layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
            hidden_act=bert.get("hidden_act", "gelu"), pad_token_id=bert.get("pad_token_id", 0),
            encoder_hidden_size=vcfg.hidden_size)
        sd = load_state_dict(resolve_file(model, checkpoint))
        with torch.device("meta"):
            self.vision, self.text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
            self.head = AestheticHead(bert["hidden_size"])  # ImageReward's MLP has the same layout
        parts = {
            "vision": blip_vit_to_transformers({k[len("blip.visual_encoder."):]: v for k, v in sd.items()
                                                if k.startswith("blip.visual_encoder.")}),
            "text": {k[len("blip.text_encoder."):]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")},
            "head": {k[len("mlp."):]: v for k, v in sd.items() if k.startswith("mlp.")},
        }  # blip.vision_proj / blip.text_proj (contrastive heads) are not part of the score
        for name, part in parts.items():
            module = getattr(self, name)
            missing, unexpected = module.load_state_dict(part, strict=False, assign=True)
            missing = [m for m in missing if not m.endswith("position_ids")]
            unexpected = [u for u in unexpected if not u.endswith("position_ids")]
            if missing or unexpected:
                raise TrlVideoError(f"imagereward: '{model}/{checkpoint}' does not fit the {name} tower "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            materialise_position_ids(module)
            module.requires_grad_(False).eval()
        self.tokenizer = from_pretrained(BertTokenizer, tokenizer, "imagereward tokenizer")
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.transform = ImageTransform(vcfg.image_size, vcfg.image_size)

    def _device(self, x: Tensor) -> None:
        if next(self.vision.parameters()).device != x.device:
            for m in (self.vision, self.text, self.head):
                m.to(x.device)

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        self._device(images)
        img = self.vision(pixel_values=self.transform(images)).last_hidden_state
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt").to(images.device)
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        h = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=img,
                      encoder_attention_mask=att).last_hidden_state[:, 0]
        return ((self.head(h.float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)

