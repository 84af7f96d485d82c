"""VELR end to end: the truncated mid-step window, the loss against an independent computation, trainer steps
(online alignment, no gradient leak into the LRM, checkpoint state), `reward: lrm` in another method, and the
pre-training commands."""

import copy

import pytest
import torch
from conftest import PROMPTS, SMALL_LRM
from vidrl_plugin_velr.config import VELRConfig

from trl_video.config import VideoRewardConfig
from trl_video.trainer import VideoRewardTrainer


def make_trainer(policy, tmp_path, name="run", **over):
    cfg = dict(model="tiny-cogvideox-random", method="velr", reward="lrm", reward_args=dict(SMALL_LRM),
               method_args={"pixel_reward": "alignment"},
               sampler_args={"num_steps": 6, "grad_steps": 2, "start_range": [2, 2]},
               prompts_per_step=2, group_size=1, max_steps=1, output_dir=str(tmp_path / name), report_to="none",
               save_model_at_end=False)
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if k in ("method_args", "sampler_args") else v
    return VideoRewardTrainer(VideoRewardConfig(**cfg), policy=copy.deepcopy(policy))


def _lora(policy):
    return {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}


def test_gradients_only_in_the_window(cog_policy, tmp_path):
    tr = make_trainer(cog_policy, tmp_path)
    calls = []
    hook = tr.policy.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((torch.is_grad_enabled(), float(kw["timestep"][0]))), with_kwargs=True)
    emb, _ = tr.policy.encode_prompts(PROMPTS)
    with torch.enable_grad():
        out = tr.sampler.sample(tr.ctx, PROMPTS, emb, torch.arange(2))
    hook.remove()
    grid = tr.policy.schedule.timesteps(6)
    # steps 0, 1 before t_mid = grid[2] without grad; window steps 2, 3 and the one-shot x0 at grid[4] with grad
    assert [g for g, _ in calls] == [False, False, True, True, True]
    want_ts = [float(tr.policy.schedule.model_timestep(grid[i])) for i in range(5)]
    assert [t for _, t in calls] == pytest.approx(want_ts, rel=1e-5)
    assert torch.allclose(out.t_mid, grid[2].expand(2))
    assert torch.allclose(out.t_last, grid[4].expand(2)) and not out.x_last.requires_grad
    assert out.latents.requires_grad
    out.latents.sum().backward()
    grads = [p.grad for p in tr.policy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_policy_loss_matches_independent_computation(cog_policy, tmp_path):
    tr = make_trainer(cog_policy, tmp_path, method_args={"kl_weight": 10.0})
    torch.manual_seed(1)
    with torch.no_grad():  # move the LoRA away from the initial model so the KL is not 0
        for n, p in tr.policy.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    emb, _ = tr.policy.encode_prompts(PROMPTS)
    with torch.enable_grad():
        batch = tr.sampler.sample(tr.ctx, PROMPTS, emb, torch.arange(2))
        batch.rewards = tr.ctx.score(batch.latents, PROMPTS, grad=True)
    from trl_video.components.base import Phase

    loss, met = tr.loss.compute(tr.ctx, Phase("policy"), batch)
    with torch.no_grad():  # separately: -mean(mean_n R_n(z0)) + 10 * mean ||n_theta - n_init||^2 at x_last
        x, t = batch.x_last, batch.t_last
        n_theta = tr.policy.predict(x, t, emb)
        with tr.policy.reference() as ref:
            n_ref = tr.policy.predict(x, t, emb, transformer=ref)
        kl = ((n_theta - n_ref) ** 2).mean()
        members = torch.stack([m(batch.latents, tr.loss.lrm.text_tokens(PROMPTS, x.device))
                               for m in tr.loss.lrm.ensemble.members])
        want = -members.mean(0).mean() + 10.0 * kl
    assert kl > 1e-8
    assert torch.isclose(loss.detach(), want, rtol=1e-4, atol=1e-6)
    assert met["kl"] == pytest.approx(float(kl), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in tr.loss.lrm.ensemble.parameters())


def test_one_velr_step_end_to_end(cog_policy, tmp_path):
    tr = make_trainer(cog_policy, tmp_path, method_args={"align_every": 1, "align_rounds": 1,
                                                         "align_steps_per_round": 2, "align_lr": 1e-2})
    lrm0 = {k: v.clone() for k, v in tr.loss.lrm.ensemble.state_dict().items()}
    pol0 = _lora(tr.policy)
    tr.train()
    row = tr.history[-1]
    for key in ("policy/lrm_reward", "policy/kl", "buffer/true_reward", "buffer/abs_gap", "lrm/huber"):
        assert key in row and row[key] == row[key]
    assert row["buffer/buffer_size"] == 2 and len(tr.loss.buffer) == 2
    assert row["reward_mean"] == pytest.approx(row["policy/lrm_reward"], abs=1e-5)  # training reward = LRM
    assert any(not torch.equal(v, tr.loss.lrm.ensemble.state_dict()[k]) for k, v in lrm0.items())
    assert any(not torch.equal(v, dict(tr.policy.transformer.named_parameters())[k]) for k, v in pol0.items())
    # buffer + LRM live in the checkpoint and come back on resume
    resumed = make_trainer(cog_policy, tmp_path, name="run2", method_args={"align_every": 1})
    resumed.load_checkpoint(tmp_path / "run" / "checkpoint-1")
    assert resumed.loss.buffer.prompts == tr.loss.buffer.prompts
    assert torch.equal(resumed.loss.buffer.latents, tr.loss.buffer.latents)
    for k, v in tr.loss.lrm.ensemble.state_dict().items():
        assert torch.equal(resumed.loss.lrm.ensemble.state_dict()[k], v)


def test_policy_phase_leaves_the_lrm_alone_and_internal_mode(cog_policy, tmp_path):
    # the recipe's reward is the TRUE reward; VELR builds its own LRM; no online alignment
    tr = make_trainer(cog_policy, tmp_path, reward="alignment", reward_args={},
                      method_args={"lrm_args": dict(SMALL_LRM), "online_alignment": False, "pixel_reward": None})
    assert "lrm" not in tr.groups
    lrm0 = {k: v.clone() for k, v in tr.loss.lrm.ensemble.state_dict().items()}
    tr.train()
    row = tr.history[-1]
    assert row["reward_mean"] == pytest.approx(row["buffer/true_reward"], abs=1e-5)  # true reward, scored once
    assert all(torch.equal(v, tr.loss.lrm.ensemble.state_dict()[k]) for k, v in lrm0.items())
    assert all(p.grad is None for p in tr.loss.lrm.ensemble.parameters())
    assert len(tr.loss.buffer) == 0


def test_lrm_as_reward_of_another_method(cog_policy, tmp_path):
    from vidrl_plugin_velr.lrm import LRMReward

    lrm = LRMReward(**SMALL_LRM)
    lrm.ensure_built(cog_policy.latent_shape, 32)
    lrm.save(tmp_path / "lrm", extra={"text_model": "tiny-cogvideox-random"})
    tr = VideoRewardTrainer(VideoRewardConfig(
        model="tiny-cogvideox-random", method="refl", reward="lrm", reward_args={"path": str(tmp_path / "lrm")},
        sampler_args={"num_steps": 4, "grad_steps": 1}, prompts_per_step=2, group_size=1, max_steps=1,
        output_dir=str(tmp_path / "refl"), report_to="none", save_model_at_end=False), policy=copy.deepcopy(cog_policy))
    pol0 = _lora(tr.policy)
    tr.train()
    assert tr.history[-1]["reward_mean"] == tr.history[-1]["reward_mean"]
    assert any(not torch.equal(v, dict(tr.policy.transformer.named_parameters())[k]) for k, v in pol0.items())


def test_config_validation():
    with pytest.raises(ValueError):
        VELRConfig(kl_at="somewhere")
    with pytest.raises(ValueError):
        VELRConfig(online_alignment=True, true_reward_every=0)
    d = VELRConfig()
    assert (d.kl_weight, d.align_every, d.align_rounds, d.align_lr, d.buffer_size) == (10.0, 10, 2, 1e-5, 256)


def test_alignment_loss_matches_independent_computation(cog_policy, tmp_path):
    tr = make_trainer(cog_policy, tmp_path, method_args={"huber_delta": 0.1, "align_batch_size": 3})
    buf = tr.loss.buffer
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(5, *cog_policy.latent_shape, generator=g)
    prompts = [PROMPTS[i % 2] for i in range(5)]
    buf.insert(lat, prompts, torch.randn(5, generator=g), torch.tensor([0.1, 0.4, 0.2, 0.05, 0.25]))
    g2 = torch.Generator()
    g2.set_state(tr.loss.gen.get_state())
    total, _ = tr.loss._align(tr.ctx)
    n = len(tr.loss.lrm.ensemble)
    p = torch.tensor([0.1, 0.4, 0.2, 0.05, 0.25]) / 1.0
    idx = torch.multinomial(p / p.sum(), n * 3, replacement=True, generator=g2).view(n, 3)
    want = 0.0
    with torch.no_grad():
        for i, rows in enumerate(idx):
            text = tr.loss.lrm.text_tokens([prompts[j] for j in rows.tolist()], lat.device)
            pred = tr.loss.lrm.ensemble.members[i](lat[rows], text)
            want += torch.nn.functional.huber_loss(pred, buf.rewards[rows], delta=0.1)
    assert torch.isclose(total.detach(), torch.as_tensor(want), rtol=1e-5)
    total.backward()  # every member gets gradient from its own term only
    assert all(any(q.grad is not None and q.grad.abs().sum() > 0 for q in m.parameters())
               for m in tr.loss.lrm.ensemble.members)
