"""The core sampler's Flow-GRPO / DanceGRPO SDE options against hand-written steps of those papers' code.

The reference steps below are written from the papers' update rules in their own variables (sigma, dt,
std_dev_t, sigma_max = sigmas[1]); they share no code with ``NoiseSchedule.flow_sde_step``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS, make_ctx

from trl_video.components.samplers import SDESampler, transition, transition_log_prob


def flow_grpo_step(v, x, sigmas, i, a, prev):
    """Flow-GRPO's SDE step: mean, std of the added noise, and the element-averaged log-prob of ``prev``."""
    sigma, sigma_prev, sigma_max = float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1])
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, lp.flatten(1).mean(1), std_dev_t


def dance_grpo_step(v, x, sigmas, i, eta, prev):
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    dsigma = sigma_next - sigma
    x0_pred = x - sigma * v
    score = -(x - x0_pred * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = eta * math.sqrt(sigma - sigma_next)
    lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, lp.flatten(1).mean(1), eta


@pytest.mark.parametrize("sde_type,noise,ref", [("flow_grpo", 0.7, flow_grpo_step), ("dance_grpo", 0.3, dance_grpo_step)])
def test_sampler_matches_hand_written_step(policy, sde_type, noise, ref):
    ctx = make_ctx(policy)
    emb = policy.encode_prompts(PROMPTS)[0]
    sampler = SDESampler(num_steps=3, eta=noise, sde_type=sde_type)
    with torch.no_grad():
        out = sampler.sample(ctx, PROMPTS, emb, torch.tensor([0, 1]))
        grid = out.timesteps
        assert float(grid[0]) == 1.0
        assert torch.isfinite(out.log_probs).all()  # every step is stochastic, the last one too
        for i in range(sampler.num_steps):
            x, nxt = out.trajectory[:, i], out.trajectory[:, i + 1]
            v = policy.predict(x, grid[i].expand(2), emb).float()
            mean_ref, std_ref, lp_ref, _ = ref(v, x, grid, i, noise, nxt)
            _, mean, std = transition(ctx, policy.transformer, x, grid[i], grid[i + 1], emb, noise, sde_type, grid[1])
            torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-5)
            assert abs(float(std) - std_ref) < 1e-6 * max(1.0, std_ref)
            torch.testing.assert_close(out.log_probs[:, i], lp_ref, rtol=1e-5, atol=1e-5)
            # the recorded log-prob is recomputed bit for bit (importance ratio exactly 1)
            again = transition_log_prob(ctx, policy.transformer, x, nxt, grid[i], grid[i + 1], emb, noise, sde_type,
                                        grid[1])
            assert torch.equal(again, out.log_probs[:, i])


def test_flow_grpo_t1_special_case(policy):
    """At t = 1 Flow-GRPO replaces 1 - sigma (= 0) by 1 - sigmas[1]: std_dev_t = a sqrt(1 / (1 - t_1)), so the
    std of the first step's noise, std_dev_t * sqrt(1 - t_1), is exactly a."""
    sch = policy.schedule
    grid = sch.timesteps(10)
    x = torch.zeros(1, 4)
    for a in (0.7, math.sqrt(2)):
        _, std = sch.flow_sde_step(x, x, x, grid[0], grid[1], "flow_grpo", a, grid[1])
        assert abs(float(std) - a) < 1e-6
        _, std1 = sch.flow_sde_step(x, x, x, grid[1], grid[2], "flow_grpo", a, grid[1])
        t1, t2 = float(grid[1]), float(grid[2])
        assert abs(float(std1) - a * math.sqrt(t1 / (1 - t1)) * math.sqrt(t1 - t2)) < 1e-6
    # differs from the DDIM-posterior step (the core sde sampler's default) at finite step size
    _, ddim_std = sch.ddim_step(x, x, grid[1], grid[2], 1.0)
    _, fg_std = sch.flow_sde_step(x, x, x, grid[1], grid[2], "flow_grpo", math.sqrt(2), grid[1])
    assert abs(float(ddim_std) - float(fg_std)) > 0.1


def test_windowed_sde_steps(policy):
    """Flow-GRPO-Fast / MixGRPO: only the window's steps are stochastic (finite log-probs)."""
    emb = policy.encode_prompts(PROMPTS)[0]
    slide = SDESampler(num_steps=6, eta=0.7, sde_type="flow_grpo", window_size=2, window_mode="sliding",
                       window_range=[0, 3], window_shift_every=2)
    starts = []
    for step in range(8):
        ctx = make_ctx(policy)
        ctx.step = step
        starts.append(slide.window(ctx)[0])
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3]
    ctx = make_ctx(policy)
    ctx.step = 3
    with torch.no_grad():
        out = slide.sample(ctx, PROMPTS, emb, torch.tensor([0, 1]))
    finite = torch.isfinite(out.log_probs).all(0).tolist()
    assert finite == [False, True, True, False, False, False]


def test_same_noise_shares_the_start_within_a_group(policy):
    """DanceGRPO's init_same_noise: members of a group start from one noise, so only the SDE steps separate them;
    groups differ, and without the option every sample has its own noise."""
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    emb = policy.encode_prompts(prompts)[0]
    gids = torch.tensor([0, 0, 1, 1])
    outs = {}
    for same in (True, False):
        ctx = make_ctx(policy)
        with torch.no_grad():
            outs[same] = SDESampler(num_steps=3, eta=0.3, sde_type="dance_grpo", same_noise=same).sample(
                ctx, prompts, emb, gids)
    shared = outs[True]
    assert torch.equal(shared.noise[0], shared.noise[1]) and torch.equal(shared.noise[2], shared.noise[3])
    assert not torch.allclose(shared.noise[0], shared.noise[2])
    assert (shared.latents[0] - shared.latents[1]).abs().max() > 1e-3  # the SDE steps still separate them
    assert torch.isfinite(shared.log_probs).all()
    assert not torch.allclose(outs[False].noise[0], outs[False].noise[1])
