"""The loss's maths against closed forms on Gaussian toys (no neural network involved)."""

from __future__ import annotations

import pytest
import torch
from trl_video.components.estimators import group_advantages
from trl_video.errors import TrlVideoError
from trl_video.rollouts import Rollouts

from vidrl_plugin_dmalign.config import DMAlignConfig
from vidrl_plugin_dmalign.loss import DMAlignLoss, align_direction, group_coefficients, rescale_to, top_n_mean

SHAPE = (2, 1, 2, 2)  # C, F, H, W


def _loss(cfg: DMAlignConfig, fake) -> DMAlignLoss:
    loss = DMAlignLoss()
    loss.cfg, loss.fake = cfg, fake
    return loss


def _batch(x_final: torch.Tensor, grid: list[float], **kw) -> Rollouts:
    b = x_final.shape[0]
    traj = torch.randn(b, len(grid), *x_final.shape[1:], generator=torch.Generator().manual_seed(99))
    return Rollouts(latents=x_final, prompts=["p"] * b, prompt_embeds=torch.zeros(b, 1, 1), trajectory=traj,
                    timesteps=torch.tensor(grid), **kw)


def test_dmd_surrogate_gradient_is_the_analytic_score_difference(stub):
    """d L_DMD / d x = -(s_real - s_fake)(x_t) * sigma_t^2 / alpha_t / mean|x - x0_real| / numel, with the real and
    fake scores and denoisers in closed form (data ~ N(m, v)), t and eps redrawn from the same seed."""
    g0 = torch.Generator().manual_seed(1)
    B = 3
    theta = torch.randn(B, *SHAPE, generator=g0)
    real = stub.GaussianDenoiser(torch.randn(SHAPE, generator=g0), 0.5)
    fake = stub.GaussianDenoiser(torch.randn(SHAPE, generator=g0) + 1.0, 0.9)
    gen = stub.ParamGenerator(theta)
    cfg = DMAlignConfig(align="none", dmd_weight=1.0, dmd_step="last")
    ctx = stub.make_ctx(gen, real, SHAPE, cfg, seed=7)
    loss, metrics = _loss(cfg, fake).generator_loss(ctx, _batch(theta, [1.0, 0.6, 0.0]))
    loss.backward()

    g = torch.Generator().manual_seed(7)  # the loss draws t, then eps
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(B, generator=g)
    eps = torch.randn(B, *SHAPE, generator=g)
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * theta + tb * eps
    s_diff = real.score(x_t, t) - fake.score(x_t, t)
    w = (theta - real.posterior_mean(x_t, t)).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expected = -s_diff * tb**2 / (1 - tb) / w / theta.numel()
    torch.testing.assert_close(gen.theta.grad, expected, rtol=1e-4, atol=1e-7)
    assert metrics["k"] == 1.0  # dmd_step='last' of a 2-step grid

    # without the normalisation the gradient is the bare x0 difference (x0_fake - x0_real) / numel
    gen.theta.grad = None
    cfg2 = DMAlignConfig(align="none", dmd_weight=1.0, dmd_step="last", normalize=False)
    ctx2 = stub.make_ctx(gen, real, SHAPE, cfg2, seed=7)
    _loss(cfg2, fake).generator_loss(ctx2, _batch(theta, [1.0, 0.6, 0.0]))[0].backward()
    torch.testing.assert_close(gen.theta.grad, -s_diff * tb**2 / (1 - tb) / theta.numel(), rtol=1e-4, atol=1e-7)


