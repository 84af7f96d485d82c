"""The world ImageReward: its preference pairs follow the stated rules, and a trained folder loads through the
registered ``imagereward`` reward (the path the Reward-Forcing ablation uses)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trl_video import world
from trl_video.bench_discovery import import_benchmark
from trl_video.errors import TrlVideoError

wir = import_benchmark("reward_forcing", "world_imagereward")


def test_pairs_follow_the_raters_rules():
    win, lose, prompts, kinds = wir.make_pairs("heldout", 80, np.random.default_rng(0), (*wir.KINDS, "composition"))
    assert set(kinds) == {*wir.KINDS, "composition"}
    heldout = {c.text for c in world.captions("heldout")}
    assert set(prompts) <= heldout
    for w, lo, p, k in zip(win, lose, prompts, kinds, strict=True):
        cap = world.Caption.parse(p)
        w_sat = (w.amax(0) - w.amin(0)) > 0.5
        if k == "composition":  # both true frames; the preferred subject nearer the centre by >= 3 px
            assert wir.object_offset(w) + 3.0 <= wir.object_offset(lo)
        elif k == "attribute":  # same place and size, exactly one of colour / shape / background changed
            bg_w, bg_l = w[:, ~w_sat].mean(), lo[:, ~w_sat].mean()
            core_w, core_l = ((x.amax(0) - x.amin(0)) > 0.85 for x in (w, lo))  # alpha > ~1/2 for every colour
            colour_changed = not torch.allclose(w[:, core_w].median(1).values, lo[:, core_l].median(1).values,
                                                atol=0.05)  # the median core pixel is the pure colour
            shape_changed = int((core_w != core_l).sum()) > 6  # a colour change moves at most a few edge pixels
            bg_changed = abs(float(bg_w - bg_l)) > 0.2
            assert colour_changed + shape_changed + bg_changed == 1, (p, colour_changed, shape_changed, bg_changed)
        else:  # degraded copies of the preferred frame: same background level, the object less crisp
            assert abs(float(w[:, ~w_sat].mean() - world.BACKGROUNDS[cap.background])) < 0.05
            assert float((w - lo).abs().mean()) > 0.005


def test_trained_folder_loads_as_the_registered_reward(tmp_path):
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    out = tmp_path / "wir"
    assert wir.main(["--out", str(out), "--steps", "3", "--batch", "4", "--heldout-pairs", "12"]) == 0
    info = json.loads((out / "world_imagereward.json").read_text())
    assert "all" in info["heldout_acc"] and set(info["heldout_acc"]) - {"all"} <= set(wir.KINDS)
    reward = build_reward(get_registry(), "imagereward", info["reward_args"])
    video = world.render_batch(["a red circle moving left on a dark background"] * 2, [0, 1]).requires_grad_(True)
    score = reward(video, ["a red circle moving left on a dark background"] * 2)
    assert score.shape == (2,) and torch.isfinite(score).all()
    score.sum().backward()  # differentiable to the pixels, last frame only (the reward's default frames)
    grad = video.grad.abs().sum(dim=(0, 1, 3, 4))
    assert grad[-1] > 0 and grad[:-1].sum() == 0


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(TrlVideoError, match="--steps and --batch must be >= 1"):
        wir.main(["--out", str(tmp_path / "x"), "--steps", "0"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrlVideoError, match="--out .*file is a file; give a folder"):
        wir.main(["--out", str(tmp_path / "file"), "--steps", "1"])
    assert (tmp_path / "file").read_text() == "x"
