"""(b) At a zero residual the loss-space density q_theta ∝ exp(-L_theta/gamma) equals the reward-tilted target
q* ∝ exp(beta r - L_ref/gamma) (analytic Gaussian toy, trained OFF-policy with the real loss pieces);
the surrogate's gradient against a hand-computed example."""

from __future__ import annotations

import math

import torch
from toy import LinearToy, exact_loss
from vidrl_plugin_fcrm.loss import denoising_losses, double_sampling, residual

from trl_video.models.schedule import NoiseSchedule

SCH = NoiseSchedule("flow")


def _quadratic(model: LinearToy) -> tuple[float, float]:
    """L(x) = A x^2 + B x + C (closed form, independent of exact_loss)."""
    t = model.times
    k = model.a.detach() * (1 - t) + 1
    return float((k**2).mean()), float((2 * k * model.c.detach()).mean())


def test_zero_residual_density_is_reward_tilted_target():
    times = [0.3, 0.6, 0.9]
    ref = LinearToy(times, [0.2, -0.1, 0.3], [0.1, -0.2, 0.05]).requires_grad_(False)
    pol = LinearToy(times, [0.2, -0.1, 0.3], [0.1, -0.2, 0.05])  # theta starts at the reference
    b = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    kappa, beta, gamma = 1.0, 1.0, 0.8  # reward r(x) = kappa x
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([pol.a, pol.c, b], lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    n = 256
    for _ in range(1000):
        x0 = 0.5 + 1.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64)  # behaviour mu != target
        idx = torch.randint(len(times), (2, n), generator=gen)
        t = torch.tensor(times)[idx]
        eps = torch.randn(2, n, 1, generator=gen, dtype=torch.float64)
        l_theta, l_ref = denoising_losses(pol, ref, SCH, x0, torch.zeros(n, 1, 1), t, eps)
        g = residual(b.expand(n), kappa * x0[:, 0], l_ref, l_theta, beta, gamma)
        loss = double_sampling(g[0], g[1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    # the reward-tilted target in loss space, in closed form: Gaussian with precision 2A_ref/gamma
    a_ref, b_ref = _quadratic(ref)
    mean_star = (gamma * beta * kappa - b_ref) / (2 * a_ref)
    var_star = gamma / (2 * a_ref)
    a_th, b_th = _quadratic(pol)
    mean_th, var_th = -b_th / (2 * a_th), gamma / (2 * a_th)
    mean_ref = -b_ref / (2 * a_ref)
    sd = math.sqrt(var_star)
    assert abs(mean_ref - mean_star) > 0.5 * sd  # the tilt is large: the test can fail
    assert abs(mean_th - mean_star) < 0.03 * sd, (mean_th, mean_star)
    assert abs(var_th / var_star - 1) < 0.03, (var_th, var_star)

    # the same on a grid with the exact losses: normalised densities agree (total variation)
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    with torch.no_grad():
        log_q_th = -exact_loss(pol, x) / gamma
        log_q_star = beta * kappa * x - exact_loss(ref, x) / gamma
    q_th, q_star = torch.softmax(log_q_th, 0), torch.softmax(log_q_star, 0)
    q_ref = torch.softmax(-exact_loss(ref, x).detach() / gamma, 0)
    assert 0.5 * float((q_ref - q_star).abs().sum()) > 0.2
    assert 0.5 * float((q_th - q_star).abs().sum()) < 0.02
    # and the residual itself is (close to) zero everywhere: b absorbs the normaliser
    with torch.no_grad():
        g_grid = b + (exact_loss(ref, x) - exact_loss(pol, x)) / gamma - beta * kappa * x
    assert float(g_grid[(x > -2) & (x < 3)].abs().max()) < 0.1, float(g_grid[(x > -2) & (x < 3)].abs().max())


def test_surrogate_gradient_hand_computed():
    times = [0.25, 0.75]
    pol = LinearToy(times, [0.3, -0.2], [-0.1, 0.2])
    ref = LinearToy(times, [0.1, 0.0], [0.05, -0.05]).requires_grad_(False)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    x0s, sig, beta, gamma = [0.5, -1.0], [1.0, -1.0], 0.5, 2.0
    t_ab = [[0.25, 0.75], [0.75, 0.25]]  # [batch A|B][sample]
    e_ab = [[0.3, -1.2], [1.1, 0.4]]
    l_theta, l_ref = denoising_losses(pol, ref, SCH, torch.tensor(x0s, dtype=torch.float64).view(2, 1),
                                      torch.zeros(2, 1, 1), torch.tensor(t_ab),
                                      torch.tensor(e_ab, dtype=torch.float64).view(2, 2, 1))
    g = residual(b, torch.tensor(sig), l_ref, l_theta, beta, gamma)
    loss = double_sampling(g[0], g[1]).mean()
    loss.backward()

    # by hand: l = r^2 with r = x0 (a(1-t)+1) + c + (a t - 1) eps; dr/da = x0 (1-t) + t eps, dr/dc = 1
    a, c = [0.3, -0.2], [-0.1, 0.2]
    ar, cr = [0.1, 0.0], [0.05, -0.05]

    def parts(i: int, k: int):
        t, e, x = t_ab[k][i], e_ab[k][i], x0s[i]
        j = times.index(t)
        r = x * (a[j] * (1 - t) + 1) + c[j] + (a[j] * t - 1) * e
        rr = x * (ar[j] * (1 - t) + 1) + cr[j] + (ar[j] * t - 1) * e
        gval = [0.1, -0.2][i] - beta * sig[i] + (rr**2 - r**2) / gamma
        dg_da, dg_dc = [0.0, 0.0], [0.0, 0.0]
        dg_da[j] = -2 * r * (x * (1 - t) + t * e) / gamma
        dg_dc[j] = -2 * r / gamma
        return gval, dg_da, dg_dc

    ga, gc, gb = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    for i in range(2):
        (gA, daA, dcA), (gB, daB, dcB) = parts(i, 0), parts(i, 1)
        for j in range(2):
            ga[j] += (gA * daB[j] + gB * daA[j]) / 2
            gc[j] += (gA * dcB[j] + gB * dcA[j]) / 2
        gb[i] += (gA + gB) / 2  # dg/db_i = 1 in both batches
    torch.testing.assert_close(pol.a.grad, torch.tensor(ga, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pol.c.grad, torch.tensor(gc, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor(gb, dtype=torch.float64), rtol=1e-5, atol=1e-6)
