"""(a) The double-sampling estimator is unbiased for g^2 (and its gradient for grad g^2); the naive g_hat^2 is
biased upward by Var(g_hat) (Prop. 1). Statistical tests against closed forms; tolerances are 5 standard errors
computed from the sample itself (M draws), and each test first checks it has the power to tell the two apart."""

from __future__ import annotations

import math

import torch
from toy import LinearToy, exact_loss, exact_moments_of_difference
from vidrl_plugin_fcrm.loss import denoising_losses, double_sampling, naive_square, residual

from trl_video.models.schedule import NoiseSchedule

TIMES = [0.2, 0.5, 0.8]
SCH = NoiseSchedule("flow")
M = 200_000  # independent (x0 fixed) replicates of the two noising batches
Z = 5.0


def _models():
    ref = LinearToy(TIMES, [0.1, -0.3, 0.2], [0.05, -0.1, 0.2])
    pol = LinearToy(TIMES, [0.4, -0.1, 0.5], [-0.2, 0.3, 0.0])
    return ref, pol


def _draws(gen: torch.Generator, n: int):
    idx = torch.randint(len(TIMES), (2, n), generator=gen)
    t = torch.tensor(TIMES)[idx]
    eps = torch.randn(2, n, 1, generator=gen, dtype=torch.float64)
    return t, eps


def test_double_sampling_unbiased_naive_biased_by_variance():
    ref, pol = _models()
    x0v, b, sig, beta, gamma = 0.7, 0.3, 1.2, 1.0, 0.5
    gen = torch.Generator().manual_seed(0)
    t, eps = _draws(gen, M)
    x0 = torch.full((M, 1), x0v, dtype=torch.float64)
    emb = torch.zeros(M, 1, 1)
    with torch.no_grad():
        l_theta, l_ref = denoising_losses(pol, ref, SCH, x0, emb, t, eps)
        g = residual(torch.full((M,), b), torch.full((M,), sig), l_ref, l_theta, beta, gamma).double()
    g_a, g_b = g[0], g[1]
    # closed forms
    ed, vard = exact_moments_of_difference(ref, pol, x0v)
    g_true = b - beta * sig + ed / gamma
    var_true = vard / gamma**2
    assert var_true > 0.05  # the toy has real Monte Carlo variance

    # each g_hat is unbiased for g
    assert abs(float(g_a.mean()) - g_true) < Z * float(g_a.std()) / math.sqrt(M)

    # double sampling: E[surrogate value] = 2 E[g_A g_B] = 2 g^2
    ds = double_sampling(g_a, g_b) / 2
    se_ds = float(ds.std()) / math.sqrt(M)
    assert abs(float(ds.mean()) - g_true**2) < Z * se_ds

    # naive: E[g_hat^2] = g^2 + Var(g_hat)
    nv = naive_square(g_a)
    se_nv = float(nv.std()) / math.sqrt(M)
    assert abs(float(nv.mean()) - (g_true**2 + var_true)) < Z * se_nv
    # and the bias (paired difference) is Var(g_hat), resolved well beyond the noise
    d = nv - ds
    se_d = float(d.std()) / math.sqrt(M)
    assert var_true > 10 * Z * se_d
    assert abs(float(d.mean()) - var_true) < Z * se_d


def test_double_sampling_gradient_unbiased():
    """E[grad of sg(g_A) g_B + sg(g_B) g_A] = grad g^2 (exact, by quadrature), while the naive gradient has
    expectation grad (g^2 + Var g_hat) != grad g^2."""
    ref, pol = _models()
    x0v, b, sig, beta, gamma = -0.4, 0.1, 0.5, 1.0, 1.0
    n, chunks = 20_000, 10
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), x0v, dtype=torch.float64)
    emb = torch.zeros(n, 1, 1)
    grads_ds, grads_nv = [], []
    for _ in range(chunks):
        t, eps = _draws(gen, n)
        l_theta, l_ref = denoising_losses(pol, ref, SCH, x0, emb, t, eps)
        g = residual(torch.full((n,), b), torch.full((n,), sig), l_ref, l_theta, beta, gamma)
        gd = torch.autograd.grad(double_sampling(g[0], g[1]).mean(), [pol.a, pol.c], retain_graph=True)
        gn = torch.autograd.grad(naive_square(g[0]).mean(), [pol.a, pol.c])
        grads_ds.append(torch.cat(gd))
        grads_nv.append(torch.cat(gn))
    gd, gn = torch.stack(grads_ds), torch.stack(grads_nv)  # [chunks, 6] batch means
    # exact grad of g^2 with g = b - beta sig + (L_ref - L_theta)/gamma, L exact
    x = torch.tensor([x0v], dtype=torch.float64)
    g_exact = b - beta * sig + (exact_loss(ref, x).detach() - exact_loss(pol, x)) / gamma
    exact = torch.cat(torch.autograd.grad((g_exact**2).sum(), [pol.a, pol.c]))
    se = gd.std(0) / math.sqrt(chunks)
    assert torch.all((gd.mean(0) - exact).abs() < Z * se + 1e-6), (gd.mean(0), exact, se)
    se_n = gn.std(0) / math.sqrt(chunks)
    bias = (gn.mean(0) - exact).abs()
    assert torch.any(bias > 10 * se_n), (gn.mean(0), exact, se_n)  # the naive gradient is visibly biased
