"""Noise schedules on a common affine path ``x_t = alpha(t) x0 + sigma(t) eps`` with t in [0, 1], t=1 noise.

Two parameterisations are supported, chosen by the model family:

* ``flow`` (Wan, rectified flow): alpha = 1 - t, sigma = t, native output = velocity ``eps - x0``;
  the transformer takes ``timestep = 1000 t``.
* ``v`` (CogVideoX, VP / DDPM with v-prediction): alpha = sqrt(abar), sigma = sqrt(1 - abar), native
  output ``alpha eps - sigma x0``; the transformer takes the discrete DDPM timestep ``t (T - 1)``.
  ``abar`` is read from the diffusers scheduler (so SNR shift / zero-terminal-SNR are honoured) and
  linearly interpolated between integer timesteps.

Every conversion (native <-> x0 / eps / score / flow velocity) lives here, so no method hard-codes a family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class NoiseSchedule:
    prediction: str  # "flow" | "v"
    alphas_cumprod: Tensor | None = None  # VP only: abar over the T training timesteps
    shift: float = 1.0  # flow only: timestep shift used when building sampling grids
    num_train_timesteps: int = 1000

    # ----- path coefficients -----
    def alpha(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.prediction == "flow":
            return 1.0 - t
        return self._abar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.prediction == "flow":
            return t
        return (1.0 - self._abar(t)).clamp_min(0).sqrt()

    def _abar(self, t: Tensor) -> Tensor:
        assert self.alphas_cumprod is not None
        ac = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)
        pos = t.to(torch.float64).clamp(0, 1) * (len(ac) - 1)
        lo = pos.floor().long().clamp(0, len(ac) - 1)
        hi = (lo + 1).clamp(max=len(ac) - 1)
        w = pos - lo.to(pos.dtype)
        # t=0 is the clean end: abar(0) := 1 so that x_0 is exactly the data
        out = ac[lo] * (1 - w) + ac[hi] * w
        out = torch.where(t.to(torch.float64) <= 0, torch.ones_like(out), out)
        return out.to(torch.float32)

    def model_timestep(self, t: Tensor) -> Tensor:
        """What the diffusers transformer expects as ``timestep``."""
        if self.prediction == "flow":
            return t * self.num_train_timesteps
        return t * (len(self.alphas_cumprod) - 1)  # type: ignore[arg-type]

    # ----- forward process -----
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Native training target at (x0, eps, t)."""
        if self.prediction == "flow":
            return eps - x0
        return _bcast(self.alpha(t), x0) * eps - _bcast(self.sigma(t), x0) * x0

    # ----- conversions from the native output -----
    def to_x0(self, native: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if self.prediction == "flow":
            return x_t - s * native
        # VP: alpha^2 + sigma^2 = 1
        return a * x_t - s * native

    def to_eps(self, native: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if self.prediction == "flow":
            return x_t + a * native
        return s * x_t + a * native

    def to_score(self, native: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Score of the marginal at t: ``-eps_hat / sigma(t)``."""
        return -self.to_eps(native, x_t, t) / _bcast(self.sigma(t), x_t).clamp_min(1e-8)

    def score_scale(self, t: Tensor, like: Tensor) -> Tensor:
        """d score / d native (a per-t scalar): ``s_a - s_b = score_scale * (n_a - n_b)`` at the same x_t.

        flow: -(1-t)/t; v: -alpha/sigma.
        """
        return -_bcast(self.alpha(t), like) / _bcast(self.sigma(t), like).clamp_min(1e-8)

    def x0_scale(self, t: Tensor, like: Tensor) -> Tensor:
        """d x0_hat / d native at the same x_t: flow -t; v -sigma."""
        return -_bcast(self.sigma(t), like)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.add_noise(x0, eps, t)

    # ----- sampling grids -----
    def timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> Tensor:
        """Decreasing grid ``t_0 = 1 > ... > t_n = 0`` (n = num_steps), shifted for flow models."""
        u = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
        if self.prediction == "flow" and self.shift != 1.0:
            u = self.shift * u / (1 + (self.shift - 1) * u)
        return u

    def ddim_step(self, x0_hat: Tensor, eps_hat: Tensor, t: Tensor, s: Tensor, eta: float = 0.0,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step t -> s < t. eta = 0: the deterministic ODE (= Euler for flow); eta > 0: the
        posterior-variance SDE step. Returns ``(mean, std)``; the caller adds ``std * noise``.

        std^2 = eta^2 (sigma_s^2 / sigma_t^2) (sigma_t^2 - alpha_t^2 sigma_s^2 / alpha_s^2), the variance of
        q(x_s | x_t, x0) for the affine path (the DDIM formula for VP; also valid for flow).
        """
        a_t, s_t = self.alpha(t), self.sigma(t)
        a_s, s_s = self.alpha(s), self.sigma(s)
        if eta > 0:
            var = (s_s**2 / s_t.clamp_min(1e-12) ** 2) * (s_t**2 - a_t**2 * s_s**2 / a_s.clamp_min(1e-12) ** 2)
            std = eta * var.clamp_min(0).sqrt()
        else:
            std = torch.zeros_like(s_s)
        dir_coef = (s_s**2 - std**2).clamp_min(0).sqrt()
        like = x0_hat
        mean = _bcast(a_s, like) * x0_hat + _bcast(dir_coef, like) * eps_hat
        return mean, _bcast(std, like)

    def flow_sde_step(self, x_t: Tensor, x0_hat: Tensor, eps_hat: Tensor, t: Tensor, s: Tensor, kind: str,
                      noise_level: float, t_first: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """One Euler-Maruyama step t -> s < t of the reverse flow SDE
        ``dx = [v - g_t^2/2 * score] dt + g_t dw`` (rectified flow only), as the GRPO papers sample it.

        ``v = eps_hat - x0_hat``, ``score = -eps_hat / t``, so ``mean = x_t + (s - t) (v + g_t^2 eps_hat / (2 t))``
        and ``std = g_t sqrt(t - s)``. ``kind``:

        * ``flow_grpo`` (Flow-GRPO, ``sde_step_with_logprob``): ``g_t = a sqrt(t / (1 - t))`` with
          ``a = noise_level`` (0.7); at ``t = 1`` the denominator uses ``1 - t_first`` (``t_first`` = the
          grid's second point, Flow-GRPO's ``sigmas[1]``) instead of 0.
        * ``dance_grpo`` (DanceGRPO, ``flux_step`` with ``sde_solver``): ``g_t = eta = noise_level``.

        Returns ``(mean, std)``; the caller adds ``std * noise``.
        """
        if self.prediction != "flow":
            from ..errors import TrlVideoError

            raise TrlVideoError(f"sampler kind '{kind}' is the rectified-flow SDE of its paper; this model's "
                                f"schedule is '{self.prediction}' (use kind 'ddim')")
        t = torch.as_tensor(t, dtype=torch.float32)
        s = torch.as_tensor(s, dtype=torch.float32)
        if kind == "flow_grpo":
            t_den = torch.where(t >= 1, torch.as_tensor(t_first if t_first is not None else t, dtype=t.dtype), t)
            g2 = noise_level**2 * t / (1 - t_den).clamp_min(1e-12)
        elif kind == "dance_grpo":
            g2 = torch.full_like(t, float(noise_level) ** 2)
        else:
            from ..errors import TrlVideoError

            raise TrlVideoError(f"unknown SDE kind '{kind}' (ddim|flow_grpo|dance_grpo)")
        like = x_t
        dt = s - t
        v = eps_hat - x0_hat
        mean = x_t + _bcast(dt, like) * (v + _bcast(g2 / (2 * t.clamp_min(1e-12)), like) * eps_hat)
        std = (g2 * (-dt).clamp_min(0)).sqrt()
        return mean, _bcast(std, like)

    def sde_step(self, x_t: Tensor, x0_hat: Tensor, eps_hat: Tensor, t: Tensor, s: Tensor, kind: str = "ddim",
                 eta: float = 0.0, t_first: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """The sampler transition of ``kind``: ``ddim`` (posterior-variance step, :meth:`ddim_step`) or a
        GRPO-paper flow SDE (:meth:`flow_sde_step`, ``eta`` = its noise level). ``eta = 0`` is the ODE step."""
        if kind == "ddim" or eta <= 0:
            return self.ddim_step(x0_hat, eps_hat, t, s, eta)
        return self.flow_sde_step(x_t, x0_hat, eps_hat, t, s, kind, eta, t_first)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample log N(x; mean, std^2 I), averaged over elements (Flow-GRPO's convention, which keeps
    importance ratios well-conditioned at video sizes). Shape ``[B]``."""
    std = std.expand_as(mean) if std.ndim else std * torch.ones_like(mean)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    return lp.flatten(1).mean(1)
