"""The three roles inside the real trainer on tiny-wan-random (one or two steps, tiny batches)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from trl_video.components.base import Phase
from trl_video.config import config_from_dict
from trl_video.data import save_offline_latents
from trl_video.models.policy import load_policy
from trl_video.trainer import VideoRewardTrainer
from trl_video.world import render_batch

warnings.filterwarnings("ignore")


def _config(tmp_path, **kw):
    base = dict(model="tiny-wan-random", method="dmalign", reward="alignment", prompts_per_step=2, group_size=2,
                max_steps=1, output_dir=str(tmp_path / "out"), report_to="none", save_model_at_end=False,
                learning_rate=1e-3)
    base.update(kw)
    return config_from_dict(base)


def test_fake_updated_n_times_per_generator_step_and_never_by_generator_loss(tmp_path):
    tr = VideoRewardTrainer(_config(tmp_path, method_args={"align": "group", "fake_updates": 5}))
    assert set(tr.groups) == {"policy", "fake"}
    loss = tr.loss
    phases = loss.phases(0)
    assert [(p.name, p.groups, p.repeats, p.uses_graph) for p in phases] == [
        ("generator", ("policy",), 1, True), ("fake", ("fake",), 5, False)]  # Alg. 1 order
    # the fake model is a copy of the teacher: no LoRA layers of the generator, all its weights trainable
    assert not any("lora" in n for n, _ in loss.fake.named_parameters())
    assert all(p.requires_grad for p in loss.fake.parameters())
    steps = {"policy": 0, "fake": 0}
    for name, opt in tr.optimizers.items():
        orig = opt.step

        def counted(*a, _name=name, _orig=orig, **k):
            steps[_name] += 1
            return _orig(*a, **k)

        opt.step = counted
    fake_before = [p.detach().clone() for p in loss.fake.parameters()]
    pol_before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    m = tr.training_step()
    assert steps == {"policy": 1, "fake": 5}
    assert loss.fake_calls == 5 and loss.generator_calls == 1
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, loss.fake.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, tr.policy.trainable_parameters()))
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())

    # gradients: the generator loss never reaches the fake model; the fake loss never reaches the generator
    with torch.enable_grad():
        batch = tr._fresh_rollouts()
    assert batch.latents.requires_grad  # the sampler kept the K-step graph for the generator phase
    out, _ = loss.compute(tr.ctx, Phase("generator", groups=("policy",)), batch)
    out.backward()
    assert all(p.grad is None for p in loss.fake.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.policy.trainable_parameters())
    for p in tr.policy.trainable_parameters():
        p.grad = None
    out, _ = loss.compute(tr.ctx, Phase("fake", groups=("fake",), uses_graph=False), batch.detach())
    out.backward()
    assert all(p.grad is None for p in tr.policy.trainable_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.fake.parameters())


def test_pair_end_to_end_with_preferred_world_latents(tmp_path):
    """One DM-Pair step: preferred latents = ground-truth world clips encoded with the VAE, matched by caption."""
    policy = load_policy("tiny-wan-random")
    caps = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]
    clips = render_batch(caps * 2, [0, 1, 2, 3])
    with torch.no_grad():
        lat = policy.encode_video(clips)
    save_offline_latents(str(tmp_path / "pref"), caps * 2, lat, source="real")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in caps))
    cfg = _config(tmp_path, prompts=str(tmp_path / "prompts.jsonl"), offline_latents=str(tmp_path / "pref"),
                  use_peft=False, method_args={"align": "pair", "fake_updates": 2}, save_model_at_end=True)
    tr = VideoRewardTrainer(cfg, policy=policy)
    assert tr.policy._frozen_reference is not None  # full fine-tuning: the real model is a frozen copy
    res = tr.train()
    row = tr.history[-1]
    assert row["generator/pair_matched"] == 1.0
    assert row["loss/generator"] > 0 and row["loss/fake"] > 0
    assert (tmp_path / "out" / "model" / "model_index.json").exists()
    assert res["global_step"] == 1


def test_pair_without_offline_latents_is_a_clear_error(tmp_path):
    from trl_video.errors import TrlVideoError

    with pytest.raises(TrlVideoError, match="offline_latents"):
        VideoRewardTrainer(_config(tmp_path, method_args={"align": "pair"}))


def test_checkpoint_resume_restores_fake_model(tmp_path):
    cfg = _config(tmp_path, max_steps=1, method_args={"align": "none", "fake_updates": 1})
    tr = VideoRewardTrainer(cfg)
    tr.train()
    saved = [p.detach().clone() for p in tr.loss.fake.parameters()]
    cfg2 = _config(tmp_path, max_steps=1, method_args={"align": "none", "fake_updates": 1})
    tr2 = VideoRewardTrainer(cfg2, resume=True)
    tr2.load_checkpoint(tr2.resume_from)
    assert all(torch.equal(a, b) for a, b in zip(saved, tr2.loss.fake.parameters()))


def test_fake_trains_on_the_generator_phase_samples_before_the_update(tmp_path):
    """Alg. 1: generator update first, then N fake updates on stopgrad(x) of that step (not on a recomputation
    with the updated generator, and never before the generator has used the fake on this batch)."""
    tr = VideoRewardTrainer(_config(tmp_path, method_args={"align": "none", "align_weight": 0.0, "fake_updates": 3}))
    loss = tr.loss
    calls: list[torch.Tensor] = []
    orig = loss.generator_x0

    def recording(ctx, batch, k):
        out = orig(ctx, batch, k)
        calls.append(out.detach().clone())
        return out

    loss.generator_x0 = recording
    order: list[str] = []
    orig_compute = loss.compute
    loss.compute = lambda ctx, phase, batch: (order.append(phase.name), orig_compute(ctx, phase, batch))[1]
    tr.training_step()
    assert order == ["generator", "fake", "fake", "fake"]
    assert len(calls) == 1  # x computed once, by the generator phase
    stored = [v for key, v in tr.ctx.state.items() if isinstance(key, tuple) and key[0] == "dmalign_x"]
    assert len(stored) == 1 and torch.equal(stored[0], calls[0])


def test_real_score_guidance_is_cfg_on_the_frozen_teacher(tmp_path):
    """real_guidance_scale w: x0_real = u + w (c - u) with c, u the teacher's x0 predictions on the prompt and on the
    empty prompt (computed here directly from the frozen reference); w = 1 is the conditional prediction."""
    from trl_video.components.samplers import predict

    tr = VideoRewardTrainer(_config(tmp_path, method_args={"align": "none", "align_weight": 0.0,
                                                           "real_guidance_scale": 3.0}))
    ctx, pol = tr.ctx, tr.policy
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, *pol.latent_shape, generator=g)
    t = torch.tensor([0.3, 0.8])
    emb = pol.encode_prompts(["a red circle moving left", "a blue square moving up"])[0]
    with torch.no_grad(), pol.reference() as ref:
        c = predict(ctx, ref, x_t, t, emb)[1]
        u = predict(ctx, ref, x_t, t, pol.encode_prompts(["", ""])[0])[1]
    torch.testing.assert_close(tr.loss.real_x0(ctx, x_t, t, emb), u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)
    tr.loss.cfg.real_guidance_scale = 1.0
    torch.testing.assert_close(tr.loss.real_x0(ctx, x_t, t, emb), c, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(c, u)
