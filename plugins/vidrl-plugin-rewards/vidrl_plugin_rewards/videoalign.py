"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv 2501.13918):
a Qwen2-VL-2B reward model with three heads, visual quality (VQ), motion quality (MQ) and text alignment (TA).

What the released model computes (read from KwaiVGI/VideoAlign: ``trainer.py``, ``inference.py``,
``vision_process.py``; written here on transformers' ``Qwen2VLModel``):

* frames: ``n = round2(clip(F / video_fps * fps, 4, floor2(min(768, F))))`` (``round2``/``floor2``: to a multiple of
  2, the temporal patch), capped at ``F``, taken at ``linspace(0, F - 1, n).round()``; or ``num_frames`` rounded to
  a multiple of 2. ``fps`` / ``num_frames`` come from the checkpoint's ``model_config.json`` (released: 2 fps).
* pixels: each frame resized to ``smart_resize(H, W, factor 28, min 128*28*28, max max_frame_pixels)`` by an
  antialiased bicubic resize of the 8-bit frame (torchvision on the decoded video; here ``F.interpolate`` with
  ``antialias=True``, the kernel torchvision calls), rounded back to 8 bits, scaled to [0, 1], normalised with the
  OpenAI CLIP mean/std, and cut into Qwen2-VL's ``pixel_values_videos`` rows (2 frames x 14 x 14 patches, in
  2 x 2 merge-window order) with ``video_grid_thw = (n / 2, H' / 14, W' / 14)``.
