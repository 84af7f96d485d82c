"""NoiseSchedule: closed-form checks of the affine path, the native targets, every conversion and the
DDIM / posterior-variance step, for the flow (Wan) and VP v-prediction (CogVideoX) parameterisations.

References are written here independently: flow uses alpha = 1 - t, sigma = t by hand; VP reads abar
straight from a real ``diffusers.CogVideoXDDIMScheduler`` and cross-checks against its own ``add_noise``,
``get_velocity``, ``_get_variance`` and ``step``.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_video.models.schedule import NoiseSchedule, gaussian_log_prob

T = 1000
SHAPE = (3, 4, 2, 5, 6)  # [B, C, F, H, W]


def cog_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", snr_shift_scale=3.0)


@pytest.fixture(scope="module")
def sched():
    return cog_scheduler()


def make(kind: str, sched) -> NoiseSchedule:
    if kind == "flow":
        return NoiseSchedule("flow")
    return NoiseSchedule("v", alphas_cumprod=sched.alphas_cumprod.clone().float())


def ref_abar(sched, t: torch.Tensor) -> torch.Tensor:
    """abar(t) written independently: linear interpolation of the scheduler's table at t * (T - 1),
    with the clean end abar(0) = 1."""
    ac = sched.alphas_cumprod.double()
    out = []
    for tt in t.double().tolist():
        if tt <= 0:
            out.append(1.0)
            continue
        pos = tt * (len(ac) - 1)
        lo = min(int(math.floor(pos)), len(ac) - 1)
        hi = min(lo + 1, len(ac) - 1)
        w = pos - lo
        out.append(float(ac[lo]) * (1 - w) + float(ac[hi]) * w)
    return torch.tensor(out, dtype=torch.float64)


def ref_alpha_sigma(kind: str, sched, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "flow":
        return (1 - t.double()), t.double()
    ab = ref_abar(sched, t)
    return ab.sqrt(), (1 - ab).clamp_min(0).sqrt()


def bc(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1, 1)


def random_case(seed: int, lo: float = 0.02, hi: float = 0.98):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    t = lo + (hi - lo) * torch.rand(SHAPE[0], generator=g)
    return x0.float(), eps.float(), t


KINDS = ["flow", "v"]


# --------------------------------------------------------------------------------------------- the path
@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_and_target_closed_form(kind, sched):
    sch = make(kind, sched)
    for seed in range(3):
        x0, eps, t = random_case(seed)
        a, s = ref_alpha_sigma(kind, sched, t)
        xt_ref = bc(a) * x0.double() + bc(s) * eps.double()
        torch.testing.assert_close(sch.add_noise(x0, eps, t).double(), xt_ref, atol=1e-5, rtol=1e-5)
        native_ref = (eps - x0).double() if kind == "flow" else bc(a) * eps.double() - bc(s) * x0.double()
        torch.testing.assert_close(sch.target(x0, eps, t).double(), native_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_native_target_roundtrip_recovers_x0_and_eps(kind, sched):
    sch = make(kind, sched)
    for seed in range(3):
        x0, eps, t = random_case(seed)
        xt = sch.add_noise(x0, eps, t)
        native = sch.target(x0, eps, t)
        torch.testing.assert_close(sch.to_x0(native, xt, t), x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sch.to_eps(native, xt, t), eps, atol=1e-5, rtol=1e-5)
        # a wrong target must not round-trip (the check has teeth)
        assert not torch.allclose(sch.to_x0(native + 0.1, xt, t), x0, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_t_broadcasts(kind, sched):
    sch = make(kind, sched)
    x0, eps, _ = random_case(7)
    t = torch.tensor(0.37)
    xt = sch.add_noise(x0, eps, t)
    xt_vec = sch.add_noise(x0, eps, t.expand(SHAPE[0]))
    torch.testing.assert_close(xt, xt_vec)
    torch.testing.assert_close(sch.to_x0(sch.target(x0, eps, t), xt, t), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_score_is_minus_eps_over_sigma(kind, sched):
    sch = make(kind, sched)
    x0, eps, t = random_case(11)
    xt = sch.add_noise(x0, eps, t)
    native = sch.target(x0, eps, t)
    _, s = ref_alpha_sigma(kind, sched, t)
    torch.testing.assert_close(sch.to_score(native, xt, t).double(), -eps.double() / bc(s), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_score_scale_identity(kind, sched):
    sch = make(kind, sched)
    g = torch.Generator().manual_seed(3)
    x0, eps, t = random_case(5)
    xt = sch.add_noise(x0, eps, t)
    n_a, n_b = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    lhs = sch.to_score(n_a, xt, t) - sch.to_score(n_b, xt, t)
    scale = sch.score_scale(t, xt)
    torch.testing.assert_close(lhs, scale * (n_a - n_b), atol=1e-4, rtol=1e-4)
    # and the closed form of the scale itself: -alpha / sigma  (flow: -(1 - t) / t)
    a, s = ref_alpha_sigma(kind, sched, t)
    torch.testing.assert_close(scale.double().flatten(), (-a / s), atol=1e-5, rtol=1e-5)
    # x0_scale: d x0_hat / d native = -sigma
    lhs_x0 = sch.to_x0(n_a, xt, t) - sch.to_x0(n_b, xt, t)
    torch.testing.assert_close(lhs_x0, sch.x0_scale(t, xt) * (n_a - n_b), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- VP specifics
def test_vp_alpha_sigma_unit_norm(sched):
    sch = make("v", sched)
    t = torch.linspace(0, 1, 2001)
    torch.testing.assert_close(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), atol=1e-6, rtol=0)


def test_vp_alpha_at_integer_timesteps(sched):
    sch = make("v", sched)
    k = torch.arange(1, T)
    t = k.float() / (T - 1)
    torch.testing.assert_close(sch.alpha(t).double(), sched.alphas_cumprod[k].double().sqrt(), atol=1e-6, rtol=1e-5)
    # the clean end is exactly the data, the noise end is pure noise (zero terminal SNR)
    assert float(sch.alpha(torch.tensor(0.0))) == 1.0 and float(sch.sigma(torch.tensor(0.0))) == 0.0
    assert float(sched.alphas_cumprod[-1]) < 1e-6
    assert abs(float(sch.sigma(torch.tensor(1.0))) - 1.0) < 1e-6
    # linear interpolation of abar between integer timesteps
    tm = (torch.arange(10, 20).double() + 0.5) / (T - 1)
    mid = (sched.alphas_cumprod[10:20].double() + sched.alphas_cumprod[11:21].double()) / 2
    torch.testing.assert_close(sch.alpha(tm.float()).double() ** 2, mid, atol=1e-6, rtol=1e-5)
    # model timestep is the discrete DDPM index
    torch.testing.assert_close(sch.model_timestep(t), k.float(), atol=1e-3, rtol=0)


def test_vp_matches_diffusers_add_noise_and_velocity(sched):
    sch = make("v", sched)
    x0, eps, _ = random_case(21)
    k = torch.tensor([1, 400, 999])
    t = k.float() / (T - 1)
    torch.testing.assert_close(sch.add_noise(x0, eps, t), sched.add_noise(x0, eps, k), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sch.target(x0, eps, t), sched.get_velocity(x0, eps, k), atol=1e-5, rtol=1e-5)


def test_flow_timesteps_grid_and_model_timestep():
    sch = NoiseSchedule("flow", shift=3.0)
    u = torch.linspace(1, 0, 5)
    torch.testing.assert_close(sch.timesteps(4), 3 * u / (1 + 2 * u))
    assert float(sch.timesteps(4)[0]) == 1.0 and float(sch.timesteps(4)[-1]) == 0.0
    torch.testing.assert_close(NoiseSchedule("flow").timesteps(4), u)
    torch.testing.assert_close(sch.model_timestep(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))


# --------------------------------------------------------------------------------------------- DDIM step
def test_flow_ddim_eta0_is_euler():
    sch = NoiseSchedule("flow")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPE, generator=g)
    v = torch.randn(*SHAPE, generator=g)
    for t, s in [(1.0, 0.75), (0.6, 0.3), (0.25, 0.0)]:
        tt, ss = torch.tensor(t), torch.tensor(s)
        mean, std = sch.ddim_step(sch.to_x0(v, x, tt), sch.to_eps(v, x, tt), tt, ss, eta=0.0)
        torch.testing.assert_close(mean, x + (s - t) * v, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(std) == 0


def test_flow_ddim_eta_std_closed_form():
    """For flow (alpha = 1 - t, sigma = t) the posterior std of q(x_s | x_t, x0) is
    (s / t) * sqrt(t^2 - (1 - t)^2 s^2 / (1 - s)^2)."""
    sch = NoiseSchedule("flow")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    for t, s, eta in [(0.9, 0.6, 1.0), (0.5, 0.2, 0.7)]:
        mean, std = sch.ddim_step(x0, eps, torch.tensor(t), torch.tensor(s), eta=eta)
        ref_std = eta * (s / t) * math.sqrt(t**2 - (1 - t) ** 2 * s**2 / (1 - s) ** 2)
        assert abs(float(std) - ref_std) < 1e-6
        ref_mean = (1 - s) * x0 + math.sqrt(s**2 - ref_std**2) * eps
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_vp_ddim_std_is_ddpm_posterior_std(sched, eta):
    sch = make("v", sched)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    ac = sched.alphas_cumprod.double()
    for kt, ks in [(999, 749), (600, 500), (300, 50), (120, 1)]:
        t, s = torch.tensor(kt / (T - 1)), torch.tensor(ks / (T - 1))
        mean, std = sch.ddim_step(x0, eps, t, s, eta=eta)
        ab_t, ab_s = float(ac[kt]), float(ac[ks])
        ref_std = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        assert abs(float(std) - ref_std) < 1e-5 * max(1.0, ref_std), (kt, ks, float(std), ref_std)
        # and diffusers' own DDIM variance
        dif_std = eta * float(sched._get_variance(kt, ks)) ** 0.5
        assert abs(float(std) - dif_std) < 1e-5
        ref_mean = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - ref_std**2) * eps
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)


def test_vp_ddim_eta0_matches_diffusers_step(sched):
    """eta = 0 DDIM step from native v equals CogVideoXDDIMScheduler.step at its trailing timesteps."""
    sch = make("v", sched)
    s2 = cog_scheduler()
    s2.set_timesteps(4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*SHAPE, generator=g)
    v = torch.randn(*SHAPE, generator=g)
    for k in s2.timesteps.tolist():
        kp = k - T // 4
        if kp < 0:
            continue
        t, s = torch.tensor(k / (T - 1)), torch.tensor(kp / (T - 1))
        mean, _ = sch.ddim_step(sch.to_x0(v, x, t), sch.to_eps(v, x, t), t, s, eta=0.0)
        ref = s2.step(v, k, x, return_dict=False)[0]
        torch.testing.assert_close(mean, ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- log-prob
def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*SHAPE, generator=g)
    mean = torch.randn(*SHAPE, generator=g)
    # per-sample std (as ddim_step returns it), and a scalar std
    std = 0.3 + torch.rand(SHAPE[0], generator=g).reshape(-1, 1, 1, 1, 1)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)
    out = gaussian_log_prob(x, mean, std)
    assert out.shape == (SHAPE[0],)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    sstd = torch.tensor(0.7)
    ref2 = torch.distributions.Normal(mean, sstd).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, sstd), ref2, atol=1e-5, rtol=1e-5)


def test_gaussian_log_prob_grad_flows_to_mean_only():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 1, 2, 2, generator=g).requires_grad_(True)
    mean = torch.randn(2, 3, 1, 2, 2, generator=g).requires_grad_(True)
    std = torch.tensor(0.5)
    gaussian_log_prob(x, mean, std).sum().backward()
    assert x.grad is None  # the sample is detached
    n = mean[0].numel()
    torch.testing.assert_close(mean.grad, (x.detach() - mean.detach()) / (std**2) / n)
