"""VideoAlign / VideoReward from a tiny Qwen2-VL in the KwaiVGI/VideoReward layout, loaded through the adapter.

References, each written or taken independently of the adapter:
* frame indices: VideoAlign's sampling rule worked by hand;
* pixels: transformers' own Qwen2-VL video ``patchify`` (its source compiled alone: the module imports
  torchvision, which does not load here) on the 8-bit frames scaled and normalised by hand, and, for frames that
  need resizing, transformers' PIL ``Qwen2VLImageProcessorPil`` on still frames (a still frame pair is one image);
* scores: VideoAlign's reward forward spelled out on the reference ``Qwen2VLForConditionalGeneration`` (embed,
  scatter the video features, decode with the default positions, ``rm_head`` at the three reward tokens).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import tiny_reward_models as tiny
import torch
from vidrl_plugin_rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vidrl_plugin_rewards.videoalign import (
    DEFAULT_TEMPLATE,
    HEADS,
    VideoAlign,
    sample_frame_indices,
    video_pixels,
)

from trl_video.errors import TrlVideoError

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
SMALL = dict(min_pixels=28 * 28)  # tiny frames stay tiny (the released floor is 128*28*28)


def official_patchify():
    """``Qwen2VLVideoProcessor.patchify`` from the installed transformers, compiled without importing its module."""
    path = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl").origin
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns: dict = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["patchify"]


def uint8_video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``[B, 3, F, H, W]`` in [-1, 1] on the 8-bit grid (what a decoded video file holds)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, f, h, w), generator=g).float() / 127.5 - 1


def normalised(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 8-bit levels -> rescale 1/255 -> CLIP mean/std (the processor's do_rescale + do_normalize)."""
    x = ((frames + 1) * 127.5).round() / 255
    return (x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny.save_tiny_videoreward(tmp_path_factory.mktemp("videoreward"))


def test_frame_sampling_follows_videoalign():
    # 9 frames at 16 fps, 2 fps wanted: 1.125 frames -> at least 4 -> linspace(0, 8, 4) = 0, 2.67, 5.33, 8
    assert sample_frame_indices(9, fps=2.0, video_fps=16.0) == [0, 3, 5, 8]
    # 33 frames at 8 fps: 8.25 -> 8 frames, linspace(0, 32, 8) rounded
    assert sample_frame_indices(33, fps=2.0, video_fps=8.0) == [0, 5, 9, 14, 18, 23, 27, 32]
    assert sample_frame_indices(9, num_frames=6) == [0, 2, 3, 5, 6, 8]
    assert sample_frame_indices(9, num_frames=5) == [0, 3, 5, 8]  # rounded to the temporal patch (Python round)
    assert sample_frame_indices(3, fps=2.0) == [0, 2]  # capped at floor2(3) = 2
    with pytest.raises(TrlVideoError, match="1-frame video"):
        sample_frame_indices(1)


def test_pixels_equal_the_official_patch_layout():
    patchify = official_patchify()
    video = uint8_video(2, 5, 56, 84)  # 56 x 84 is a multiple of 28 inside [28*28, 56*84]: no resize
    frames = video.transpose(1, 2)  # [B, T, 3, H, W]
    ours, grid = video_pixels(frames, min_pixels=28 * 28, max_pixels=56 * 84)
    ref, gt, gh, gw = patchify(None, normalised(frames), patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (gt, gh, gw) == (3, 4, 6)  # 5 frames padded with the last to 6
    assert ours.shape == (2 * 3 * 4 * 6, 3 * 2 * 14 * 14)
    torch.testing.assert_close(ours, ref.reshape(-1, ref.shape[-1]), atol=1e-6, rtol=0)


def test_resized_pixels_match_the_pil_processor():
    """Frames that need resizing (the world's 32 x 32 clips -> smart_resize -> 56 x 56): our torch resize against
    transformers' PIL processor on still frames (a pair of equal frames is one image: the same rows)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from vidrl_plugin_rewards.preprocess import to_uint8_images

    from trl_video import world

    clip = world.render_batch(PROMPTS[:1], [0]).float()
    still = ((clip[:, :, [0, -1]] + 1) * 127.5).round() / 127.5 - 1  # two frames on the 8-bit grid
    video = still.repeat_interleave(2, dim=2)  # frames a a b b
    ours, grid = video_pixels(video.transpose(1, 2), min_pixels=56 * 56, max_pixels=56 * 56)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    out = proc(images=to_uint8_images(still[0].transpose(0, 1)), return_tensors="pt")
    assert still.shape[-2:] == (32, 32) and grid == (2, 4, 4) and out["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert ours.shape == out["pixel_values"].shape
    diff = (ours - out["pixel_values"]).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.005  # PIL rounds between its two 8-bit passes, torch does not


def reference_scores(ref, rm_head, base, video: torch.Tensor, prompts: list[str], indices: list[int],
                     output_dim: int = 1) -> torch.Tensor:
    """VideoAlign's ``Qwen2VLRewardModelBT.forward`` on the reference model, then ``_norm``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"], special_tokens=True)
    tok.padding_side = "right"
    frames = video[:, :, indices].transpose(1, 2)
    pv, gt, gh, gw = official_patchify()(None, normalised(frames), patch_size=14, merge_size=2, temporal_patch_size=2)
    n = gt * gh * gw // 4
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
             + "<|video_pad|>" * n + "<|vision_end|>" + DEFAULT_TEMPLATE.replace("{text_prompt}", p)
             + "<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids = batch.input_ids
    with torch.no_grad():
        emb = ref.model.get_input_embeddings()(ids)
        vid = ref.model.visual(pv.reshape(-1, pv.shape[-1]), grid_thw=torch.tensor([[gt, gh, gw]] * len(prompts)))
        mask = (ids == ref.config.video_token_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(mask, vid.pooler_output)
        hidden = ref.model.language_model(inputs_embeds=emb, attention_mask=batch.attention_mask).last_hidden_state
        logits = rm_head(hidden)
    special = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(["<|VQ_reward|>", "<|MQ_reward|>",
                                                                       "<|TA_reward|>"])))
    pooled = logits[special].view(len(prompts), 3, -1)
    pooled = pooled.diagonal(dim1=1, dim2=2) if output_dim == 3 else pooled.view(len(prompts), -1)
    norm = tiny.VIDEOREWARD_NORM
    return torch.stack([(pooled[:, k] - norm[f"{h}_mean"]) / norm[f"{h}_std"] for k, h in enumerate(HEADS)], 1)


def test_scores_equal_the_reference_forward(repo):
    folder, base, ref, rm_head = repo
    reward = VideoAlign(model=str(folder), **SMALL)
    assert reward.differentiable is False and reward.space == "pixel"
    video = uint8_video(2, 9, 56, 84, seed=2)
    heads = reward.score_heads(video, PROMPTS)
    expected = reference_scores(ref, rm_head, base, video, PROMPTS, [0, 3, 5, 8])
    got = torch.stack([heads[h] for h in HEADS], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.std(0).min() > 0  # the samples differ, so the test can tell them apart
    torch.testing.assert_close(reward(video, PROMPTS), got.sum(1))  # Overall = VQ + MQ + TA
    assert set(reward.pop_metrics()) == set(HEADS) and reward.pop_metrics() == {}
    # one at a time (right padding, no position shift) equals the batch
    torch.testing.assert_close(reward.score_heads(video[1:], PROMPTS[1:])["TA"], heads["TA"][1:], atol=1e-5, rtol=0)


def test_heads_weights_and_positions(repo):
    folder = repo[0]
    video = uint8_video(2, 9, 56, 84, seed=3)
    full = VideoAlign(model=str(folder), **SMALL)
    heads = full.score_heads(video, PROMPTS)
    mq = VideoAlign(model=str(folder), heads="MQ", weights={"MQ": 2.0}, **SMALL)
    torch.testing.assert_close(mq(video, PROMPTS), 2 * heads["MQ"])
    raw = VideoAlign(model=str(folder), use_norm=False, **SMALL).score_heads(video, PROMPTS)
    torch.testing.assert_close(raw["VQ"], heads["VQ"] * 2.0 + 0.5)  # VQ std 2, mean 0.5 in model_config.json
    mrope = VideoAlign(model=str(folder), positions="mrope", **SMALL).score_heads(video, PROMPTS)
    assert not torch.allclose(mrope["TA"], heads["TA"])  # 3-D positions are a different model input


def test_output_dim_3_reads_the_kth_output_at_the_kth_token(repo, tmp_path):
    folder, base, ref, _ = repo
    other = tmp_path / "VideoReward3"
    shutil.copytree(folder, other)
    torch.manual_seed(5)
    head3 = torch.nn.Linear(32, 3, bias=False).eval()
    sd = torch.load(other / "checkpoint-7" / "model.pth", weights_only=True)
    sd["rm_head.weight"] = head3.weight.detach().clone()
    torch.save(sd, other / "checkpoint-7" / "model.pth")
    video = uint8_video(2, 9, 56, 84, seed=4)
    heads = VideoAlign(model=str(other), **SMALL).score_heads(video, PROMPTS)
    expected = reference_scores(ref, head3, base, video, PROMPTS, [0, 3, 5, 8], output_dim=3)
    torch.testing.assert_close(torch.stack([heads[h] for h in HEADS], 1), expected, atol=1e-5, rtol=1e-5)


def test_only_the_sampled_frames_matter(repo):
    reward = VideoAlign(model=str(repo[0]), **SMALL)  # 9 frames at 16 fps -> frames 0, 3, 5, 8
    video = uint8_video(1, 9, 56, 84, seed=6)
    base = reward.score_heads(video, PROMPTS[:1])["VQ"]
    for f, matters in ((1, False), (4, False), (3, True), (8, True)):
        v = video.clone()
        v[:, :, f] = -v[:, :, f]
        changed = not torch.allclose(reward.score_heads(v, PROMPTS[:1])["VQ"], base, atol=1e-7)
        assert changed == matters, f
    pix = reward.inputs(video, PROMPTS[:1])["pixel_values_videos"]
    ref, _ = video_pixels(video[:, :, [0, 3, 5, 8]].transpose(1, 2), 28 * 28, 56 * 84)
    assert torch.equal(pix, ref)


def test_bad_inputs_are_one_line_errors(repo, tmp_path):
    folder = str(repo[0])
    cases = [
        (dict(heads=["VQ", "AQ"]), "heads ['AQ'] unknown"),
        (dict(template="no tokens {text_prompt}"), "template must hold"),
        (dict(positions="2d"), "positions must be"),
        (dict(fps=2.0, num_frames=4), "fps or num_frames"),
    ]
    for kw, text in cases:
        with pytest.raises(TrlVideoError, match=re.escape(text)) as exc:
            VideoAlign(model=folder, **kw)
        assert "\n" not in str(exc.value)
    with pytest.raises(TrlVideoError, match=re.escape(f"'{tmp_path}' has no file 'model_config.json'")):
        VideoAlign(model=str(tmp_path))
    cfg = json.loads((repo[0] / "model_config.json").read_text())
    bad = tmp_path / "nospecial"
    bad.mkdir()
    cfg["model_config"]["use_special_tokens"] = False
    (bad / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrlVideoError, match="use_special_tokens false"):
        VideoAlign(model=str(bad))
    reward = VideoAlign(model=folder, **SMALL)
    with pytest.raises(TrlVideoError, match=r"videos \[B, 3, F, H, W\]"):
        reward(torch.zeros(2, 3, 56, 84), PROMPTS)
    assert np.isfinite(reward(uint8_video(2, 4, 56, 84), PROMPTS).numpy()).all()


def test_chat_template_from_chat_template_json(repo, tmp_path):
    """A base whose tokenizer has no chat template, but a processor-side ``chat_template.json`` (newer Qwen2-VL
    repos): the same scores; with neither, a one-line error naming the base."""
    folder, base = repo[0], repo[1]
    bare = tmp_path / "base"
    shutil.copytree(base, bare)
    for f in bare.iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            f.write_text(json.dumps(cfg))
        elif f.name.startswith("chat_template"):
            f.unlink()
    with pytest.raises(TrlVideoError, match=re.escape(f"'{bare}' has no chat template")):
        VideoAlign(model=str(folder), base=str(bare), **SMALL)
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": tiny.QWEN2VL_CHAT_TEMPLATE}))
    video = uint8_video(1, 9, 56, 84, seed=7)
    ours = VideoAlign(model=str(folder), base=str(bare), **SMALL).score_heads(video, PROMPTS[:1])
    theirs = VideoAlign(model=str(folder), **SMALL).score_heads(video, PROMPTS[:1])
    assert all(torch.equal(ours[h], theirs[h]) for h in HEADS)


def test_registered_and_built_by_name(repo):
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    r = build_reward(get_registry(), "videoalign", {"model": str(repo[0]), **SMALL})
    assert isinstance(r, VideoAlign) and r.heads == list(HEADS)