* text: one user turn of Qwen2-VL's chat template holding the video and the prompt template, whose three special
  tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` (added to the tokenizer, rows appended to the embedding)
  mark where each score is read; the video placeholder repeated ``t * h * w / 4`` times (the processor's rule).
* score: ``r_k = w^T h(token_k)`` with ``h`` the decoder's last hidden state and ``w`` the bias-free ``rm_head``
  (``output_dim`` 1: one head shared by the three tokens; 3: the k-th output at the k-th token);
  ``use_norm``: ``(r_k - mean_k) / std_k`` with the checkpoint's ``inference_config``; Overall = VQ + MQ + TA.
* positions: VideoAlign's ``Qwen2VLRewardModelBT.forward`` (pinned to transformers 4.45.2) calls the text
  decoder without position ids, so the released model was trained and is run with the plain token index on all
  three M-RoPE axes; ``positions: 1d`` (default) reproduces that, ``positions: mrope`` uses Qwen2-VL's 3-D
  positions instead.

Weights: ``model`` (``KwaiVGI/VideoReward`` or a folder) holds ``model_config.json`` and
``checkpoint-<step>/model.pth`` (a full state dict in transformers-4.45 names: ``visual.*``, ``model.*``,
``lm_head.weight``, ``rm_head.weight``); the architecture and tokenizer come from the base model it names
(``Qwen/Qwen2-VL-2B-Instruct``); its weights are not downloaded (every tensor is in ``model.pth``).

Prompt template: VideoAlign trains with its ``detailed_special`` text (``prompt_template.py`` of the VideoAlign
repository), which is not shipped in the checkpoint and not copied here. ``template`` takes that text (or a file
holding it; ``{text_prompt}`` marks the prompt); the default is this package's own short template with the same
three tokens in the same order, so scores of the released weights differ from the published ones until the
official text is given.

Not differentiable (the 8-bit rounding and the resize follow the official decoder path); for scoring, e.g.
behind ``score_async`` or ``trl-video reward-serve``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trl_video.errors import TrlVideoError

from .hub import from_pretrained, list_files, load_state_dict, resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

HEADS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' floor for video frames (vision_process.py)
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768
#: this package's template (not VideoAlign's wording): the three reward tokens in the order VQ, MQ, TA
DEFAULT_TEMPLATE = (
    "Rate this generated video from 0 to 10 on three separate criteria.\n"
    "Visual quality (sharpness, detail, plausible single frames): <|VQ_reward|>\n"
    "Motion quality (smooth, stable, natural, enough movement): <|MQ_reward|>\n"
    "Text alignment with the prompt \"{text_prompt}\" (subjects, motion, scene, style, camera): <|TA_reward|>\n"
)


def _round(x: float, f: int) -> int:
    return round(x / f) * f


def sample_frame_indices(total: int, num_frames: int | None = None, fps: float | None = 2.0,
                         video_fps: float = 16.0, frame_factor: int = 2) -> list[int]:
    """VideoAlign's uniform frame sampling (``smart_nframes`` then ``linspace(...).round()``)."""
    if num_frames is not None:
        n = _round(num_frames, frame_factor)
    else:
        lo = math.ceil(FPS_MIN_FRAMES / frame_factor) * frame_factor
        hi = math.floor(min(FPS_MAX_FRAMES, total) / frame_factor) * frame_factor
        n = _round(min(max(total / video_fps * (fps or 2.0), lo), hi), frame_factor)
    n = min(n, total)
    if not frame_factor <= n <= total:
        raise TrlVideoError(f"videoalign: a {total}-frame video gives {n} frames to score; it needs at least "
                            f"{frame_factor} (set num_frames or fps)")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def video_pixels(frames: Tensor, min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2,
                 temporal_patch: int = 2, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                 std: tuple[float, ...] = OPENAI_CLIP_STD, quantize: bool = True) -> tuple[Tensor, tuple[int, int, int]]:
    """``frames [B, T, 3, H, W]`` in [-1, 1] -> (``pixel_values_videos [B * t * h * w, 3 * 2 * 14 * 14]``,
    ``(t, h, w)``), the rows of each video consecutive (how the processor concatenates a batch)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    b, t, c, h, w = frames.shape
    x = (frames.float().clamp(-1, 1) + 1) * 127.5
    if quantize:  # the official path reads an 8-bit video file
        x = x.round()
    rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    if (rh, rw) != (h, w):  # torchvision's resize of uint8 frames: float bicubic AA, clamp, round
        x = F.interpolate(x.reshape(b * t, c, h, w), size=(rh, rw), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 255).round().view(b, t, c, rh, rw)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 1, c, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 1, c, 1, 1)
    x = (x / 255 - m) / s
    if pad := -t % temporal_patch:  # the last frame repeated up to a whole temporal patch
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
        t += pad
    gt, gh, gw = t // temporal_patch, rh // patch, rw // patch
    x = x.reshape(b, gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # rows: (t, h-window, w-window, h in window, w in window); columns: (channel, frame in patch, py, px)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gt * gh * gw, c * temporal_patch * patch * patch), (gt, gh, gw)


def legacy_to_qwen2vl_model(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """transformers-4.45 ``Qwen2VLForConditionalGeneration`` names (+ ``rm_head``) -> ``Qwen2VLModel`` names (the
    same renaming transformers 5 applies to legacy checkpoints: ``model.*`` is the language model) and the head."""
    body: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("rm_head."):
            head[k[len("rm_head."):]] = v
        elif k.startswith("visual."):
            body[k] = v
        elif k.startswith("model."):
            body["language_model." + k[len("model."):]] = v
        elif k != "lm_head.weight":  # the LM head does not enter the score
            raise TrlVideoError(f"videoalign checkpoint: unexpected parameter '{k}' (not a Qwen2-VL reward model?)")
    return body, head


class VideoAlign:
    """``reward: videoalign``; ``reward_args``: ``model``, ``heads`` (subset of VQ/MQ/TA), ``weights``,
    ``use_norm``, ``template``, ``fps`` / ``num_frames``, ``video_fps``, ``max_pixels``, ``positions``, ``dtype``."""

    name = "videoalign"
    space = "pixel"
    differentiable = False

    def __init__(self, model: str = "KwaiVGI/VideoReward", checkpoint: str | None = None, base: str | None = None,
                 heads: list[str] | tuple[str, ...] | str = HEADS, weights: dict[str, float] | None = None,
                 use_norm: bool = True, template: str | None = None, fps: float | None = None,
                 num_frames: int | None = None, video_fps: float = 16.0, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int | None = None, positions: str = "1d", dtype: str = "float32", quantize: bool = True,
                 batch_size: int = 2):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel

        self.heads = [heads] if isinstance(heads, str) else list(heads)
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads:
            raise TrlVideoError(f"videoalign: heads {bad or self.heads} unknown; choose from {', '.join(HEADS)}")
        self.weights = {h: float((weights or {}).get(h, 1.0)) for h in self.heads}
        if positions not in ("1d", "mrope"):
            raise TrlVideoError(f"videoalign: positions must be '1d' or 'mrope', got '{positions}'")
        self.positions, self.quantize, self.batch_size, self.video_fps = positions, quantize, batch_size, video_fps

        cfg = json.loads(Path(resolve_file(model, "model_config.json")).read_text())
        data, mcfg, norm = cfg.get("data_config", {}), cfg.get("model_config", {}), cfg.get("inference_config")
        if not mcfg.get("use_special_tokens", False):
            raise TrlVideoError(f"videoalign: '{model}/model_config.json' has use_special_tokens false; only the "
                                "special-token reward heads (the released VideoReward) are supported")
        if fps is not None and num_frames is not None:
            raise TrlVideoError("videoalign: give fps or num_frames, not both")
        self.num_frames = num_frames if fps is not None or num_frames is not None else data.get("num_frames")
        self.fps = fps if fps is not None else data.get("fps", 2.0)
        self.min_pixels = min_pixels
        self.max_pixels = int(max_pixels or data.get("max_frame_pixels") or 256 * 28 * 28)
        self.norm = {h: (float(norm[f"{h}_mean"]), float(norm[f"{h}_std"])) for h in HEADS} if use_norm and norm else None
        self.template = self._template(template)

        base = base or mcfg.get("model_name_or_path") or "Qwen/Qwen2-VL-2B-Instruct"
        config = from_pretrained(AutoConfig, base, "videoalign base config")
        self.tokenizer = from_pretrained(AutoTokenizer, base, "videoalign tokenizer")
        self.tokenizer.padding_side = "right"  # as VideoAlign's processor
        if getattr(self.tokenizer, "chat_template", None) is None:  # newer Qwen2-VL repos keep it processor-side
            try:
                self.tokenizer.chat_template = json.loads(
                    Path(resolve_file(base, "chat_template.json")).read_text())["chat_template"]
            except (TrlVideoError, KeyError, ValueError):
                raise TrlVideoError(f"videoalign: '{base}' has no chat template (tokenizer_config.json or "
                                    "chat_template.json)") from None
        self.tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)
        self.reward_ids = self.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))

        ckpt = checkpoint or self._latest_checkpoint(model)
        body, head = legacy_to_qwen2vl_model(load_state_dict(resolve_file(model, ckpt)))
        rows = body.get("language_model.embed_tokens.weight", torch.empty(0, 0)).shape[0]
        if rows != len(self.tokenizer):
            raise TrlVideoError(f"videoalign: '{model}/{ckpt}' has {rows} token embeddings, the tokenizer of '{base}' "
                                f"with the 3 reward tokens has {len(self.tokenizer)}")
        config.text_config.vocab_size = rows
        with init_empty_weights(include_buffers=False):  # no random init of 2B parameters overwritten next
            self.model: nn.Module = Qwen2VLModel(config)
        missing, unexpected = self.model.load_state_dict(body, strict=False, assign=True)
        if missing or unexpected or "weight" not in head:
            raise TrlVideoError(f"videoalign: '{model}/{ckpt}' does not match the config of '{base}' (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]}, rm_head {'weight' in head})")
        self.head = nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias=False)
        self.head.load_state_dict(head)
        self.output_dim = self.head.out_features
        if self.output_dim not in (1, len(HEADS)):
            raise TrlVideoError(f"videoalign: rm_head has {self.output_dim} outputs; expected 1 or 3")
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise TrlVideoError(f"videoalign: dtype '{dtype}' is not a torch dtype")
        for mod in (self.model, self.head):
            mod.to(dt).requires_grad_(False).eval()
        vc = config.vision_config
        self.patch, self.merge, self.temporal_patch = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        self.video_token_id = config.video_token_id
        self.video_token = self.tokenizer.convert_ids_to_tokens(config.video_token_id)
        self._sums: dict[str, list[float]] = {}

    @staticmethod
    def _template(template: str | None) -> str:
        text = DEFAULT_TEMPLATE if template is None else template
        if template is not None and "\n" not in template and Path(template).is_file():
            text = Path(template).read_text()
        counts = [text.count(t) for t in REWARD_TOKENS]
        if counts != [1, 1, 1] or "{text_prompt}" not in text:
            raise TrlVideoError(f"videoalign: template must hold {{text_prompt}} and each of {' '.join(REWARD_TOKENS)} "
                                f"once (found {dict(zip(REWARD_TOKENS, counts))})")
        return text

    @staticmethod
    def _latest_checkpoint(model: str) -> str:
        found = [(int(m.group(1)), f) for f in list_files(model) if (m := re.fullmatch(r"checkpoint-(\d+)/model\.pth", f))]
        if not found:
            raise TrlVideoError(f"videoalign: '{model}' has no checkpoint-<step>/model.pth")
        return max(found)[1]

    def chat_text(self, prompt: str, video_tokens: int) -> str:
        """The chat-templated query with the video placeholder repeated ``video_tokens`` times."""
        query = self.template.replace("{text_prompt}", prompt)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": query}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(self.video_token) != 1:
            raise TrlVideoError(f"videoalign: the chat template puts {text.count(self.video_token)} "
                                f"'{self.video_token}' in a one-video turn")
        return text.replace(self.video_token, self.video_token * video_tokens)

    def inputs(self, video: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Model inputs for videos ``[B, 3, F, H, W]`` in [-1, 1]: ids, mask, ``pixel_values_videos``, grid."""
        if video.ndim != 5:
            raise TrlVideoError(f"videoalign scores videos [B, 3, F, H, W]; got shape {tuple(video.shape)}")
        idx = sample_frame_indices(video.shape[2], self.num_frames, self.fps, self.video_fps, self.temporal_patch)
        frames = video[:, :, idx].transpose(1, 2)
        pixels, (t, h, w) = video_pixels(frames, self.min_pixels, self.max_pixels, self.patch, self.merge,
                                         self.temporal_patch, quantize=self.quantize)
        n_tokens = t * h * w // self.merge**2
        tok = self.tokenizer([self.chat_text(p, n_tokens) for p in prompts], padding=True, return_tensors="pt")
        return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask, "pixel_values_videos": pixels,
                "video_grid_thw": torch.tensor([[t, h, w]] * len(prompts))}

    @torch.no_grad()
    def raw_scores(self, video: Tensor, prompts: list[str]) -> Tensor:
        """Unnormalised ``[B, 3]`` scores (VQ, MQ, TA)."""
        device = video.device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
            self.head.to(device)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            batch = {k: v.to(device) for k, v in self.inputs(video[i:i + self.batch_size],
                                                             prompts[i:i + self.batch_size]).items()}
            ids = batch["input_ids"]
            if self.positions == "1d":
                batch["position_ids"] = torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, len(ids), -1)
            else:  # Qwen2-VL computes M-RoPE positions from the token types (0 text, 2 video, as its processor)
                batch["mm_token_type_ids"] = (ids == self.video_token_id).int() * 2
            batch["pixel_values_videos"] = batch["pixel_values_videos"].to(self.head.weight.dtype)
            hidden = self.model(**batch).last_hidden_state  # [b, L, D]
            logits = self.head(hidden).float()  # [b, L, output_dim]
            cols = []
            for k, tid in enumerate(self.reward_ids):
                hit = ids == tid
                if not bool((hit.sum(1) == 1).all()):
                    raise TrlVideoError(f"videoalign: reward token {REWARD_TOKENS[k]} is not once in every input "
                                        "(truncated or in the prompt?)")
                r = logits[hit]  # [b, output_dim], one row per sample in batch order
                cols.append(r[:, 0] if self.output_dim == 1 else r[:, k])
            out.append(torch.stack(cols, 1))
        return torch.cat(out)

    def score_heads(self, video: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Each head's score ``[B]`` (normalised with the checkpoint's statistics when ``use_norm``)."""
        raw = self.raw_scores(video, prompts)
        scores = {}
        for k, h in enumerate(HEADS):
            scores[h] = (raw[:, k] - self.norm[h][0]) / self.norm[h][1] if self.norm else raw[:, k]
        return scores

    def __call__(self, video: Tensor, prompts: list[str]) -> Tensor:
        scores = self.score_heads(video, prompts)
        for h, s in scores.items():
            acc = self._sums.setdefault(h, [0.0, 0.0])
            acc[0] += float(s.sum())
            acc[1] += s.numel()
        return sum((self.weights[h] * scores[h] for h in self.heads), torch.zeros_like(scores[HEADS[0]]))

    def pop_metrics(self) -> dict[str, float]:
        """Mean of each head since the last call, logged as ``reward/VQ`` etc."""
        out = {h: s / c for h, (s, c) in self._sums.items() if c}
        self._sums = {}
        return out
