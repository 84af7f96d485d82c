"""Acceptance: with the flow-grpo preset, grad of the RSM loss == grad of an independently written Flow-GRPO
loss (PPO clipped ratio + KL on the transition means) on the same transitions; the ratio is exactly 1 before
the first update.

The reference loss follows Flow-GRPO's training loop in its own terms (per-step log-prob from the SDE step,
ratio = exp(logp - logp_old), max(-A r, -A clip(r)), KL = mean((mu - mu_ref)^2) / (2 std_dev_t^2), mean over
the trained steps); the RSM loss computes a score-matching regression with a guidance force and never forms
this objective.
"""

from __future__ import annotations

import torch
from conftest import PROMPTS, make_ctx
from test_flow_sde import flow_grpo_step
from vidrl_plugin_rsm.loss import RSMLoss
from vidrl_plugin_rsm.presets import PRESETS, preset_config

from trl_video.components.base import Phase
from trl_video.components.estimators import group_advantages
from trl_video.components.samplers import SDESampler

A, STEPS = 0.7, 4
TOL = 1e-4  # relative to the largest gradient entry (float32 network; observed ~1e-6)


def flow_grpo_reference_loss(policy, batch, steps, beta, clip_range, adv_clip_max=5.0):
    grid = batch.timesteps
    emb = batch.prompt_embeds
    adv = batch.advantages.clamp(-adv_clip_max, adv_clip_max)
    total, ratios = 0.0, []
    for j in steps:
        x, prev = batch.trajectory[:, j], batch.trajectory[:, j + 1]
        tb = grid[j].expand(x.shape[0])
        v = policy.predict(x, tb, emb).float()
        mean, _, lp, std_dev_t = flow_grpo_step(v, x, grid, j, A, prev)
        with torch.no_grad(), policy.reference() as ref:
            v_ref = policy.predict(x, tb, emb, transformer=ref).float()
            mean_ref, *_ = flow_grpo_step(v_ref, x, grid, j, A, prev)
        ratio = torch.exp(lp - batch.log_probs[:, j])
        ratios.append(ratio.detach())
        policy_loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)))
        kl = torch.mean(((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2))
        total = total + (policy_loss + beta * kl) / len(steps)
    return total, torch.stack(ratios)


def grads(policy, loss):
    params = policy.trainable_parameters()
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])


def test_flow_grpo_preset_gradient_equals_flow_grpo_loss(policy):
    preset = next(p for p in PRESETS if p.name == "flow-grpo")
    assert preset.sampler == ("sde", {"num_steps": 10, "sde_type": "flow_grpo", "eta": 0.7})
    ctx = make_ctx(policy, gradient_accumulation_steps=1)
    prompts = PROMPTS * 2
    emb = policy.encode_prompts(prompts)[0]
    with torch.no_grad():
        batch = SDESampler(num_steps=STEPS, eta=A, sde_type="flow_grpo").sample(ctx, prompts, emb,
                                                                              torch.tensor([0, 1, 0, 1]))
        batch.rewards = torch.tensor([0.3, -0.2, 0.9, 0.1])
    batch.advantages = group_advantages(batch.rewards, batch.group_ids)
    cfg = preset_config(preset)(beta=0.04)
    loss_fn = RSMLoss().configure(cfg, "flow_grpo", A, STEPS)
    steps = list(range(int(STEPS * cfg.timestep_fraction)))  # Flow-GRPO trains the first 0.99 * S steps

    # before any update: the recomputed log-probs equal the recorded ones bit for bit
    loss0, met0 = loss_fn.compute(ctx, Phase("policy"), batch)
    assert met0["ratio_dev_max"] == 0.0 and met0["clip_frac"] == 0.0
    ref0, ratios0 = flow_grpo_reference_loss(policy, batch, steps, cfg.beta, cfg.clip_range)
    assert float((ratios0 - 1).abs().max()) < 1e-5  # the hand-written step rounds differently: ~1e-7
    g_rsm, g_ref = grads(policy, loss0), grads(policy, ref0)
    assert g_ref.abs().max() > 0
    assert (g_rsm - g_ref).abs().max() <= TOL * g_ref.abs().max()

    # after an "update" (perturbed LoRA): ratios != 1, clip range at the median deviation so both branches occur
    saved = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if "lora_" in n}
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            for n, p in policy.transformer.named_parameters():
                if "lora_A" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            _, ratios = flow_grpo_reference_loss(policy, batch, steps, cfg.beta, cfg.clip_range)
        dev = (ratios - 1).abs().flatten().sort().values
        k = len(dev) // 2
        clip = float(dev[k - 1] + dev[k]) / 2  # between two deviations: no ratio sits on the clip boundary
        cfg = preset_config(preset)(beta=0.04, clip_range=clip)
        loss_fn = RSMLoss().configure(cfg, "flow_grpo", A, STEPS)
        ctx = make_ctx(policy, gradient_accumulation_steps=1)
        loss1, met1 = loss_fn.compute(ctx, Phase("policy"), batch)
        ref1, _ = flow_grpo_reference_loss(policy, batch, steps, cfg.beta, clip)
        assert 0.1 < met1["clip_frac"] < 0.9 and met1["ratio_dev_max"] > 0
        g_rsm, g_ref = grads(policy, loss1), grads(policy, ref1)
        rel = float((g_rsm - g_ref).abs().max() / g_ref.abs().max())
        print(f"max |grad_rsm - grad_flow_grpo| / max |grad| = {rel:.2e} (clip_frac {met1['clip_frac']:.2f})")
        assert rel <= TOL
    finally:
        with torch.no_grad():
            for n, p in policy.transformer.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