def test_dmd_descent_moves_generator_towards_the_real_distribution(stub):
    """Many small DMD steps with a fake that tracks the generator drive a Gaussian generator's mean to the
    teacher's (the fixed point of the DMD gradient)."""
    m_real = torch.full(SHAPE, 2.0)
    real = stub.GaussianDenoiser(m_real, 0.3)
    gen = stub.ParamGenerator(torch.zeros(1, *SHAPE), c=0.0)
    cfg = DMAlignConfig(align="none", dmd_weight=1.0, dmd_step="last")
    opt = torch.optim.SGD(gen.parameters(), lr=3.0)
    for step in range(60):
        fake = stub.GaussianDenoiser(gen.theta.detach()[0].clone(), 0.3)  # an ideal fake score model
        ctx = stub.make_ctx(gen, real, SHAPE, cfg, seed=step)
        x = gen.theta.detach().expand(8, *SHAPE)
        loss, _ = _loss(cfg, fake).generator_loss(ctx, _batch(x, [1.0, 0.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (gen.theta.detach() - m_real).abs().max() < 0.3, gen.theta


def test_top_n_mean_and_advantage_scaling_hand_made_group():
    lat = torch.tensor([1.0, 2.0, 4.0, 10.0, 20.0, 30.0]).view(6, 1, 1, 1, 1)
    r = torch.tensor([0.1, 0.5, 0.3, 3.0, 1.0, 2.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    xbar = top_n_mean(lat, r, gid, 2)
    # group 0: top-2 rewards are samples 1 (2.0) and 2 (4.0) -> 3.0; group 1: samples 3 (10) and 5 (30) -> 20
    assert xbar.flatten().tolist() == [3.0, 3.0, 3.0, 20.0, 20.0, 20.0]
    assert top_n_mean(lat, r, gid, 1).flatten().tolist() == [2.0, 2.0, 2.0, 10.0, 10.0, 10.0]
    adv = group_advantages(r, gid)
    # hand: group 0 rewards (0.1, 0.5, 0.3): mean 0.3, population std sqrt(0.08/3)
    sd = (0.08 / 3) ** 0.5
    torch.testing.assert_close(adv[:3], torch.tensor([-0.2, 0.2, 0.0]) / (sd + 1e-4))
    coef = group_coefficients(adv, "paper")
    torch.testing.assert_close(coef, -adv)
    torch.testing.assert_close(group_coefficients(adv, "flipped"), adv)
    # align gradient (no normalisation) with the identity 'fake' (x0 = the point): g = -c (xbar - x)
    g = align_direction(lat, xbar, lat, coef, normalize=False)
    torch.testing.assert_close(g, (adv.view(-1, 1, 1, 1, 1) * (xbar - lat)))
    # descent step -g = -A (xbar - x): the worst sample (A<0) moves towards xbar = 3, the best (A>0) beyond/away
    # from it (2 -> lower), the average one (A=0) stays
    step = -g.flatten()
    assert step[0] > 0 and step[1] < 0 and step[2] == 0
    # normalisation: per-sample mean|x - x0_pos| divides the direction
    gn = align_direction(lat, xbar, lat, torch.ones(6), normalize=True)
    torch.testing.assert_close(gn.flatten(), -torch.sign((xbar - lat).flatten()))


def test_rescale_to_matches_reference_norm():
    a, b = torch.randn(4, 3), 5 * torch.randn(4, 3)
    s, f = rescale_to(a, b)
    torch.testing.assert_close(s.norm(), b.norm())
    torch.testing.assert_close(torch.tensor(f), b.norm() / a.norm())
    z, f0 = rescale_to(torch.zeros(2), b)
    assert f0 == 1.0 and z.abs().sum() == 0


def test_pair_update_moves_sample_towards_x_plus_sign_trap(stub):
    """The x0-form Pair gradient moves every generator sample towards its preferred x+, whereas the literal
    two-point score form of Eq. 6 (s(F(x+)) - s(F(x)) with s(y) = -(y - a m)/var) would move it away."""
    g0 = torch.Generator().manual_seed(3)
    B = 4
    theta = torch.randn(B, *SHAPE, generator=g0)
    x_plus = torch.randn(B, *SHAPE, generator=g0) + 3.0
    fake = stub.GaussianDenoiser(torch.zeros(SHAPE), 1.0)
    gen = stub.ParamGenerator(theta)
    real = stub.GaussianDenoiser(torch.zeros(SHAPE), 1.0)
    off = stub.StubOffline([f"c{i}" for i in range(B)], x_plus)
    cfg = DMAlignConfig(align="pair", dmd_weight=0.0, align_weight=1.0, align_norm="none", dmd_step="last")
    ctx = stub.make_ctx(gen, real, SHAPE, cfg, seed=5, offline=off)
    loss = _loss(cfg, fake)
    loss._pair_index = {p: [i] for i, p in enumerate(off.prompts)}
    batch = _batch(theta, [1.0, 0.0])
    batch.prompts = list(off.prompts)  # sample i is paired with x+_i by caption
    out, metrics = loss.generator_loss(ctx, batch)
    assert metrics["pair_matched"] == 1.0
    out.backward()
    step = -gen.theta.grad
    d_before = (theta - x_plus).flatten(1).norm(dim=1)
    d_after = (theta + 10.0 * step - x_plus).flatten(1).norm(dim=1)
    assert (d_after < d_before).all(), (d_before, d_after)
    cos = torch.nn.functional.cosine_similarity(step.flatten(1), (x_plus - theta).flatten(1))
    assert (cos > 0.5).all()
    # the literal score form points the other way (the sign trap)
    t = torch.full((B,), 0.5)
    eps = torch.randn(B, *SHAPE, generator=g0)
    literal = fake.score(0.5 * x_plus + 0.5 * eps, t) - fake.score(0.5 * theta + 0.5 * eps, t)  # = -grad
    cos_lit = torch.nn.functional.cosine_similarity(literal.flatten(1), (x_plus - theta).flatten(1))
    assert (cos_lit < 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_group_update_raises_a_linear_reward_and_flipped_sign_lowers_it(stub, normalize):
    """DM-GroupLoss on a shift generator x_i = theta + z_i with reward <w, x>: the 'paper' sign raises the
    expected reward (the group sum is the GRPO direction sum_i A_i x_i); the flipped sign lowers it."""
    g0 = torch.Generator().manual_seed(11)
    B, G = 16, 4
    w = torch.randn(SHAPE, generator=g0)
    noise = torch.randn(B, *SHAPE, generator=g0)
    gid = torch.arange(B // G).repeat_interleave(G)
    changes = {}
    for sign in ("paper", "flipped"):
        gen = stub.ParamGenerator(torch.zeros(1, *SHAPE), c=1.0)  # x0 = theta + x_t, x_t = noise at t=1
        x = (gen.theta + noise).detach()
        r = (x * w).flatten(1).sum(1)
        batch = _batch(x, [1.0, 0.0], rewards=r, group_ids=gid, advantages=group_advantages(r, gid))
        batch.trajectory[:, 0] = noise
        cfg = DMAlignConfig(align="group", dmd_weight=0.0, align_weight=1.0, align_norm="none", top_n=2,
                            group_sign=sign, normalize=normalize, dmd_step="last")
        fake = stub.GaussianDenoiser(torch.zeros(SHAPE), 4.0)
        ctx = stub.make_ctx(gen, fake, SHAPE, cfg, seed=2)
        out, _ = _loss(cfg, fake).generator_loss(ctx, batch)
        out.backward()
        changes[sign] = float((-gen.theta.grad * w).sum())  # d E[r] along the descent step
    assert changes["paper"] > 0 > changes["flipped"], changes


def test_config_validation():
    with pytest.raises(TrlVideoError, match="align must be"):
        DMAlignConfig(align="dpo")
    with pytest.raises(TrlVideoError, match="t_min"):
        DMAlignConfig(t_min=0.5, t_max=0.4)
    with pytest.raises(TrlVideoError, match="group_sign"):
        DMAlignConfig(group_sign="up")
