"""Samplers on a hand-built TrainContext with the tiny random Wan model (CPU, a few steps each)."""

from __future__ import annotations

import pytest
import torch

from trl_video.components.base import TrainContext
from trl_video.components.rewards import LuminanceReward
from trl_video.components.samplers import (
    BranchSampler,
    FewStepSampler,
    ODESampler,
    SDESampler,
    WindowGradSampler,
    transition_log_prob,
)
from trl_video.config import VideoRewardConfig
from trl_video.models.presets import build_random

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


@pytest.fixture(scope="module")
def policy():
    pol = build_random("wan")
    pol.add_lora(4, init_seed=0)
    # LoRA B starts at zero (so dL/dA = 0); give it random values so every LoRA tensor gets a gradient
    with torch.no_grad():
        g = torch.Generator().manual_seed(123)
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return pol


def make_ctx(policy, seed: int = 0) -> TrainContext:
    from accelerate import Accelerator

    config = VideoRewardConfig(model="tiny-wan-random", report_to="none", save_model_at_end=False, max_steps=1,
                               prompts_per_step=1, group_size=2, seed=seed)
    return TrainContext(policy=policy, config=config, accelerator=Accelerator(), reward=LuminanceReward(),
                        method_config=None, generator=torch.Generator().manual_seed(1000 + seed))


def embeds_for(policy, prompts):
    return policy.encode_prompts(prompts)[0]


# ------------------------------------------------------------------------------------------------ (a) SDE
def test_sde_log_probs_recompute_exactly(policy):
    ctx = make_ctx(policy)
    prompts = PROMPTS
    emb = embeds_for(policy, prompts)
    sampler = SDESampler(num_steps=4, eta=1.0)
    out = sampler.sample(ctx, prompts, emb, torch.tensor([0, 1]))
    S = sampler.num_steps
    assert out.trajectory.shape == (2, S + 1, *policy.latent_shape)
    assert out.log_probs.shape == (2, S)
    stochastic = [i for i in range(S) if sampler.stochastic(i)]
    assert stochastic == list(range(S - 1))  # the last step (to t = 0) is deterministic
    assert torch.isfinite(out.log_probs[:, stochastic]).all()
    assert torch.isnan(out.log_probs[:, S - 1]).all()
    torch.testing.assert_close(out.trajectory[:, -1], out.latents, rtol=0, atol=0)
    torch.testing.assert_close(out.trajectory[:, 0], out.noise, rtol=0, atol=0)
    grid = out.timesteps
    for grad in (False, True):  # the sampler records under no_grad; a loss recomputes with grad
        with torch.set_grad_enabled(grad):
            for i in stochastic:
                new = transition_log_prob(ctx, policy.transformer, out.trajectory[:, i], out.trajectory[:, i + 1],
                                          grid[i], grid[i + 1], emb, sampler.eta)
                old = out.log_probs[:, i]
                ratio = torch.exp(new.detach() - old)
                assert torch.equal(new.detach(), old), (grad, i, (new.detach() - old).abs().max())
                assert torch.equal(ratio, torch.ones_like(ratio))
    # the log-prob is that of the recorded transition: perturbing the next state lowers it
    i = stochastic[0]
    with torch.no_grad():
        moved = transition_log_prob(ctx, policy.transformer, out.trajectory[:, i], out.trajectory[:, i + 1] + 0.5,
                                    grid[i], grid[i + 1], emb, sampler.eta)
    assert (moved < out.log_probs[:, i]).all()


