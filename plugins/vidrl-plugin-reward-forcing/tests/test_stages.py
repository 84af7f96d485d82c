"""Stage 1 data and regression, stage 2 frame selection and the reward + DMD scaling, streaming decode, and the
trainer carrying both stages."""

from __future__ import annotations

import json
import types

import pytest
import torch
from trl_video.world import NUM_FRAMES

from vidrl_plugin_reward_forcing.loss import RewardForcingLoss, ode_regression, select_frames
from vidrl_plugin_reward_forcing.model import CausalWanTransformer3DModel
from vidrl_plugin_reward_forcing.ode import ODETrajectories, build_ode_dataset


@pytest.fixture(scope="module")
def ode_dir(teacher_policy, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ode") / "data"
    build_ode_dataset(teacher_policy, prompts * 2, [11, 12, 13, 14], out, num_steps=4, teacher_steps=8,
                      batch_size=4, teacher_name="tiny-wan")
    return out


@torch.no_grad()
def test_ode_dataset_holds_the_teacher_euler_states(teacher_policy, ode_dir, prompts):
    sch = teacher_policy.schedule
    grid = sch.timesteps(8)
    emb, _ = teacher_policy.encode_prompts(prompts)
    x = torch.stack([torch.randn(*teacher_policy.latent_shape, generator=torch.Generator().manual_seed(s))
                     for s in (11, 12)])
    states = []
    for k in range(8):  # plain Euler on the flow ODE: x_s = x_t + (s - t) v
        states.append(x.clone())
        v = teacher_policy.transformer(x, sch.model_timestep(grid[k]).expand(2), emb, return_dict=False)[0]
        x = x + (grid[k + 1] - grid[k]) * v
    ds = ODETrajectories(ode_dir, teacher_policy.latent_shape)
    rows = ds.ds[[0, 1]]
    for k in range(4):
        assert torch.allclose(rows["states"][:, k], states[2 * k], atol=1e-5)
    assert torch.allclose(rows["x0"], x, atol=1e-5)
    meta = json.loads((ode_dir / "ode_meta.json").read_text())
    assert meta["timesteps"] == pytest.approx([float(grid[2 * k]) for k in range(4)])
    assert meta["teacher_grid_points"] == pytest.approx(meta["timesteps"])


def test_ode_reader_resumes_where_it_stopped(teacher_policy, ode_dir):
    a = ODETrajectories(ode_dir, teacher_policy.latent_shape, seed=3)
    a.next_batch(3)
    b = ODETrajectories(ode_dir, teacher_policy.latent_shape, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.next_batch(3)["seed"].tolist() == b.next_batch(3)["seed"].tolist()


def test_ode_regression_by_hand(teacher_policy, embeds):
    """Second computation: build each sample's input chunk by chunk, flow x0 = x_t - t v, squared error."""
    model = CausalWanTransformer3DModel.from_teacher(teacher_policy.transformer, chunk_size=1)
    sch = teacher_policy.schedule
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 4, 8, 3, 8, 8, generator=g)
    x0 = torch.randn(2, 8, 3, 8, 8, generator=g)
    levels = [1.0, 0.9, 0.75, 0.5]
    k_index = torch.tensor([[0, 3, 1], [2, 2, 0]])
    got = ode_regression(model, sch, states, x0, levels, embeds, k_index)
    x_in = torch.stack([torch.stack([states[b, k_index[b, f], :, f] for f in range(3)], dim=1) for b in range(2)])
    t = torch.tensor([[levels[k] for k in row] for row in k_index.tolist()])
    v = model(x_in, t * 1000, embeds, return_dict=False)[0]
    x0_hat = x_in - t.view(2, 1, 3, 1, 1) * v
    assert torch.allclose(got, ((x0_hat - x0) ** 2).mean(), rtol=1e-5)


def test_select_frames():
    px = torch.arange(2 * 3 * 5 * 1 * 1, dtype=torch.float32).view(2, 3, 5, 1, 1)
    assert torch.equal(select_frames(px, "last"), px[:, :, 4:5])
    r = select_frames(px, "random", torch.Generator().manual_seed(0), n=2)
    assert r.shape == (2, 3, 2, 1, 1)
    for b in range(2):  # every chosen frame is one of the sample's own frames
        for j in range(2):
            assert any(torch.equal(r[b, :, j], px[b, :, f]) for f in range(5))


def test_reward_and_dmd_terms_push_x_with_equal_gradient_norms():
    """L = w_R L_R + w_D c L_DMD with c chosen so that ||c dL_DMD/dx|| = ||dL_R/dx||: checked on the total
    gradient (independent of how the loss assembles it)."""
    from trl_video.methods.dmd import dmd_direction

    loss = RewardForcingLoss()
    loss.cfg = types.SimpleNamespace(dmd_t_min=0.2, dmd_t_max=0.8, real_guidance_scale=1.0)
    x = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    target = torch.randn_like(x)
    loss_r = -(x * target).sum(dim=(1, 2, 3, 4)).mean()  # dL_R/dx = -target / 2
    x0_real, x0_fake = torch.randn_like(x), torch.randn_like(x)
    import vidrl_plugin_reward_forcing.loss as L

    ctx = types.SimpleNamespace(rand=lambda n: torch.full((n,), 0.5), randn=lambda *s: torch.zeros(*s),
                                policy=types.SimpleNamespace(schedule=types.SimpleNamespace(
                                    add_noise=lambda a, e, t: a)))
    orig_real, orig_predict = L.real_x0, L.predict
    L.real_x0 = lambda *a, **k: x0_real
    L.predict = lambda *a, **k: (None, x0_fake, None)
    try:
        loss.fake = object()
        batch = types.SimpleNamespace(prompt_embeds=None)
        l_dmd, scale, _ = loss._dmd(ctx, batch, x, loss_r)
    finally:
        L.real_x0, L.predict = orig_real, orig_predict
    (g_total,) = torch.autograd.grad(loss_r + scale * l_dmd, x)
    g_dmd_part = g_total - (-target / 2)
    assert torch.allclose(g_dmd_part.norm(), (target / 2).norm(), rtol=1e-4)
    expect_dir = dmd_direction(x.detach(), x0_real, x0_fake)
    cos = torch.nn.functional.cosine_similarity(g_dmd_part.flatten(), expect_dir.flatten(), dim=0)
    assert cos > 0.9999


@torch.no_grad()
def test_streaming_decode_equals_full_decode(teacher_policy):
    from vidrl_plugin_reward_forcing.streaming import StreamingWanDecoder

    lat = torch.randn(1, *teacher_policy.latent_shape, generator=torch.Generator().manual_seed(5))
    full = teacher_policy.decode(lat)
    dec = StreamingWanDecoder(teacher_policy)
    parts = torch.cat([dec(lat[:, :, i:i + 2]) for i in range(0, lat.shape[2], 2)], dim=2)  # chunks of 2, 2, 1
    assert parts.shape == full.shape == (1, 3, NUM_FRAMES, 32, 32)
    assert (parts - full).abs().max() < 1e-5


@torch.no_grad()
def _self_rollout_reward(policy, transformer, prompts, seeds, steps):
    """The alignment reward of self-rollout samples, written out here (not the sampler's evaluation loop): initial
    noise from each pair's seed, re-noising from seed + 7919, ``steps`` levels per chunk."""
    from trl_video.components.rewards import AlignmentReward

    from vidrl_plugin_reward_forcing.rollout import self_rollout, student_timesteps

    out = []
    for p, s in zip(prompts, seeds, strict=True):
        noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(s))
        g = torch.Generator().manual_seed(s + 7919)
        emb, _ = policy.encode_prompts([p])
        lat = self_rollout(transformer.eval(), policy.schedule, emb, noise, student_timesteps(policy.schedule, steps),
                           randn=lambda shape: torch.randn(*shape, generator=g)).latents  # noqa: B023 (used at once)
        out.append(AlignmentReward()(policy.decode(lat), [p]))
    return torch.cat(out)


