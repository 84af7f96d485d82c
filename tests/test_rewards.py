"""Built-in rewards on hand-made videos: constant colours (closed forms) and ground-truth world clips."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trl_video import world
from trl_video.components.rewards import (
    AlignmentReward,
    LuminanceReward,
    MotionReward,
    SharpnessReward,
    WeightedSum,
)

F, S = world.NUM_FRAMES, world.SIZE
W601 = (0.299, 0.587, 0.114)


def constant_video(rgb, b: int = 1, f: int = F) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(b, 3, f, S, S).clone()


def clip(text: str, seed: int = 0) -> torch.Tensor:
    return world.render_batch([text], [seed])


# ------------------------------------------------------------------------------------------------ luminance
def test_luminance_constant_grey_closed_form():
    lum = LuminanceReward()
    for v in (-1.0, -0.5, 0.0, 0.3, 1.0):
        r = lum(constant_video((v, v, v)), ["x"])
        assert r.shape == (1,)
        assert abs(float(r) - (v + 1) / 2) < 1e-6  # BT.601 weights sum to 1


def test_luminance_constant_colour_closed_form():
    lum = LuminanceReward()
    for rgb in [(0.9, -0.8, -0.8), (-0.8, 0.8, -0.8), (-0.8, -0.6, 0.9), (0.2, 0.4, -0.1)]:
        ref = sum(w * (c + 1) / 2 for w, c in zip(W601, rgb))
        assert abs(float(lum(constant_video(rgb), ["x"])) - ref) < 1e-6
    # pure green is brighter than pure blue (0.587 vs 0.114)
    g = float(lum(constant_video((-1, 1, -1)), ["x"]))
    b = float(lum(constant_video((-1, -1, 1)), ["x"]))
    assert abs(g - 0.587) < 1e-6 and abs(b - 0.114) < 1e-6


def test_luminance_bright_clip_beats_dark_clip():
    lum = LuminanceReward()
    bright = world.render_batch(["a yellow square moving left on a light background"] * 3, [0, 1, 2])
    dark = world.render_batch(["a blue circle moving left on a dark background"] * 3, [0, 1, 2])
    rb, rd = lum(bright, ["p"] * 3), lum(dark, ["p"] * 3)
    assert (rb > rd + 0.3).all(), (rb, rd)
    # independent per-pixel computation on one clip
    v = bright[0].double()
    ref = sum(w * (v[c] + 1) / 2 for c, w in enumerate(W601)).mean()
    assert abs(float(rb[0]) - float(ref)) < 1e-5


def test_luminance_gradient_closed_form():
    v = torch.zeros(1, 3, 2, 4, 4, requires_grad=True)
    LuminanceReward()(v, ["x"]).sum().backward()
    n = 2 * 4 * 4
    for c, w in enumerate(W601):
        torch.testing.assert_close(v.grad[0, c], torch.full((2, 4, 4), w / 2 / n))


# ------------------------------------------------------------------------------------------------ motion
def test_motion_zero_for_static_clip():
    mot = MotionReward()
    frame0 = clip("a red circle moving right on a gray background")[:, :, :1]
    static = frame0.expand(-1, -1, F, -1, -1).contiguous()
    assert float(mot(static, ["p"])) == 0.0
    assert float(mot(constant_video((0.1, 0.2, 0.3)), ["p"])) == 0.0
    assert float(mot(static[:, :, :1], ["p"])) == 0.0  # one frame: no motion


def test_motion_positive_for_moving_clip():
    mot = MotionReward()
    texts = [f"a {c} {s} moving {m} on a dark background" for c, s, m in
             [("red", "circle", "left"), ("cyan", "square", "down"), ("yellow", "circle", "up")]]
    moving = world.render_batch(texts, [1, 2, 3])
    r = mot(moving, texts)
    assert (r > 1e-3).all(), r


def test_motion_closed_form_alternating_frames():
    a, b = -0.2, 0.5
    v = constant_video((a, a, a), f=5)
    v[:, :, 1::2] = b
    assert abs(float(MotionReward()(v, ["p"])) - abs(a - b)) < 1e-6
    # a ramp of step d per frame: motion = d
    ramp = torch.linspace(-1, 1, 5).view(1, 1, 5, 1, 1).expand(2, 3, 5, 4, 4)
    torch.testing.assert_close(MotionReward()(ramp, ["p", "q"]), torch.full((2,), 0.5))


# ------------------------------------------------------------------------------------------------ sharpness
def test_sharpness_step_edge_closed_form():
    """A vertical black|white edge: one column of horizontal differences of 1 (luma), none vertical, so
    E = H * 1 / (H * (W - 1)) = 1 / (W - 1); a flat frame scores 0; the video's score is the per-frame mean."""
    edge = constant_video((-1.0, -1.0, -1.0), f=2)
    edge[:, :, 1, :, S // 2:] = 1.0  # frame 1: the edge; frame 0 stays flat
    scale = 0.01
    r = SharpnessReward(scale=scale)(edge, ["p"])
    assert abs(float(r) - math.tanh(1 / (S - 1) / scale) / 2) < 1e-6
    # a grey step of luma height h = (b - a) / 2, horizontal this time: E = h^2 / (H - 1)
    a, b = -0.4, 0.2
    hstep = constant_video((a, a, a), f=1)
    hstep[:, :, :, S // 2:, :] = b
    assert abs(float(SharpnessReward(scale=scale)(hstep, ["p"])) - math.tanh(((b - a) / 2) ** 2 / (S - 1) / scale)) < 1e-6


def test_sharpness_prefers_crisp_frames_and_ignores_frame_order():
    v = clip("a red circle moving left on a dark background")
    blurred = torch.nn.functional.avg_pool3d(v, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    sharp = SharpnessReward()
    assert float(sharp(v, ["p"])) > float(sharp(blurred, ["p"])) + 0.1
    # no notion of motion: a static clip of frame 0 and the moving clip score alike, any frame order too
    static = v[:, :, :1].expand(-1, -1, F, -1, -1)
    torch.testing.assert_close(sharp(v.flip(2), ["p"]), sharp(v, ["p"]))
    assert abs(float(sharp(static, ["p"])) - float(sharp(v, ["p"]))) < 0.02


# ------------------------------------------------------------------------------------------------ alignment
def _margins(attr: str, options) -> list[float]:
    reward = AlignmentReward()
    out = []
    for i, cap in enumerate(world.all_captions()):
        v = torch.from_numpy(world.render(cap, 7919 * i + 3))[None]
        alts = [dataclasses.replace(cap, **{attr: o}).text for o in options if o != getattr(cap, attr)]
        prompts = [cap.text, *alts]
        r = reward(v.expand(len(prompts), -1, -1, -1, -1), prompts)
        out += (r[0] - r[1:]).tolist()
    return out


@pytest.mark.parametrize("attr,options,min_rate", [
    ("color", list(world.COLORS), 1.0),
    ("motion", list(world.MOTIONS), 1.0),
    ("shape", list(world.SHAPES), 0.9),
    ("background", list(world.BACKGROUNDS), 1.0),
])
def test_alignment_prefers_the_true_caption(attr, options, min_rate):
    margins = _margins(attr, options)
    n_alt = len(options) - 1
    assert len(margins) == 144 * n_alt
    rate = sum(m > 0 for m in margins) / len(margins)
    assert rate >= min_rate, (attr, rate, min(margins))


def test_alignment_components_signs():
    reward = AlignmentReward()
    text = "a green square moving down on a light background"
    v = clip(text, 5)
    comps = reward.components(v, [text])
    assert float(comps["color"][0]) > 0.3
    assert float(comps["motion"][0]) > 0.5  # 8 frames * 1.6 px = 12.8 px down: tanh(12.8 / 6)
    assert float(comps["shape"][0]) > 0
    wrong_motion = reward.components(v, ["a green square moving up on a light background"])
    assert abs(float(wrong_motion["motion"][0]) + float(comps["motion"][0])) < 1e-5  # exactly the opposite sign
    wrong_shape = reward.components(v, ["a green circle moving down on a light background"])
    assert abs(float(wrong_shape["shape"][0]) + float(comps["shape"][0])) < 1e-5
    # weighted sum of the components
    wc, wb, wm, ws = reward.weights
    ref = wc * comps["color"] + wb * comps["background"] + wm * comps["motion"] + ws * comps["shape"]
    torch.testing.assert_close(reward(v, [text]), ref)


def test_alignment_non_caption_scores_zero():
    v = clip("a red circle moving left on a dark background")
    assert float(AlignmentReward()(v, ["a photo of a cat"])) == 0.0


def test_alignment_is_differentiable():
    reward = AlignmentReward()
    texts = ["a magenta circle moving right on a gray background", "a blue square moving up on a dark background"]
    gt = world.render_batch(texts, [11, 12])
    # a noisy version of the ground truth, so the reward is not saturated
    g = torch.Generator().manual_seed(0)
    x = (gt + 0.3 * torch.randn(gt.shape, generator=g)).clamp(-1, 1).requires_grad_(True)
    r = reward(x, texts)
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert (x.grad[0].abs().sum() > 0) and (x.grad[1].abs().sum() > 0)
    # the gradient is an ascent direction (first-order check)
    with torch.no_grad():
        step = 1e-2 * x.grad / x.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
        r2 = reward(x + step, texts)
    assert (r2 > r.detach()).all(), (r, r2)


def test_weighted_sum_of_rewards():
    v = clip("a red circle moving left on a dark background")
    lum, mot = LuminanceReward(), MotionReward()
    mix = WeightedSum({"luminance": (lum, 2.0), "motion": (mot, -0.5)})
    torch.testing.assert_close(mix(v, ["p"]), 2.0 * lum(v, ["p"]) - 0.5 * mot(v, ["p"]))
    assert mix.space == "pixel" and mix.differentiable


def test_alignment_batch_equals_per_sample_calls():
    """The batch is scored in one pass: each sample's value and gradient are those of scoring it alone."""
    reward = AlignmentReward()
    texts = ["a magenta circle moving right on a gray background", "a photo of a cat",
             "a blue square moving up on a dark background", "a yellow square moving down on a light background"]
    gt = world.render_batch([t if world.Caption.parse(t) else texts[0] for t in texts], [1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    x0 = (gt + 0.4 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    x = x0.clone().requires_grad_(True)
    r = reward(x, texts)
    (r * torch.arange(1.0, 5.0)).sum().backward()  # a different weight per sample: gradients must not mix
    assert float(r[1]) == 0.0 and float(x.grad[1].abs().sum()) == 0.0  # not a caption
    for i, t in enumerate(texts):
        xi = x0[i:i + 1].clone().requires_grad_(True)
        ri = reward(xi, [t])
        assert torch.equal(ri.detach(), r.detach()[i:i + 1]), (i, ri, r)
        if ri.requires_grad:  # a non-caption alone scores a constant 0
            (ri * (i + 1)).sum().backward()
            assert torch.equal(xi.grad, x.grad[i:i + 1]), i
    assert torch.equal(reward(x0, ["a photo of a cat"] * 4), torch.zeros(4))
