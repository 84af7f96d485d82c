"""Estimators (group / batch advantages), FIFO replay, offline latents and video encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trl_video import world
from trl_video.components.base import TrainContext
from trl_video.components.estimators import BatchNormalized, GroupAdvantage, NoEstimator, group_advantages
from trl_video.components.replay import FIFOReplay, FreshReplay
from trl_video.components.rewards import LuminanceReward
from trl_video.config import VideoRewardConfig
from trl_video.errors import TrlVideoError
from trl_video.models.presets import build_random
from trl_video.rollouts import Rollouts


@pytest.fixture(scope="module")
def policy():
    return build_random("wan")


def make_ctx(policy, seed: int = 0) -> TrainContext:
    from accelerate import Accelerator

    config = VideoRewardConfig(model="tiny-wan-random", report_to="none", save_model_at_end=False, max_steps=1,
                               seed=seed)
    return TrainContext(policy=policy, config=config, accelerator=Accelerator(), reward=LuminanceReward(),
                        method_config=None, generator=torch.Generator().manual_seed(seed))


def rollouts(n: int, rewards=None, adv=None, gids=None, prompts=None, tag: float = 0.0, source="online") -> Rollouts:
    lat = (tag + torch.arange(n, dtype=torch.float32)).view(n, 1, 1, 1, 1).expand(n, 2, 1, 2, 2).clone()
    return Rollouts(latents=lat, prompts=prompts or [f"p{tag:g}-{i}" for i in range(n)],
                    rewards=None if rewards is None else torch.tensor(rewards, dtype=torch.float32),
                    advantages=None if adv is None else torch.tensor(adv, dtype=torch.float32),
                    group_ids=None if gids is None else torch.tensor(gids), source=source)


# ------------------------------------------------------------------------------------------------ estimators
def test_group_advantages_hand_example():
    # groups interleaved on purpose: selection must go by id, not by position
    r = torch.tensor([1.0, 2.0, 3.0, 2.0, 5.0, 2.0])
    g = torch.tensor([0, 1, 0, 1, 2, 2])
    eps = 1e-4
    # group 0: {1, 3} mean 2 std 1; group 1: {2, 2} mean 2 std 0; group 2: {5, 2} mean 3.5 std 1.5
    expect = torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 1.5 / (1.5 + eps), -1.5 / (1.5 + eps)])
    torch.testing.assert_close(group_advantages(r, g, "group", eps), expect)
    # std="none": centred only
    torch.testing.assert_close(group_advantages(r, g, "none", eps), torch.tensor([-1.0, 0, 1, 0, 1.5, -1.5]))
    # std="batch": population std of the whole batch: mean 2.5, sum of squared deviations 9.5 -> sqrt(9.5 / 6)
    bstd = (9.5 / 6) ** 0.5
    torch.testing.assert_close(group_advantages(r, g, "batch", eps),
                               torch.tensor([-1.0, 0, 1, 0, 1.5, -1.5]) / (bstd + eps))


def test_group_advantage_component_one_process(policy):
    ctx = make_ctx(policy)
    rng = np.random.default_rng(0)
    r = rng.normal(size=12).astype(np.float32)
    gids = np.repeat(np.arange(3), 4)
    rng.shuffle(gids)
    batch = rollouts(12, rewards=r.tolist(), gids=gids.tolist())
    out = GroupAdvantage(eps=1e-4)(ctx, batch)
    ref = np.empty_like(r)
    for gid in np.unique(gids):
        sel = gids == gid
        ref[sel] = (r[sel] - r[sel].mean()) / (r[sel].std() + 1e-4)  # numpy std: population
    np.testing.assert_allclose(out.advantages.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert batch.advantages is None  # the input batch is not modified
    # other sources get NaN (left to the loss); no rewards: untouched
    rep = GroupAdvantage()(ctx, rollouts(4, rewards=[1, 2, 3, 4], gids=[0, 0, 1, 1], source="replay"))
    assert torch.isnan(rep.advantages).all()
    assert GroupAdvantage()(ctx, rollouts(2, gids=[0, 0])).advantages is None
    with pytest.raises(TrlVideoError):
        GroupAdvantage(std="bogus")


def test_batch_normalized_and_none(policy):
    ctx = make_ctx(policy)
    r = [0.5, 1.5, -2.0, 4.0]
    out = BatchNormalized(eps=1e-4)(ctx, rollouts(4, rewards=r))
    a = np.array(r, dtype=np.float32)
    np.testing.assert_allclose(out.advantages.numpy(), (a - a.mean()) / (a.std() + 1e-4), rtol=1e-5)
    b = rollouts(2, rewards=[1, 2])
    assert NoEstimator()(ctx, b) is b


# ------------------------------------------------------------------------------------------------ FIFO replay
def test_fifo_capacity_evicts_oldest(policy):
    ctx = make_ctx(policy)
    buf = FIFOReplay(capacity=3)
    buf.update(ctx, rollouts(2, rewards=[0.0, 1.0], adv=[0.1, 0.2], tag=0))
    assert len(buf) == 2
    buf.update(ctx, rollouts(2, rewards=[2.0, 3.0], adv=[0.3, 0.4], tag=10))
    assert len(buf) == 3 and buf.inserted == 4
    # oldest (tag 0, index 0) evicted; order preserved
    assert buf.latents[:, 0, 0, 0, 0].tolist() == [1.0, 10.0, 11.0]
    assert buf.prompts == ["p0-1", "p10-0", "p10-1"]
    assert buf.rewards.tolist() == [1.0, 2.0, 3.0]
    torch.testing.assert_close(buf.advantages, torch.tensor([0.2, 0.3, 0.4]))
    buf.update(ctx, rollouts(3, rewards=[4.0, 5.0, 6.0], adv=[0, 0, 0], tag=20))
    assert buf.latents[:, 0, 0, 0, 0].tolist() == [20.0, 21.0, 22.0]
    assert buf.prompts == ["p20-0", "p20-1", "p20-2"]
    # stored detached on CPU
    assert not buf.latents.requires_grad and buf.latents.device.type == "cpu"


@pytest.mark.parametrize("filt,kept", [("positive", [1, 3]), ("negative", [0, 4]), ("all", [0, 1, 2, 3, 4])])
def test_fifo_filter_on_advantages(policy, filt, kept):
    ctx = make_ctx(policy)
    buf = FIFOReplay(capacity=10, filter=filt)
    adv = [-1.0, 2.0, 0.0, 0.5, -0.3]
    buf.update(ctx, rollouts(5, rewards=[10, 11, 12, 13, 14], adv=adv))
    assert buf.latents[:, 0, 0, 0, 0].tolist() == [float(k) for k in kept]
    assert buf.prompts == [f"p0-{k}" for k in kept]
    assert buf.rewards.tolist() == [10.0 + k for k in kept]
    torch.testing.assert_close(buf.advantages, torch.tensor([adv[k] for k in kept]))


def test_fifo_filter_needs_advantages(policy):
    ctx = make_ctx(policy)
    with pytest.raises(TrlVideoError, match="advantages"):
        FIFOReplay(filter="positive").update(ctx, rollouts(2, rewards=[1, 2]))
    with pytest.raises(TrlVideoError):
        FIFOReplay(filter="maybe")


def test_fifo_sample_and_state_dict_roundtrip(policy):
    ctx = make_ctx(policy, seed=3)
    prompts = ["a red circle moving left on a dark background", "a blue square moving up on a light background",
               "a green circle moving down on a gray background"]
    buf = FIFOReplay(capacity=5, batch_size=4)
    fresh = rollouts(3, rewards=[1, 2, 3], adv=[-1, 0, 1], prompts=prompts)
    # empty buffer returns the fresh batch
    assert FIFOReplay().sample(ctx, fresh) is fresh
    buf.update(ctx, fresh)
    buf.update(ctx, rollouts(2, rewards=[4, 5], adv=[2, 3], prompts=prompts[:2], tag=10))
    state = buf.state_dict()
    other = FIFOReplay(capacity=5, batch_size=4)
    other.load_state_dict(state)
    assert len(other) == len(buf) == 5 and other.inserted == 5 and other.prompts == buf.prompts
    for k in ("latents", "rewards", "advantages"):
        assert torch.equal(getattr(other, k), getattr(buf, k))
    # same generator state -> same replayed batch
    g_state = ctx.generator.get_state()
    a = buf.sample(ctx, fresh)
    ctx.generator.set_state(g_state)
    b = other.sample(ctx, fresh)
    assert a.source == "replay" and len(a) == 4
    assert torch.equal(a.latents, b.latents) and a.prompts == b.prompts
    # consistency of each replayed row: latents tag, prompt, reward and embeddings belong together
    for i in range(4):
        j = int((buf.latents[:, 0, 0, 0, 0] == a.latents[i, 0, 0, 0, 0]).nonzero()[0])
        assert a.prompts[i] == buf.prompts[j]
        assert float(a.rewards[i]) == float(buf.rewards[j])
        assert torch.equal(a.prompt_embeds[i], policy.encode_prompts([buf.prompts[j]])[0][0])
    # an empty buffer's state round-trips too
    empty = FIFOReplay()
    empty.load_state_dict(FIFOReplay().state_dict())
    assert len(empty) == 0


def test_fresh_replay_passthrough(policy):
    ctx = make_ctx(policy)
    b = rollouts(2)
    assert FreshReplay().sample(ctx, b) is b


# ------------------------------------------------------------------------------------------------ offline latents
def test_offline_latents_roundtrip(policy, tmp_path):
    from trl_video.data import OfflineLatents, save_offline_latents

    shape = policy.latent_shape
    n = 5
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(n, *shape, generator=g)
    prompts = [c.text for c in world.captions("train")[:n]]
    rewards = torch.arange(n, dtype=torch.float32) / 10
    save_offline_latents(str(tmp_path / "ds"), prompts, lat, rewards)

    with pytest.raises(TrlVideoError) as ei:
        OfflineLatents(str(tmp_path / "ds"), (shape[0] + 1, *shape[1:]))
    msg = str(ei.value)
    assert str(tuple(shape)) in msg and str((shape[0] + 1, *shape[1:])) in msg
    with pytest.raises(TrlVideoError, match="not found"):
        OfflineLatents(str(tmp_path / "nope"), shape)

    off = OfflineLatents(str(tmp_path / "ds"), shape, seed=1)
    assert len(off) == n
    ctx = make_ctx(policy)
    seen = []
    for _ in range(2):  # 2 batches of 2, then 1 more row of the same epoch
        b = off.next_batch(ctx, 2)
        assert b.source == "offline" and b.latents.shape == (2, *shape)
        for i, idx in enumerate(b.offline_index.tolist()):
            assert b.prompts[i] == prompts[idx]
            assert torch.equal(b.latents[i], lat[idx])
            assert abs(float(b.rewards[i]) - float(rewards[idx])) < 1e-6
            assert torch.equal(b.prompt_embeds[i], policy.encode_prompts([prompts[idx]])[0][0])
            seen.append(idx)
    last = off.next_batch(ctx, 1)
    seen += last.offline_index.tolist()
    assert sorted(seen) == list(range(n))  # one epoch visits every row exactly once
    # state round trip: the stream continues identically
    st = off.state_dict()
    nxt = off.next_batch(ctx, 3).offline_index.tolist()
    off2 = OfflineLatents(str(tmp_path / "ds"), shape, seed=123)
    off2.load_state_dict(st)
    assert off2.next_batch(ctx, 3).offline_index.tolist() == nxt


# ------------------------------------------------------------------------------------------------ encode_videos
def test_encode_videos_gifs(policy, tmp_path):
    import imageio.v3 as iio

    from trl_video.data import encode_videos, read_video

    folder = tmp_path / "videos"
    folder.mkdir()
    texts = ["a red circle moving right on a dark background", "a cyan square moving down on a light background"]
    caps = {}
    clips = []
    for i, text in enumerate(texts):
        v = world.render(world.Caption.parse(text), seed=40 + i)  # [3, F, H, W] in [-1, 1]
        clips.append(torch.from_numpy(v))
        frames = ((v.transpose(1, 2, 3, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        iio.imwrite(folder / f"clip_{i}.gif", frames, extension=".gif", duration=100, loop=0)
        caps[f"clip_{i}.gif"] = text
    (folder / "captions.json").write_text(json.dumps(caps))
    (folder / "notes.md").write_text("not a video")

    out = tmp_path / "latents"
    assert encode_videos(str(folder), policy, str(out), batch_size=1) == 2

    import datasets

    ds = datasets.load_from_disk(str(out))
    assert ds["prompt"] == texts
    assert set(ds["source"]) == {"real"}
    lat = torch.tensor(np.asarray(ds.with_format("numpy")["latents"]))
    assert tuple(lat.shape[1:]) == tuple(policy.latent_shape)

    # the GIF decodes back close to the rendered clip, and the stored latents are its VAE encoding
    pix = torch.stack([read_video(folder / f"clip_{i}.gif", policy.num_frames, policy.height, policy.width)
                       for i in range(2)])
    assert pix.shape == (2, 3, world.NUM_FRAMES, world.SIZE, world.SIZE)
    assert (pix - torch.stack(clips)).abs().mean() < 0.05
    with torch.no_grad():
        ref = policy.encode_video(pix)
    torch.testing.assert_close(lat, ref.cpu(), atol=1e-4, rtol=1e-4)

    # the dataset loads as an offline stream for this policy
    from trl_video.data import OfflineLatents

    assert len(OfflineLatents(str(out), policy.latent_shape)) == 2


def test_encode_videos_errors(policy, tmp_path):
    from trl_video.data import encode_videos

    with pytest.raises(TrlVideoError, match="not found"):
        encode_videos(str(tmp_path / "missing"), policy, str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrlVideoError, match="no video files"):
        encode_videos(str(tmp_path / "empty"), policy, str(tmp_path / "o"))