def test_trainer_runs_both_stages_saves_a_causal_model_and_evaluates_it_by_self_rollout(tmp_path, ode_dir):
    """Training's eval_at_end, its checkpoint curve and ``trl-video eval`` sample the causal generator with its own
    self-rollout (the bidirectional ODE sampler, the old behaviour, gives other rewards), before and after."""
    from trl_video import cli
    from trl_video.config import config_from_dict
    from trl_video.evaluation import eval_pairs
    from trl_video.models.policy import load_policy
    from trl_video.trainer import VideoRewardTrainer

    cfg = config_from_dict({
        "model": "tiny-wan", "method": "reward-forcing", "reward": "alignment", "prompts": "world:train",
        "method_args": {"chunk_size": 1, "ode_steps": 2, "ode_dataset": str(ode_dir)},
        "sampler_args": {"num_steps": 2, "grad": "last"}, "prompts_per_step": 2, "group_size": 1,
        "use_peft": False, "learning_rate": 1e-4, "adam_beta1": 0.0, "weight_decay": 0.01, "ema_decay": 0.99,
        "max_steps": 3, "logging_steps": 1, "report_to": "none", "output_dir": str(tmp_path / "run"),
        "eval_at_end": True, "eval_num_prompts": 2, "eval_num_steps": 3})
    trainer = VideoRewardTrainer(cfg)
    result = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("ode/regression" in r, "generator/frame_reward" in r) for r in rows] == [(True, False), (True, False),
                                                                                       (False, True)]
    assert rows[2]["grad_norm/policy"] > 0
    loaded = load_policy(str(tmp_path / "run" / "model"))
    assert type(loaded.transformer) is CausalWanTransformer3DModel

    prompts, seeds = eval_pairs(cfg.eval_prompts, 2)
    after = _self_rollout_reward(loaded, loaded.transformer, prompts, seeds, steps=2)
    teacher = load_policy("tiny-wan")
    start = CausalWanTransformer3DModel.from_teacher(teacher.transformer, chunk_size=1)
    before = _self_rollout_reward(teacher, start, prompts, seeds, steps=2)
    ev = result["eval"]
    assert ev["reward_after"] == pytest.approx(float(after.mean()), abs=1e-5)
    assert ev["reward_before"] == pytest.approx(float(before.mean()), abs=1e-5)
    assert ev["sampler"] == "self_rollout"
    assert ev["monitor"]["checkpoints"][-1]["step"] == 3  # the base made causal + the checkpoint's weights
    assert ev["monitor"]["checkpoints"][-1]["reward"] == pytest.approx(float(after.mean()), abs=1e-5)
    meta = json.loads((tmp_path / "run" / "model" / "trl_video.json").read_text())
    assert meta["run"]["sampler_args"] == {"num_steps": 2, "grad": "last"}

    out = tmp_path / "cli-eval"
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--num-prompts", "2", "--out", str(out)]) == 0
    res = json.loads((out / "eval_results.json").read_text())
    assert res["reward_after"] == pytest.approx(float(after.mean()), abs=1e-5)
    assert res["reward_before"] == pytest.approx(float(before.mean()), abs=1e-5)
    assert res["sampler"] == "self_rollout"


def test_trainer_reward_plus_dmd_step(tmp_path):
    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    cfg = config_from_dict({
        "model": "tiny-wan", "method": "reward-forcing", "reward": "alignment", "prompts": "world:train",
        "method_args": {"dmd_weight": 1.0, "fake_updates": 2, "teacher": "tiny-wan", "frames": "random"},
        "sampler_args": {"num_steps": 2, "grad": "all"}, "prompts_per_step": 2, "group_size": 1,
        "use_peft": False, "max_steps": 1, "logging_steps": 1, "report_to": "none", "save_model_at_end": False,
        "output_dir": str(tmp_path / "run")})
    trainer = VideoRewardTrainer(cfg)
    trainer.train()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["generator/dmd_scale"] > 0 and row["fake/denoise"] > 0 and row["grad_norm/fake"] > 0
