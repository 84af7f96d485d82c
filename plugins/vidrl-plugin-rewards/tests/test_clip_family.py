"""CLIP-family adapters built from tiny configs, saved in the Hub layout and loaded through the adapters'
own loading code: preprocessing vs the official processor, gradients to the pixels, scores vs the model's
own forward, the open_clip -> transformers conversion (HPSv2) and a download through a loopback fake Hub."""

from __future__ import annotations

import pytest
import tiny_reward_models as tiny
import torch
import torch.nn.functional as F
from fake_hub_downloads import serve_repos
from vidrl_plugin_rewards.clip import Aesthetic, ClipScore, HPSv2, HPSv21, PickScore
from vidrl_plugin_rewards.preprocess import to_uint8_images

from trl_video import world

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny.save_tiny_clip(tmp_path_factory.mktemp("hub") / "clip")


def world_frames() -> torch.Tensor:
    return world.render_batch(PROMPTS, [0, 1]).float()  # [2, 3, 9, 32, 32], on the uint8 grid


def official_pixels(folder, images: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(folder)
    return proc(images=to_uint8_images(images), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_preprocessing_matches_clip_image_processor(clip_dir, size):
    reward = ClipScore(model=str(clip_dir))
    video = world_frames()
    images = video[:, :, -1]
    if size != (32, 32):  # a non-square frame exercises the shortest-edge resize and the centre crop
        images = F.interpolate(images, size=size, mode="nearest")
    ours, ref = reward.transform(images), official_pixels(clip_dir, images)
    assert ours.shape == ref.shape == (2, 3, 28, 28)
    # PIL resizes in two 8-bit passes; torch in float: ~1/255 per pixel, in normalised units below 0.03
    assert (ours - ref).abs().max() < 0.03
    assert (ours - ref).abs().mean() < 0.01


def test_clip_score_matches_model_and_reaches_pixels(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    reward = ClipScore(model=str(clip_dir), frames="last")
    video = world_frames().requires_grad_(True)
    scores = reward(video, PROMPTS)
    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(input_ids=tok(PROMPTS, padding=True, return_tensors="pt").input_ids,
                    pixel_values=official_pixels(clip_dir, video.detach()[:, :, -1]))
    expected = 100 * torch.diagonal(out.logits_per_image) / model.logit_scale.exp()
    torch.testing.assert_close(scores.detach(), expected, atol=0.05, rtol=0)  # preprocessing tolerance
    scores.sum().backward()
    per_frame = video.grad.abs().sum(dim=(0, 1, 3, 4))
    assert per_frame[-1] > 0 and per_frame[:-1].abs().sum() == 0  # only the scored (last) frame


def test_pickscore_uses_logit_scale_and_frame_modes(clip_dir):
    reward = PickScore(model=str(clip_dir), frames="uniform", k=3)
    video = world_frames()
    scores, idx = reward.score_frames(video, PROMPTS)
    assert idx.tolist() == [[0, 4, 8], [0, 4, 8]]
    cos = reward.cosine(video[:, :, 4], PROMPTS)
    torch.testing.assert_close(scores[:, 1], reward.clip.logit_scale.exp() * cos)
    torch.testing.assert_close(reward(video, PROMPTS), scores.mean(1))


def test_hpsv2_open_clip_checkpoint_converts(tmp_path):
    ckpt, base, ref = tiny.save_tiny_hps(tmp_path)
    reward = HPSv2(model=str(ckpt), processor=str(base))
    # the packed open_clip attention (nn.MultiheadAttention with in_proj) equals the converted q/k/v layer
    sd = torch.load(ckpt / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    mha.load_state_dict({k.split("attn.")[1]: v for k, v in sd.items() if k.startswith("module.visual.transformer.resblocks.0.attn.")})
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(reward.clip.vision_model.encoder.layers[0].self_attn(x)[0], mha(x, x, x)[0],
                                   atol=1e-5, rtol=1e-5)
    video = world_frames().requires_grad_(True)
    scores = reward(video, PROMPTS)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=reward.transform(video.detach()[:, :, -1])).pooler_output
        txt = ref.get_text_features(**reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    expected = F.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    assert video.grad[:, :, -1].abs().sum() > 0


def test_hpsv21_downloads_through_fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    root = tmp_path / "repos"
    ckpt, base, ref = tiny.save_tiny_hps(tmp_path, filename="HPS_v2.1_compressed.pt")
    (root / "xswu").mkdir(parents=True)
    ckpt.rename(root / "xswu" / "HPSv2")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with serve_repos(root) as (url, seen):
        monkeypatch.setenv("HF_ENDPOINT", url)
        reward = HPSv21(processor=str(base))  # default Hub id xswu/HPSv2, file HPS_v2.1_compressed.pt
    assert any("/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt" in r for r in seen)
    assert reward(world_frames(), PROMPTS).shape == (2,)


def test_aesthetic_head_on_normalised_embedding(clip_dir, tmp_path):
    head_dir = tiny.save_aesthetic_head(tmp_path / "aesthetic")
    reward = Aesthetic(model=str(clip_dir), head=str(head_dir), frames="all")
    video = world_frames().requires_grad_(True)
    scores, idx = reward.score_frames(video, PROMPTS)
    assert idx.shape == (2, 9) and idx[0].tolist() == list(range(9))
    emb = reward.image_features(video.detach()[:, :, 3])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(scores[:, 3].detach(), reward.head(emb).squeeze(-1).detach())
    scores.mean(1).sum().backward()
    assert (video.grad.abs().sum(dim=(0, 1, 3, 4)) > 0).all()  # every frame reached


def test_missing_weights_name_the_source(tmp_path):
    from trl_video.errors import TrlVideoError

    with pytest.raises(TrlVideoError, match="cannot load '.*nowhere'"):
        ClipScore(model=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrlVideoError, match="has no file 'HPS_v2_compressed.pt'"):
        HPSv2(model=str(tmp_path / "empty"), processor=str(tmp_path / "empty"))
