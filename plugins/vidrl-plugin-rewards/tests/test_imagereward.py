"""ImageReward from a tiny BLIP in the THUDM/ImageReward layout, loaded through the adapter: the score equals
the official formula on the reference modules, the preprocessing equals the official torchvision pipeline
(Resize(224, bicubic) on PIL, CenterCrop, ToTensor, Normalize: here with PIL directly), gradients reach the
last frame only."""

from __future__ import annotations

import json

import numpy as np
import tiny_reward_models as tiny
import torch
from PIL import Image
from vidrl_plugin_rewards.blip import REWARD_MEAN, REWARD_STD, ImageReward
from vidrl_plugin_rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_uint8_images

from trl_video import world

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


def official_transform(img: Image.Image, n: int) -> torch.Tensor:
    """ImageReward's ``_transform(n)`` spelled with PIL: shortest edge to n (bicubic), centre crop, scale,
    normalise."""
    w, h = img.size
    nw, nh = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - n) / 2.0)), int(round((nh - n) / 2.0))
    img = img.crop((left, top, left + n, top + n))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def test_imagereward_loads_blip_checkpoint_and_matches_formula(tmp_path):
    repo, tok_dir, (vis, txt, head) = tiny.save_tiny_imagereward(tmp_path)
    reward = ImageReward(model=str(repo), tokenizer=str(tok_dir), vision=tiny.TINY_VIT, frames="last")
    video = world.render_batch(PROMPTS, [0, 1]).float().requires_grad_(True)
    last = video.detach()[:, :, -1]
    official = torch.stack([official_transform(im, 28) for im in to_uint8_images(last)])
    ours = reward.transform(last)
    assert (ours - official).abs().max() < 0.03 and (ours - official).abs().mean() < 0.01
    scores = reward(video, PROMPTS)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        img = vis(pixel_values=official).last_hidden_state
        h = txt(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=img,
                encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long)).last_hidden_state[:, 0]
        expected = ((head(h) - REWARD_MEAN) / REWARD_STD).squeeze(-1)
    torch.testing.assert_close(scores.detach(), expected, atol=0.02, rtol=0)  # preprocessing tolerance
    scores.sum().backward()
    grad = video.grad.abs().sum(dim=(0, 1, 3, 4))
    assert grad[-1] > 0 and grad[:-1].sum() == 0


def test_save_imagereward_writes_the_official_layout(tmp_path):
    """``save_imagereward`` (for models trained with transformers' BLIP modules) writes the same keys and tensors as
    the fixture's hand-written THUDM names, and the reward loads it back to the same scores."""
    from vidrl_plugin_rewards.blip import save_imagereward

    repo, tok_dir, (vis, txt, head) = tiny.save_tiny_imagereward(tmp_path / "ref")
    med = json.loads((repo / "med_config.json").read_text())
    ours = save_imagereward(tmp_path / "ours", vis, txt, head, med)
    ref_sd = torch.load(repo / "ImageReward.pt", weights_only=True)
    ref_sd.pop("blip.vision_proj.weight")  # the contrastive head: not part of the score, not written
    our_sd = torch.load(ours / "ImageReward.pt", weights_only=True)
    assert sorted(our_sd) == sorted(ref_sd)
    assert all(torch.equal(our_sd[k], ref_sd[k]) for k in ref_sd)
    video = world.render_batch(PROMPTS, [0, 1])
    a = ImageReward(model=str(repo), tokenizer=str(tok_dir), vision=tiny.TINY_VIT)(video, PROMPTS)
    b = ImageReward(model=str(ours), tokenizer=str(tok_dir), vision=tiny.TINY_VIT)(video, PROMPTS)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
