"""The reward models' image preprocessing written in torch, so gradients reach the pixels.

CLIP-family processors (CLIP, PickScore, HPSv2, the LAION aesthetic head) and ImageReward's BLIP transform all
do, on an RGB image: bicubic resize of the shortest edge to ``size`` (PIL, so antialiased, Keys a = -0.5),
centre crop to ``crop``, scale to [0, 1], normalise with the OpenAI CLIP mean/std. ``F.interpolate`` with
``antialias=True`` is the same separable a = -0.5 filter as PIL; PIL also clamps to [0, 255], so we clamp.
The tests compare this with the official processors on the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    size: int = 224  # shortest edge after resize
    crop: int = 224  # centre-crop side
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_processor(cls, proc: object) -> ImageTransform:
        """Read size / crop / mean / std from a transformers image processor (CLIPImageProcessor and kin)."""
        size = getattr(proc, "size", None) or {}
        crop = getattr(proc, "crop_size", None) or {}
        short = size.get("shortest_edge") or size.get("height") or 224
        side = crop.get("height") or short
        return cls(int(short), int(side), tuple(float(m) for m in proc.image_mean),  # type: ignore[attr-defined]
                   tuple(float(s) for s in proc.image_std))  # type: ignore[attr-defined]

    def __call__(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [-1, 1] -> normalised model input ``[N, 3, crop, crop]`` (differentiable)."""
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.size, int(self.size * long / short)
        out_hw = (new_short, new_long) if h <= w else (new_long, new_short)
        if out_hw != (h, w):
            x = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (out_hw[0] - self.crop) // 2, (out_hw[1] - self.crop) // 2
        if top < 0 or left < 0:  # smaller than the crop: pad like PIL's centre crop does (zeros)
            pad_t, pad_l = max(-top, 0), max(-left, 0)
            x = F.pad(x, (pad_l, max(self.crop - out_hw[1] - pad_l, 0), pad_t, max(self.crop - out_hw[0] - pad_t, 0)))
            top, left = max(top, 0), max(left, 0)
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def to_uint8_images(images: Tensor) -> list:
    """``[N, 3, H, W]`` in [-1, 1] -> PIL images (what an official, PIL-based processor takes)."""
    from PIL import Image

    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
