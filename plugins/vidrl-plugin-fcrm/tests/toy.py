"""A 1-D rectified-flow toy whose FCRM quantities have closed forms (written independently of loss.py).

Model: v(x_t, t) = a_t x_t + c_t (per-timestep scalars). Path x_t = (1-t) x0 + t eps, target u = eps - x0, so

    v - u = P_t + m_t eps,   P_t = x0 k_t + c_t,   k_t = a_t (1-t) + 1,   m_t = a_t t - 1,
    l(t, eps) = (P_t + m_t eps)^2,   E_eps l = P_t^2 + m_t^2.

With t uniform on a finite set, the exact per-sample loss is L(x0) = mean_t (P_t^2 + m_t^2), a quadratic in x0.
"""

from __future__ import annotations

import numpy as np
import torch


class LinearToy(torch.nn.Module):
    def __init__(self, times: list[float], a: list[float], c: list[float]):
        super().__init__()
        self.register_buffer("times", torch.tensor(times, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def index(self, t: torch.Tensor) -> torch.Tensor:
        return (t.double().unsqueeze(-1) - self.times).abs().argmin(-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        i = self.index(t)
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return self.a[i].view(shape) * x_t + self.c[i].view(shape)


def exact_loss(model: LinearToy, x0: torch.Tensor) -> torch.Tensor:
    """L(x0) = mean_t [(x0 k_t + c_t)^2 + m_t^2] (1-D x0 of shape [N]), differentiable in the parameters."""
    t = model.times
    k = model.a * (1 - t) + 1
    m = model.a * t - 1
    p = x0.double().unsqueeze(-1) * k + model.c
    return (p**2 + m**2).mean(-1)


def exact_moments_of_difference(ref: LinearToy, pol: LinearToy, x0: float) -> tuple[float, float]:
    """E and Var over (t ~ U(times), eps ~ N(0,1)) of D = l_ref - l_theta, by Gauss-Hermite quadrature
    (exact: D is a degree-2 polynomial in eps, D^2 degree 4)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(6)
    weights = weights / weights.sum()
    e1 = e2 = 0.0
    times = ref.times.numpy()
    ar, cr = ref.a.detach().numpy(), ref.c.detach().numpy()
    ap, cp = pol.a.detach().numpy(), pol.c.detach().numpy()
    for j, t in enumerate(times):
        lr = (x0 * (ar[j] * (1 - t) + 1) + cr[j] + (ar[j] * t - 1) * nodes) ** 2
        lp = (x0 * (ap[j] * (1 - t) + 1) + cp[j] + (ap[j] * t - 1) * nodes) ** 2
        d = lr - lp
        e1 += float((weights * d).sum()) / len(times)
        e2 += float((weights * d**2).sum()) / len(times)
    return e1, e2 - e1**2


def latent_mean(latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A cheap latent-space reward for the trainer tests (no VAE decode)."""
    return latents.float().flatten(1).mean(1)


latent_mean.space = "latent"  # type: ignore[attr-defined]
latent_mean.differentiable = False  # type: ignore[attr-defined]
