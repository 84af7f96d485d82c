"""FCRM inside VideoRewardTrainer: CRN, zero-init b_phi, one tiny step online / few-step+EMA+FIFO /
pure-offline / hybrid, the offline normaliser and its checkpoint state."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from vidrl_plugin_fcrm.loss import EMARewardNormalizer, FCRMLoss

from trl_video.config import config_from_dict
from trl_video.data import save_offline_latents
from trl_video.models.policy import load_policy
from trl_video.rollouts import Rollouts
from trl_video.trainer import VideoRewardTrainer

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


@pytest.fixture(scope="module")
def base_policy():
    torch.set_num_threads(1)
    return load_policy("tiny-wan-random")


def _trainer(base, tmp_path, **kw):
    rec = dict(model="tiny-wan-random", method="fcrm", reward="toy:latent_mean", max_steps=1, prompts_per_step=1,
               group_size=2, sampler_args={"num_steps": 2}, output_dir=str(tmp_path / "run"), report_to="none",
               save_model_at_end=False, seed=0)
    rec.update(kw)
    return VideoRewardTrainer(config_from_dict(rec), policy=copy.deepcopy(base))


def _offline_ds(tmp_path, base, n=6):
    gen = torch.Generator().manual_seed(3)
    lat = torch.randn(n, *base.latent_shape, generator=gen)
    prompts = [PROMPTS[i % 2] for i in range(n)]
    rewards = torch.linspace(0.2, 0.7, n)
    out = str(tmp_path / "offline")
    save_offline_latents(out, prompts, lat, rewards, source="test")
    return out, rewards


def _batch(tr, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [PROMPTS[i % 2] for i in range(n)]
    emb, _ = tr.policy.encode_prompts(prompts)
    lat = torch.randn(n, *tr.policy.latent_shape, generator=gen)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:n]
    return Rollouts(latents=lat, prompts=prompts, prompt_embeds=emb, rewards=adv, advantages=adv)


def test_bphi_zero_init_and_crn_reuses_noise(base_policy, tmp_path):
    tr = _trainer(base_policy, tmp_path)
    loss: FCRMLoss = tr.loss
    assert set(tr.optimizers) == {"policy", "b_phi"}
    assert tr.optimizers["b_phi"].param_groups[0]["lr"] == pytest.approx(1e-3)
    batch = _batch(tr)
    _, mask = tr.policy.encode_prompts(batch.prompts)
    assert torch.equal(loss.b_phi(batch.prompt_embeds, mask), torch.zeros(2))  # zero-init: b_phi = 0 at step 0

    # theta == reference at init (LoRA B = 0): with common random numbers L_ref - L_theta is EXACTLY 0
    _, met = loss.compute(tr.ctx, tr.loss.phases(0)[0], batch)
    assert met["online/delta_L"] == 0.0 and met["online/mc_var"] == 0.0
    assert met["online/g_mean"] == pytest.approx(-float(batch.advantages.mean()), abs=1e-6)
    # ... so the naive estimator's loss is exactly mean (beta A)^2, and signal=reward swaps in the raw reward
    loss.cfg.estimator, loss.cfg.beta = "naive", 2.0
    value, met = loss.compute(tr.ctx, tr.loss.phases(0)[0], batch.with_(rewards=torch.tensor([0.3, 0.1])))
    assert float(value.detach()) == pytest.approx(float(((2.0 * batch.advantages) ** 2).mean()), rel=1e-5)
    loss.cfg.signal = "reward"
    value, met = loss.compute(tr.ctx, tr.loss.phases(0)[0], batch.with_(rewards=torch.tensor([0.3, 0.1])))
    assert float(value.detach()) == pytest.approx((0.6**2 + 0.2**2) / 2, rel=1e-5)
    loss.cfg.estimator, loss.cfg.beta, loss.cfg.signal = "double", 1.0, "advantage"

    # perturb the LoRA so the networks differ; record what each network is fed
    with torch.no_grad():
        for n, p in tr.policy.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    calls, in_ref = [], [False]
    orig_predict, orig_reference = tr.policy.predict, tr.policy.reference

    def predict(x_t, t, emb, transformer=None):
        calls.append({"ref": in_ref[0], "x_t": x_t.detach().clone(), "t": t.detach().clone()})
        return orig_predict(x_t, t, emb, transformer=transformer)

    @contextlib.contextmanager
    def reference():
        in_ref[0] = True
        with orig_reference() as ref:
            yield ref
        in_ref[0] = False

    tr.policy.predict, tr.policy.reference = predict, reference
    try:
        _, met = loss.compute(tr.ctx, tr.loss.phases(0)[0], batch)
    finally:
        tr.policy.predict, tr.policy.reference = orig_predict, orig_reference
    assert [c["ref"] for c in calls] == [False, True]  # one policy pass, one reference pass (A and B batched)
    assert torch.equal(calls[0]["x_t"], calls[1]["x_t"]) and torch.equal(calls[0]["t"], calls[1]["t"])
    x_a, x_b = calls[0]["x_t"][:2], calls[0]["x_t"][2:]
    assert not torch.allclose(x_a, x_b)  # A and B are independent noising batches
    assert met["online/delta_L"] != 0.0 and met["online/mc_var"] > 0.0

    # ... and one tiny online training step end to end through VideoRewardTrainer
    before = {n: p.detach().clone() for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}
    tr.train()
    row = tr.history[-1]
    assert row["grad_norm/policy"] > 0 and "fcrm/online/residual_sq" in row and "reward_mean" in row
    after = dict(tr.policy.transformer.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / "run" / "checkpoint-1" / "trainable.safetensors").exists()


def test_fewstep_ema_fifo_step(base_policy, tmp_path):
    tr = _trainer(base_policy, tmp_path, sampler="fewstep", sampler_args={"timesteps": [1.0, 0.6, 0.3]},
                  replay="fifo", replay_args={"capacity": 8, "filter": "positive"}, ema_decay=0.9,
                  method_args={"timestep_dist": "sampler"})
    tr.sampler.behaviour = "ema"
    assert torch.allclose(tr.loss.t_set, torch.tensor([1.0, 0.6, 0.3]))
    t = tr.loss.draw_t(tr.ctx, 200)
    assert set(t.tolist()) == {1.0, 0.6000000238418579, 0.30000001192092896}
    tr.train()
    assert tr.replay.inserted == 1  # the positive-advantage half of one group of 2
    assert tr.history[-1]["grad_norm/policy"] > 0


def test_pure_offline_step(base_policy, tmp_path):
    path, rewards = _offline_ds(tmp_path, base_policy)
    tr = _trainer(base_policy, tmp_path, replay="offline", offline_latents=path, prompts_per_step=2, group_size=1,
                  method_args={"offline_advantage": "nonnegative"})
    assert tr.prompt_sampler is None  # no rollouts at all
    calls = []
    tr.sampler.sample = lambda *a, **k: calls.append(1)
    tr.train()
    row = tr.history[-1]
    assert not calls
    assert row["grad_norm/policy"] > 0 and row["grad_norm/b_offline"] > 0 and "grad_norm/b_phi" not in row
    assert tr.loss.phases(0)[0].groups == ("policy", "b_offline")
    assert "fcrm/offline/residual_sq" in row and tr.loss.offline_norm.count == 1
    comps = torch.load(tmp_path / "run" / "checkpoint-1" / "components.pt", weights_only=True)
    assert comps["loss"]["offline_norm"]["count"] == 1


def test_hybrid_step_mixes_offline_branch(base_policy, tmp_path):
    path, _ = _offline_ds(tmp_path, base_policy)
    tr = _trainer(base_policy, tmp_path, offline_latents=path, method_args={"lambda_offline": 0.5})
    assert set(tr.optimizers) == {"policy", "b_phi", "b_offline"}
    tr.train()
    row = tr.history[-1]
    assert "fcrm/online/residual_sq" in row and "fcrm/offline/residual_sq" in row
    assert len(tr.ctx.offline.order) == 4  # 2 of the 6 offline samples drawn = the online count


def test_ema_reward_normaliser_formula():
    norm = EMARewardNormalizer(decay=0.5, sigma_min=0.01)
    r1, r2 = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    norm.update(r1)
    norm.update(r2)
    mu = 0.5 * 2.0 + 0.5 * 2.0
    m = 0.5 * 5.0 + 0.5 * 4.0
    assert norm.mu == pytest.approx(mu) and norm.m == pytest.approx(m)
    assert norm.sigma == pytest.approx((m - mu**2) ** 0.5)
    r = torch.tensor([0.0, 2.0, 10.0])
    z = (r - mu) / (norm.sigma + 1e-4)
    torch.testing.assert_close(norm.advantage(r, "signed"), z)
    torch.testing.assert_close(norm.advantage(r, "nonnegative", a0=1.0, a_max=3.0), (z + 1).clamp(0, 3))
    flat = EMARewardNormalizer(decay=0.9, sigma_min=0.25)
    flat.update(torch.tensor([1.0, 1.0]))
    assert flat.sigma == pytest.approx(0.25)  # sigma_min floor
    clone = EMARewardNormalizer()
    clone.load_state_dict(norm.state_dict())
    assert (clone.mu, clone.m, clone.count) == (norm.mu, norm.m, norm.count)