def test_sde_recorded_log_prob_matches_its_noise(policy):
    """With std from the posterior formula, the recorded log-prob equals the Gaussian density of the
    standardised noise actually drawn: mean_j(-z_j^2/2) - log std - log(2 pi)/2."""
    ctx = make_ctx(policy, seed=3)
    emb = embeds_for(policy, PROMPTS[:1])
    sampler = SDESampler(num_steps=3, eta=1.0)
    out = sampler.sample(ctx, PROMPTS[:1], emb, torch.tensor([0]))
    grid, sch = out.timesteps, policy.schedule
    with torch.no_grad():
        for i in range(2):
            x = out.trajectory[:, i]
            native = policy.predict(x, grid[i].expand(1), emb)
            mean, std = sch.ddim_step(sch.to_x0(native, x, grid[i]), sch.to_eps(native, x, grid[i]), grid[i],
                                      grid[i + 1], 1.0)
            z = (out.trajectory[:, i + 1] - mean) / std
            ref = (-(z**2) / 2).flatten(1).mean(1) - torch.log(std.flatten()) - 0.5 * torch.log(
                torch.tensor(2 * torch.pi))
            torch.testing.assert_close(out.log_probs[:, i], ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ (b) ODE
def test_ode_deterministic_given_seed(policy):
    emb = embeds_for(policy, PROMPTS)
    sampler = ODESampler(num_steps=3, eta=0.0)
    runs = [sampler.sample(make_ctx(policy, seed=s), PROMPTS, emb, torch.tensor([0, 1])) for s in (5, 5, 6)]
    a, b, c = runs
    assert torch.equal(a.latents, b.latents) and torch.equal(a.trajectory, b.trajectory)
    assert not torch.allclose(a.latents, c.latents)
    assert torch.equal(a.trajectory[:, -1], a.latents)
    assert torch.equal(a.trajectory[:, 0], a.noise)
    assert torch.isnan(a.log_probs).all()  # nothing stochastic
    # the ODE is Euler on the velocity: check step 0 by hand
    grid = a.timesteps
    with torch.no_grad():
        v = policy.predict(a.noise, grid[0].expand(2), emb)
    torch.testing.assert_close(a.trajectory[:, 1], a.noise + (grid[1] - grid[0]) * v, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ (c) window
def test_window_grad_sampler_x0_finish(policy):
    ctx = make_ctx(policy, seed=2)
    emb = embeds_for(policy, PROMPTS[:1])
    sampler = WindowGradSampler(num_steps=6, grad_steps=2, start_range=[2, 2], finish="x0")
    calls: list[tuple[bool, bool]] = []

    def hook(module, args, kwargs, output):
        calls.append((torch.is_grad_enabled(), bool(kwargs["hidden_states"].requires_grad)))

    h = policy.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.enable_grad():
            out = sampler.sample(ctx, PROMPTS[:1], emb, torch.tensor([0]))
    finally:
        h.remove()
    grid = policy.schedule.timesteps(6)
    # steps 0, 1: no grad; window steps 2, 3 and the one-shot x0 prediction at t_4: grad
    assert [c[0] for c in calls] == [False, False, True, True, True], calls
    assert [c[1] for c in calls][:3] == [False, False, False]  # the window starts from a detached state
    assert torch.equal(out.t_mid, grid[2].expand(1))
    assert int(out.window_start[0]) == 2
    assert out.latents.requires_grad

    lora = [(n, p) for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert lora and all("lora" in n for n, _ in lora)
    grads = torch.autograd.grad(out.latents.sum(), [p for _, p in lora])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)

    # second implementation: steps 0..1 without grad, 2..3 with grad, then x0 at t_4
    sch = policy.schedule
    x = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(1000 + 2))
    with torch.enable_grad():
        for i in range(4):
            with torch.set_grad_enabled(i >= 2):
                v = policy.predict(x, grid[i].expand(1), emb)
                x = x + (grid[i + 1] - grid[i]) * v  # Euler = DDIM eta 0 for flow
        ref = sch.to_x0(policy.predict(x, grid[4].expand(1), emb), x, grid[4])
        ref_grads = torch.autograd.grad(ref.sum(), [p for _, p in lora])
    torch.testing.assert_close(out.latents, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ (d) few-step
def test_fewstep_uses_exactly_the_given_timesteps(policy, monkeypatch):
    ctx = make_ctx(policy, seed=4)
    emb = embeds_for(policy, PROMPTS)
    seen: list[torch.Tensor] = []
    orig = policy.predict

    def spy(x_t, t, prompt_embeds, transformer=None):
        seen.append(torch.as_tensor(t).detach().clone())
        return orig(x_t, t, prompt_embeds, transformer=transformer)

    monkeypatch.setattr(policy, "predict", spy)
    ts = [1.0, 0.7, 0.35]
    out = FewStepSampler(timesteps=ts).sample(ctx, PROMPTS, emb, torch.tensor([0, 1]))
    monkeypatch.undo()
    assert len(seen) == len(ts)
    for t_seen, t_ref in zip(seen, ts):
        assert t_seen.shape == (2,)
        assert torch.all(t_seen == torch.tensor(t_ref, dtype=t_seen.dtype))
    assert torch.equal(out.timesteps, torch.tensor([*ts, 0.0]))
    assert out.trajectory.shape[1] == len(ts) + 1
    torch.testing.assert_close(out.trajectory[:, -1], out.latents, rtol=0, atol=0)
    # re-noising: each intermediate state is a_t x0_hat + s_t eps on the next timestep (check step 1)
    sch = policy.schedule
    with torch.no_grad():
        x0_0 = sch.to_x0(policy.predict(out.noise, torch.full((2,), 1.0), emb), out.noise, torch.tensor(1.0))
    g = torch.Generator().manual_seed(1000 + 4)
    _ = torch.randn(2, *policy.latent_shape, generator=g)  # the initial noise
    eps = torch.randn(2, *policy.latent_shape, generator=g)
    torch.testing.assert_close(out.trajectory[:, 1], (1 - 0.7) * x0_0 + 0.7 * eps, atol=1e-5, rtol=1e-5)


def test_fewstep_default_grid():
    s = FewStepSampler(num_steps=4)
    assert s.step_times == [1.0, 0.75, 0.5, 0.25]


# ------------------------------------------------------------------------------------------------ (e) branch
def test_branch_sampler_shares_prefix_within_group(policy):
    ctx = make_ctx(policy, seed=1)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    gids = torch.tensor([0, 0, 1, 1])
    emb = embeds_for(policy, prompts)
    b = 2
    sampler = BranchSampler(num_steps=4, eta=1.0, branch_steps=[b])
    out = sampler.sample(ctx, prompts, emb, gids)
    tr = out.trajectory
    assert torch.equal(out.branch_step, torch.full((4,), b))
    for i, j in [(0, 1), (2, 3)]:
        for k in range(b + 1):  # states x_{t_0} .. x_{t_b}: shared ODE prefix
            assert torch.equal(tr[i, k], tr[j, k]), k
        for k in range(b + 1, tr.shape[1]):  # after the SDE step at b they differ
            assert (tr[i, k] - tr[j, k]).abs().max() > 1e-3, k
    # different groups start from different noise
    assert not torch.allclose(tr[0, 0], tr[2, 0])
    # only the branching step is stochastic
    assert torch.isfinite(out.log_probs[:, b]).all()
    others = [i for i in range(4) if i != b]
    assert torch.isnan(out.log_probs[:, others]).all()


def test_branch_step_is_shared_seeded_choice(policy):
    """The branch step depends only on (config.seed, step): two contexts with different noise
    generators (two ranks) pick the same one."""
    prompts = [PROMPTS[0]] * 2
    emb = embeds_for(policy, prompts)
    picks = []
    for gen_seed in (10, 20):
        ctx = make_ctx(policy, seed=0)
        ctx.generator = torch.Generator().manual_seed(gen_seed)
        ctx.step = 3
        out = BranchSampler(num_steps=3, eta=1.0).sample(ctx, prompts, emb, torch.tensor([0, 0]))
        picks.append(int(out.branch_step[0]))
    assert picks[0] == picks[1]


def test_branch_group_noise_shared_across_ranks(policy):
    """A group whose members sit on two ranks must share its initial noise (and so its ODE prefix).
    Simulated with two contexts that differ only in their per-rank noise generator."""
    prompts = [PROMPTS[0]] * 2
    emb = embeds_for(policy, prompts)
    noises = []
    for rank in (0, 1):
        ctx = make_ctx(policy, seed=0)
        ctx.generator = torch.Generator().manual_seed(ctx.config.seed * 1000 + 12345 + rank)  # as the trainer
        ctx.step = 1
        out = BranchSampler(num_steps=3, eta=1.0, branch_steps=[1]).sample(ctx, prompts, emb, torch.tensor([0, 0]))
        noises.append(out.noise)
    assert torch.equal(noises[0], noises[1])


# ------------------------------------------------------------------------------------------------ evaluation ODE + CFG
def test_sample_videos_guidance_matches_hand_step():
    """One guided Euler step by hand: x_1 = x_0 + (t_1 - t_0) (u + w (c - u)), u on the empty prompt; w = 1 is the
    unguided sampler."""
    from trl_video.evaluation import sample_videos

    pol = build_random("wan")
    x0 = torch.randn(*pol.latent_shape, generator=torch.Generator().manual_seed(11))[None]
    emb, null = pol.encode_prompts(PROMPTS[:1])[0], pol.encode_prompts([""])[0]
    grid = pol.schedule.timesteps(1)
    with torch.no_grad():
        c, u = pol.predict(x0, grid[0].expand(1), emb), pol.predict(x0, grid[0].expand(1), null)
    for w in (1.0, 3.0):
        want = x0 + (grid[1] - grid[0]) * (u + w * (c - u))
        got = sample_videos(pol, PROMPTS[:1], [11], num_steps=1, guidance_scale=w)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample_videos(pol, PROMPTS[:1], [11], 1, guidance_scale=3.0),
                              sample_videos(pol, PROMPTS[:1], [11], 1))
