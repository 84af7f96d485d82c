"""CLIP-family rewards on transformers ``CLIPModel``: CLIP score, PickScore, HPSv2 / v2.1, LAION aesthetic.

All are differentiable image rewards applied to selected frames (:mod:`.frames`), with the processors'
preprocessing in torch (:mod:`.preprocess`). Weights load by Hub id or local folder (``model=...``).

* ``clip_score``: ``scale * cos(E_img, E_txt)`` with OpenAI CLIP ViT-L/14 (Hessel et al. 2021, CLIPScore, use
  ``scale=2.5``; torchmetrics reports ``100 * cos``, the default here). No ``max(., 0)`` clamp: it would zero
  the gradient of every sample the model finds off-prompt.
* ``pickscore``: ``exp(logit_scale) * cos`` (Kirstain et al. 2023), ``yuvalkirstain/PickScore_v1`` with the
  processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as its model card does).
* ``hpsv2`` / ``hpsv21``: ``cos`` (Wu et al. 2023, HPSv2: the score is the diagonal of normalised image x text
  features) with the OpenCLIP ViT-H-14 checkpoint ``HPS_v2(.1)_compressed.pt`` from ``xswu/HPSv2``, converted
  from open_clip's parameter names to ``CLIPModel``'s (:func:`open_clip_to_transformers`). open_clip itself
  is not used: it needs torchvision, whose PyPI wheels are CUDA builds that do not load next to a CPU torch.
* ``aesthetic``: the LAION improved aesthetic predictor, an MLP (768-1024-128-64-16-1, no activations) on the
  L2-normalised CLIP ViT-L/14 image embedding; head from ``trl-lib/ddpo-aesthetic-predictor`` (the file TRL's
  DDPO example uses). Prompt-independent.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from trl_video.errors import TrlVideoError

from .frames import FrameRewardMixin, FrameSelection
from .hub import from_pretrained, load_state_dict, materialise_position_ids, resolve_file
from .preprocess import ImageTransform

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_L14 = "openai/clip-vit-large-patch14"


def _features(out: Any) -> Tensor:
    """transformers 5 returns a model output from ``get_*_features``; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _ClipBase(FrameRewardMixin):
    space = "pixel"
    differentiable = True
    default_model = OPENAI_L14
    default_processor: str | None = None

    def __init__(self, model: str | None = None, processor: str | None = None, frames: str = "last", k: int = 1,
                 seed: int = 0, max_text_length: int = 77):
        from transformers import AutoTokenizer, CLIPImageProcessor

        self.model_id = model or self.default_model
        self.processor_id = processor or (self.default_processor if model is None else None) or self.model_id
        self.frames = FrameSelection(frames, k, seed)
        self.max_text_length = max_text_length
        self.clip = self.load_model()
        self.clip.requires_grad_(False).eval()
        self.max_text_length = min(max_text_length, self.clip.config.text_config.max_position_embeddings)
        self.tokenizer = from_pretrained(AutoTokenizer, self.processor_id, f"{self.name} tokenizer")
        proc = from_pretrained(CLIPImageProcessor, self.processor_id, f"{self.name} image processor")
        self.transform = ImageTransform.from_processor(proc)
        self._text_cache: dict[str, Tensor] = {}

    name = "clip"

    def load_model(self) -> nn.Module:
        from transformers import CLIPModel

        return from_pretrained(CLIPModel, self.model_id, f"{self.name} model")

    def _device(self, x: Tensor) -> None:
        p = next(self.clip.parameters())
        if p.device != x.device:
            self.clip.to(x.device)
            self._text_cache.clear()

    def image_features(self, images: Tensor) -> Tensor:
        self._device(images)
        f = _features(self.clip.get_image_features(pixel_values=self.transform(images)))
        return f / f.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: list[str]) -> Tensor:
        """Normalised text features; prompts repeat across steps, so they are computed once (no grad)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            dev = next(self.clip.parameters()).device
            tok = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_text_length,
                                 return_tensors="pt").to(dev)
            with torch.no_grad():
                f = _features(self.clip.get_text_features(**tok)).float()
            f = f / f.norm(dim=-1, keepdim=True)
            self._text_cache.update(zip(new, f))
        return torch.stack([self._text_cache[p] for p in prompts])

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        img = self.image_features(images)
        return (img * self.text_features(prompts).to(img.dtype)).sum(-1)


class ClipScore(_ClipBase):
    name = "clip_score"

    def __init__(self, model: str | None = None, processor: str | None = None, scale: float = 100.0, **kw: Any):
        super().__init__(model, processor, **kw)
        self.scale = scale

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.scale * self.cosine(images, prompts)


class PickScore(_ClipBase):
    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = LAION_H14

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.clip.logit_scale.exp() * self.cosine(images, prompts)


# ------------------------------------------------------------------------------------------------ HPSv2
_BLOCK_RENAMES = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                  ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))


def open_clip_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip CLIP state dict (ViT towers) to transformers ``CLIPModel`` names.

    open_clip packs q/k/v into ``attn.in_proj_weight`` (``[3D, D]``, rows q then k then v) and stores the
    projections as ``x @ proj`` (``[D, E]``), transformers as ``Linear`` (``[E, D]``), hence the split and
    transposes.
    """
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
                continue
            for a, b in _BLOCK_RENAMES:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[prefix + rest] = v
            continue
        simple = {
            "visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "logit_scale": "logit_scale",
        }
        if key in simple:
            out[simple[key]] = v
        elif key == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif key.startswith(("visual.ln_pre.", "visual.ln_post.", "ln_final.")):
            head, _, leaf = key.rpartition(".")
            out[{"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                 "ln_final": "text_model.final_layer_norm"}[head] + "." + leaf] = v
        else:
            raise TrlVideoError(f"open_clip checkpoint: unexpected parameter '{key}' (not a ViT CLIP?)")
    return out


class HPSv2(_ClipBase):
    name = "hpsv2"
    default_model = "xswu/HPSv2"
    default_processor = LAION_H14
    checkpoint_file = "HPS_v2_compressed.pt"

    def __init__(self, model: str | None = None, processor: str | None = None, checkpoint: str | None = None,
                 config: str | None = None, **kw: Any):
        self.checkpoint = checkpoint or self.checkpoint_file
        self.config_id = config
        super().__init__(model, processor, **kw)

    def load_model(self) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        cfg = from_pretrained(CLIPConfig, self.config_id or self.processor_id, f"{self.name} config")
        sd = open_clip_to_transformers(load_state_dict(resolve_file(self.model_id, self.checkpoint)))
        with torch.device("meta"):  # no random init of a 1B-parameter model that is overwritten next
            model = CLIPModel(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise TrlVideoError(f"{self.name}: checkpoint '{self.model_id}/{self.checkpoint}' does not match the "
                                f"config of '{self.config_id or self.processor_id}' (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        materialise_position_ids(model)
        return model

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.cosine(images, prompts)


class HPSv21(HPSv2):
    name = "hpsv21"
    checkpoint_file = "HPS_v2.1_compressed.pt"


# ------------------------------------------------------------------------------------------------ aesthetic
class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: linear layers with dropout between them and no activations."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Aesthetic(_ClipBase):
    name = "aesthetic"
    default_head = "trl-lib/ddpo-aesthetic-predictor"

    def __init__(self, model: str | None = None, processor: str | None = None, head: str | None = None,
                 head_file: str = "aesthetic-model.pth", **kw: Any):
        super().__init__(model, processor, **kw)
        sd = load_state_dict(resolve_file(head or self.default_head, head_file))
        dim = sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else 768
        self.head = AestheticHead(dim)
        try:
            self.head.load_state_dict(sd)
        except RuntimeError as exc:
            raise TrlVideoError(f"aesthetic: head '{head or self.default_head}/{head_file}' does not fit the "
                                f"MLP: {str(exc).splitlines()[0]}") from None
        self.head.requires_grad_(False).eval()

    def _device(self, x: Tensor) -> None:
        super()._device(x)
        self.head.to(x.device)

    def score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.image_features(images)).squeeze(-1)
