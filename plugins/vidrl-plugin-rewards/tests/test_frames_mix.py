"""Frame selection and the normalised reward mix, against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vidrl_plugin_rewards.frames import FrameRewardMixin, FrameSelection, gather_frames
from vidrl_plugin_rewards.mix import MixReward, RunningMoments

from trl_video.errors import TrlVideoError


def indexed_video(b: int = 3, f: int = 7) -> torch.Tensor:
    """Pixel value = (sample * 100 + frame) / 1000 everywhere, so a gathered image names its source."""
    v = torch.zeros(b, 3, f, 4, 4)
    for i in range(b):
        for j in range(f):
            v[i, :, j] = (i * 100 + j) / 1000
    return v


class FrameId(FrameRewardMixin):
    """score = the frame's id read back from its pixels."""

    def __init__(self, mode: str, k: int = 1, seed: int = 0):
        self.frames = FrameSelection(mode, k, seed)

    def score_images(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * 1000


@pytest.mark.parametrize("mode,k,expected", [("last", 1, [6]), ("first", 1, [0]), ("uniform", 3, [0, 3, 6]),
                                             ("uniform", 4, [0, 2, 4, 6]), ("all", 1, list(range(7)))])
def test_deterministic_modes_pick_the_right_frames(mode, k, expected):
    reward = FrameId(mode, k)
    scores, idx = reward.score_frames(indexed_video(), ["p"] * 3)
    assert idx.tolist() == [expected] * 3
    want = torch.tensor([[i * 100 + j for j in expected] for i in range(3)], dtype=torch.float32)
    torch.testing.assert_close(scores, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(reward(indexed_video(), ["p"] * 3), want.mean(1), atol=1e-3, rtol=0)


def test_random_frames_distinct_per_sample_and_seeded():
    a, b = FrameSelection("random", 3, seed=5), FrameSelection("random", 3, seed=5)
    ia, ib = a.indices(4, 9), b.indices(4, 9)
    assert torch.equal(ia, ib) and ia.shape == (4, 3)
    assert all(len(set(row.tolist())) == 3 and row.min() >= 0 and row.max() < 9 for row in ia)
    assert not all(torch.equal(ia[0], r) for r in ia[1:])  # different samples get different frames
    scores, idx = FrameId("random", 2, seed=1).score_frames(indexed_video(), ["p"] * 3)
    torch.testing.assert_close(scores, (torch.arange(3).view(3, 1) * 100 + idx).float(), atol=1e-3, rtol=0)
    state = a.state_dict()
    nxt = a.indices(2, 9)
    a.load_state_dict(state)
    assert torch.equal(a.indices(2, 9), nxt)


def test_gather_frames_is_differentiable():
    v = indexed_video().requires_grad_(True)
    imgs = gather_frames(v, torch.tensor([[1], [2], [3]]))
    imgs.sum().backward()
    hit = v.grad.sum(dim=(1, 3, 4))
    assert hit[0, 1] > 0 and hit[1, 2] > 0 and hit[2, 3] > 0 and hit.sum() == 3 * 3 * 16


def test_bad_frame_mode_names_it():
    with pytest.raises(TrlVideoError, match="unknown mode 'middle'"):
        FrameSelection("middle")


def test_running_moments_match_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, size=n) for n in (4, 7, 1, 5)]
    m = RunningMoments()
    for b in batches:
        m.update(torch.tensor(b))
    allv = np.concatenate(batches)
    assert m.mean == pytest.approx(allv.mean()) and m.std == pytest.approx(allv.std())


def test_mix_normalises_each_component_and_logs_raw_means():
    mix = MixReward({"luminance": {"weight": 2.0}, "motion": {"weight": 0.5}})
    g = torch.Generator().manual_seed(0)
    vids = [torch.rand(4, 3, 3, 8, 8, generator=g) * 2 - 1 for _ in range(3)]
    from trl_video.components.rewards import LuminanceReward, MotionReward

    lum, mot = LuminanceReward(), MotionReward()
    seen_l: list[torch.Tensor] = []
    seen_m: list[torch.Tensor] = []
    for v in vids:
        out = mix(v, ["p"] * 4)
        seen_l.append(lum(v, []))
        seen_m.append(mot(v, []))
        al, am = torch.cat(seen_l).double(), torch.cat(seen_m).double()
        want = (2.0 * (seen_l[-1] - al.mean()) / (al.std(unbiased=False) + 1e-6)
                + 0.5 * (seen_m[-1] - am.mean()) / (am.std(unbiased=False) + 1e-6))
        torch.testing.assert_close(out.double(), want.double(), atol=1e-5, rtol=1e-5)
    metrics = mix.pop_metrics()
    assert metrics["luminance"] == pytest.approx(float(torch.cat(seen_l).mean()), abs=1e-6)
    assert mix.pop_metrics() == {}
    raw = MixReward({"luminance": {"weight": 2.0}}, normalize=False)
    torch.testing.assert_close(raw(vids[0], ["p"] * 4), 2.0 * lum(vids[0], []))


def test_mix_rejects_bad_components():
    with pytest.raises(TrlVideoError, match="needs reward_args.components"):
        MixReward({})
    with pytest.raises(TrlVideoError, match="unknown keys \\['wieght'\\]"):
        MixReward({"luminance": {"wieght": 1}})
