"""DiffusionNFT: the loss against hand computation and its closed-form gradient, the old-policy schedule, and
training steps on the tiny random Wan (real diffusers architecture)."""

from __future__ import annotations

import pytest
import torch
from vidrl_plugin_nft import NFTConfig, nft_objective, optimality_probability
from vidrl_plugin_nft.loss import training_timesteps


def test_objective_matches_a_hand_computed_case() -> None:
    # x0 = 0, x0_theta = 1, x0_old = 0.5, beta = 0.5, r = 0.75:
    # positive 0.5*1 + 0.5*0.5 = 0.75 -> error 0.5625; negative 1.5*0.5 - 0.5*1 = 0.25 -> error 0.0625
    x0, th, old, r = torch.zeros(1, 1), torch.ones(1, 1), torch.full((1, 1), 0.5), torch.tensor([0.75])
    plain, _ = nft_objective(x0, th, old, r, beta=0.5, adaptive_weighting=False)
    assert plain.item() == pytest.approx((0.75 * 0.5625 + 0.25 * 0.0625) / 0.5)  # 0.875
    # adaptive: each error over its mean absolute error, 0.5625 / 0.75 = 0.75 and 0.0625 / 0.25 = 0.25
    adaptive, _ = nft_objective(x0, th, old, r, beta=0.5, adaptive_weighting=True)
    assert adaptive.item() == pytest.approx((0.75 * 0.75 + 0.25 * 0.25) / 0.5)  # 1.25


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_at_the_old_policy_is_2r_minus_1_times_the_flow_matching_gradient(beta: float, adaptive: bool) -> None:
    """d/d theta of r||b th + (1-b) o - x||^2 + (1-r)||(1+b) o - b th - x||^2, over b, at th = o is
    2 (2r - 1)(o - x): the plain regression gradient, signed and scaled by 2r - 1, whatever beta is."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 5, generator=g)
    old = x0 + 0.3 * torch.randn(4, 3, 2, 5, generator=g)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0])
    theta = old.clone().requires_grad_(True)
    loss, _ = nft_objective(x0, theta, old, r, beta=beta, adaptive_weighting=adaptive)
    (grad,) = torch.autograd.grad(loss.sum(), theta)

    plain = old.clone().requires_grad_(True)  # the flow-matching (x0-regression) loss, written separately
    fm = (plain - x0).pow(2).flatten(1).mean(1)
    if adaptive:  # both implicit policies equal the old one at theta = old: one weight, mean |o - x|
        fm = fm / (old - x0).abs().flatten(1).mean(1)
    (fm_grad,) = torch.autograd.grad(fm.sum(), plain)
    expected = (2 * r - 1).view(-1, 1, 1, 1) * fm_grad
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[2].abs().max() < 1e-6  # r = 1/2: a neutral sample moves nothing


def test_optimality_probability_clips_and_maps_advantages() -> None:
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    assert optimality_probability(a, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


def test_old_policy_decay_follows_the_papers_schedules() -> None:
    default = NFTConfig()  # PickScore / GenEval: min(0.001 n, 0.5)
    assert [default.old_decay(n) for n in (0, 1, 100, 499, 500, 10_000)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5])
    ocr = NFTConfig(beta=0.1, old_decay_flat=75, old_decay_rate=0.0075, old_decay_max=0.999)
    assert [ocr.old_decay(n) for n in (0, 74, 75, 175, 300)] == pytest.approx([0.0, 0.0, 0.0, 0.75, 0.999])


def test_training_timesteps_are_a_per_sample_shuffle_of_the_first_grid_points() -> None:
    grid = torch.linspace(1.0, 0.0, 11)  # 10 steps: fraction 0.99 keeps the first 9 points (not t = 0)
    gen = torch.Generator().manual_seed(0)
    times = training_timesteps(grid, 0.99, None, 6, lambda *s: torch.rand(*s, generator=gen))
    assert times.shape == (6, 9)
    for row in times:
        assert sorted(row.tolist()) == pytest.approx(sorted(grid[:9].tolist()))
    assert not all(torch.equal(times[0], row) for row in times[1:])  # each sample has its own order
    two = training_timesteps(grid, 0.99, 2, 6, lambda *s: torch.rand(*s, generator=gen))
    assert two.shape == (6, 2) and set(two.flatten().tolist()) <= set(grid[:9].tolist())


def test_config_rejects_out_of_range_values_naming_the_key() -> None:
    from trl_video.errors import ConfigError

    with pytest.raises(ConfigError, match="method_args.beta"):
        NFTConfig(beta=0.0)
    with pytest.raises(ConfigError, match="method_args.old_decay_max"):
        NFTConfig(old_decay_max=1.5)


def _train(tmp_path, **method_args):
    from trl_video.config import VideoRewardConfig
    from trl_video.trainer import VideoRewardTrainer

    config = VideoRewardConfig(model="tiny-wan-random", method="nft", reward="alignment", prompts="world:train",
                               prompts_per_step=2, group_size=2, max_steps=2, report_to="none",
                               save_model_at_end=False, output_dir=str(tmp_path), lora_r=4, learning_rate=1e-3,
                               sampler_args={"num_steps": 3}, method_args=method_args)
    trainer = VideoRewardTrainer(config)
    return trainer, trainer.train()


def test_nft_trains_and_its_old_policy_is_the_scheduled_ema(tmp_path) -> None:
    # decay 0 throughout: after every update the old policy (the EMA) equals the current policy exactly
    trainer, result = _train(tmp_path, old_decay_rate=0.0, timesteps_per_step=2)
    assert result["global_step"] == 2
    last = trainer.history[-1]
    assert torch.isfinite(torch.tensor(last["loss/policy"])) and last["policy/train_timesteps"] == 2
    ema = trainer.ctx.ema["policy"]
    params = trainer.policy.trainable_parameters()
    assert ema.cur_decay_value == 0.0
    assert all(torch.equal(s, p.detach()) for s, p in zip(ema.shadow_params, params, strict=True))


def test_nft_old_policy_lags_when_the_decay_is_positive(tmp_path) -> None:
    trainer, _ = _train(tmp_path, old_decay_rate=0.25, old_decay_max=0.5, timesteps_per_step=1)
    ema = trainer.ctx.ema["policy"]
    assert ema.optimization_step == 2 and ema.cur_decay_value == pytest.approx(0.5)  # min(0.25 * 2, 0.5)
    params = trainer.policy.trainable_parameters()
    assert any(not torch.equal(s, p.detach()) for s, p in zip(ema.shadow_params, params, strict=True))


def test_nft_resumes_twice_on_its_ema_schedule(tmp_path) -> None:
    """The scheduled old policy survives two resumes (a resume re-applies the recipe's EMA decay, which a
    scheduled EMA has none of) and continues on its schedule."""
    from trl_video.config import VideoRewardConfig
    from trl_video.trainer import VideoRewardTrainer

    def config(steps: int) -> VideoRewardConfig:
        return VideoRewardConfig(model="tiny-wan-random", method="nft", reward="luminance", prompts_per_step=1,
                                 group_size=2, max_steps=steps, save_steps=1, report_to="none",
                                 save_model_at_end=False, output_dir=str(tmp_path), lora_r=4,
                                 sampler_args={"num_steps": 2},
                                 method_args={"old_decay_rate": 0.25, "old_decay_max": 0.6, "timesteps_per_step": 1})

    VideoRewardTrainer(config(1)).train()
    for steps in (2, 3):
        trainer = VideoRewardTrainer(config(steps), resume=True)
        trainer.train()
        ema = trainer.ctx.ema["policy"]
        assert ema.optimization_step == steps and ema.cur_decay_value == pytest.approx(min(0.25 * steps, 0.6))
