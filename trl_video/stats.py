"""Statistics shared by evaluation, the ``evaluate`` metric modules and the benchmarks (one implementation each).

* :func:`mean_sem`: mean, sample standard deviation and standard error of the mean.
* :func:`bootstrap`: bootstrap standard error (and the resampled values) of any statistic of one or more
  paired samples.
* :func:`frechet_distance`: the FID / FVD formula between Gaussian fits of two feature sets.
* :func:`mmd2`: the unbiased squared maximum mean discrepancy with an RBF kernel; :func:`median_bandwidth`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def mean_sem(x: Tensor) -> dict[str, float]:
    """``{"mean", "std", "sem"}`` of a 1-D sample (std with Bessel's correction; 0 for one value), in float64."""
    x = x.detach().double().flatten()
    if len(x) < 2:
        return {"mean": float(x.mean()) if len(x) else math.nan, "std": 0.0, "sem": 0.0}
    std = float(x.std(unbiased=True))
    return {"mean": float(x.mean()), "std": std, "sem": std / math.sqrt(len(x))}


def bootstrap(statistic: Callable[..., float], *samples: Tensor, n: int = 200, seed: int = 0) -> dict[str, object]:
    """Bootstrap of ``statistic(*samples)``: each resample draws one index set (with replacement) and applies it
    to every sample, so paired samples (same prompts / noises) stay paired. Returns the statistic on the full
    data (``value``), the standard error of the resampled values (``se``) and the values themselves."""
    if not samples:
        raise ValueError("bootstrap needs at least one sample")
    size = len(samples[0])
    if any(len(s) != size for s in samples):
        raise ValueError(f"paired samples must have one length, got {[len(s) for s in samples]}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n):
        idx = torch.randint(size, (size,), generator=g)
        values.append(float(statistic(*(s[idx] for s in samples))))
    v = torch.tensor(values, dtype=torch.float64)
    return {"value": float(statistic(*samples)), "se": float(v.std()), "values": v}


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets ``[N, D]`` (the FID / FVD formula):
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in float64 (symmetric square roots by
    eigendecomposition, so no complex parts)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(s_a)
    root_a = vec @ torch.diag(ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()).pow(2)


def median_bandwidth(x: Tensor) -> float:
    """The median heuristic: median pairwise distance between distinct samples of ``x``."""
    d = _sqdist(x, x)
    return float(d[~torch.eye(len(x), dtype=torch.bool)].median().sqrt())


def mmd2(x: Tensor, y: Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with ``k(a, b) = exp(-|a - b|^2 / (2 h^2))`` on flattened
    samples: the within-set means leave out the diagonal."""
    g = 2 * bandwidth**2
    kxx, kyy, kxy = (-_sqdist(x, x) / g).exp(), (-_sqdist(y, y) / g).exp(), (-_sqdist(x, y) / g).exp()
    n, m = len(x), len(y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
