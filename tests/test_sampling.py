"""The sampling engine is the loop every sampler, evaluation and benchmark uses: the evaluation sampler and the
``ode`` sampler give the same samples from the same noise, and the engine's step is the schedule's DDIM step."""

from __future__ import annotations

import torch

from trl_video import sampling
from trl_video.models.presets import build_random

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


def test_evaluation_and_the_ode_sampler_share_one_loop() -> None:
    from accelerate import Accelerator

    from trl_video.components.base import TrainContext
    from trl_video.components.samplers import ODESampler
    from trl_video.config import VideoRewardConfig
    from trl_video.evaluation import sample_videos

    policy = build_random("wan")
    seeds = [11, 12]
    ev = sample_videos(policy, PROMPTS, seeds, num_steps=3, batch_size=2)
    cfg = VideoRewardConfig(model="tiny-wan-random", report_to="none", max_steps=1, prompts_per_step=1, group_size=2)
    ctx = TrainContext(policy=policy, config=cfg, accelerator=Accelerator(), reward=None, method_config=None,
                       generator=torch.Generator())
    sampler = ODESampler(num_steps=3)
    sampler.initial_noise = lambda ctx, n: sampling.seeded_noise(policy.latent_shape, seeds)  # type: ignore[method-assign]
    out = sampler.sample(ctx, PROMPTS, policy.encode_prompts(PROMPTS)[0], torch.tensor([0, 1]))
    torch.testing.assert_close(out.latents, ev, rtol=0, atol=0)


def test_one_step_is_the_schedule_step_written_out() -> None:
    policy = build_random("cogvideox")
    x = sampling.seeded_noise(policy.latent_shape, [3])
    emb = policy.encode_prompts(PROMPTS[:1])[0]
    t, s = torch.tensor(0.8), torch.tensor(0.5)
    with torch.no_grad():
        mean, std, x0, eps = sampling.denoise_step(policy, x, t, s, emb)
        v = policy.predict(x, t.expand(1), emb)
    sch = policy.schedule
    # v-prediction on the VP path: x0 = a x - s v, eps = s x + a v; DDIM: x_s = a_s x0 + s_s eps
    a_t, s_t, a_s, s_s = sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)
    torch.testing.assert_close(x0, a_t * x - s_t * v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, a_s * (a_t * x - s_t * v) + s_s * (s_t * x + a_t * v), rtol=1e-5, atol=1e-5)
    assert float(std.abs().max()) == 0.0


def test_fewstep_renoises_with_the_given_noise() -> None:
    policy = build_random("wan")
    emb = policy.encode_prompts(PROMPTS[:1])[0]
    x = sampling.seeded_noise(policy.latent_shape, [5])
    seen: list[int] = []
    with torch.no_grad():
        out = sampling.fewstep_sample(policy, x, emb, [1.0, 0.5], lambda k, shape: torch.zeros(shape),
                                      on_step=lambda k, xk: seen.append(k))
        x0_first = policy.predict_x0(x, torch.ones(1), emb)
        # zero re-noise at t=0.5 on the flow path: x_0.5 = 0.5 x0
        expect = policy.predict_x0(0.5 * x0_first, torch.full((1,), 0.5), emb)
    assert seen == [1]
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
