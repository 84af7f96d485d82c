"""The causal generator: teacher equivalence, block causality, KV cache vs full recomputation, save/reload."""

import copy

import pytest
import torch

from vidrl_plugin_reward_forcing.model import CausalWanTransformer3DModel, bidirectional, block_causal_mask
from vidrl_plugin_reward_forcing.rollout import self_rollout, student_timesteps

KV_TOL = 1e-5  # max abs difference, cached vs recomputed (float32; outputs are O(1))


def _causal(teacher_policy, chunk_size=1):
    return CausalWanTransformer3DModel.from_teacher(teacher_policy.transformer, chunk_size=chunk_size).eval()


def test_mask_by_hand():
    m = block_causal_mask(range(0, 4), range(0, 4), tokens_per_frame=1, chunk_size=2)
    expect = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert block_causal_mask(range(2, 3), range(0, 3), 4, 1) is None  # a last chunk sees everything


@torch.no_grad()
def test_full_mask_is_teacher(teacher_policy, embeds):
    """Teacher weights load (strict) and with full attention give the teacher's output bit for bit."""
    model = _causal(teacher_policy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 8, 8, generator=g)
    t = torch.tensor([500.0, 800.0])
    ref = teacher_policy.transformer(x, t, embeds, return_dict=False)[0]
    assert torch.equal(model(x, t, embeds, return_dict=False, causal=False)[0], ref)
    with bidirectional(model):
        assert torch.equal(model(x, t[:, None].expand(2, 3), embeds, return_dict=False)[0], ref)
    # and the block-causal default differs (earlier frames no longer see later ones)
    assert not torch.allclose(model(x, t, embeds, return_dict=False)[0], ref, atol=1e-3)


@pytest.mark.parametrize("chunk_size,frames", [(1, 3), (2, 4)])
@torch.no_grad()
def test_changing_a_later_chunk_leaves_earlier_outputs_bit_identical(teacher_policy, embeds, chunk_size, frames):
    model = _causal(teacher_policy, chunk_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, frames, 8, 8, generator=g)
    t = torch.rand(2, frames, generator=g) * 1000  # a different noise level per frame
    out = model(x, t, embeds, return_dict=False)[0]
    last = frames - chunk_size
    x2, t2 = x.clone(), t.clone()
    x2[:, :, last:] += torch.randn(2, 8, chunk_size, 8, 8, generator=g)
    t2[:, last:] = 999.0
    out2 = model(x2, t2, embeds, return_dict=False)[0]
    assert torch.equal(out[:, :, :last], out2[:, :, :last])
    assert (out[:, :, last:] - out2[:, :, last:]).abs().max() > 1e-2


@torch.no_grad()
def test_rollout_is_causal_in_the_noise(teacher_policy, embeds):
    model = _causal(teacher_policy)
    sch = teacher_policy.schedule
    ts = student_timesteps(sch, 4)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 8, 3, 8, 8, generator=g)

    def run(nz):
        r = torch.Generator().manual_seed(3)
        return self_rollout(model, sch, embeds, nz, ts, randn=lambda s: torch.randn(*s, generator=r)).latents

    a = run(noise)
    noise2 = noise.clone()
    noise2[:, :, 2] = torch.randn(2, 8, 8, 8, generator=g)
    b = run(noise2)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.equal(a[:, :, 2], b[:, :, 2])


def _recompute_rollout(model, sch, embeds, noise, ts, randn, cs):
    """Second implementation, no cache: every call runs the whole prefix [clean earlier chunks at t=0 | current
    noisy chunk at t_k] with the block-causal mask and keeps the current chunk's output."""
    b, _, f = noise.shape[:3]
    done = noise[:, :, :0]
    for c in range(f // cs):
        x = noise[:, :, c * cs:(c + 1) * cs]
        for k, t in enumerate(ts):
            seq = torch.cat([done, x], dim=2)
            tf = torch.zeros(b, seq.shape[2])
            tf[:, -cs:] = float(sch.model_timestep(torch.tensor(t)))
            native = model(seq, tf, embeds, return_dict=False)[0][:, :, -cs:]
            tt = torch.full((b,), t)
            x0 = sch.to_x0(native, x, tt)
            if k + 1 < len(ts):
                x = sch.add_noise(x0, randn(tuple(x0.shape)), torch.full((b,), ts[k + 1]))
        done = torch.cat([done, x0], dim=2)
    return done


@pytest.mark.parametrize("chunk_size,frames", [(1, 3), (2, 4)])
@torch.no_grad()
def test_kv_cache_generation_equals_full_recomputation(teacher_policy, embeds, chunk_size, frames):
    model = _causal(teacher_policy, chunk_size)
    sch = teacher_policy.schedule
    ts = student_timesteps(sch, 4)
    noise = torch.randn(2, 8, frames, 8, 8, generator=torch.Generator().manual_seed(4))
    r1, r2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cached = self_rollout(model, sch, embeds, noise, ts, randn=lambda s: torch.randn(*s, generator=r1)).latents
    full = _recompute_rollout(model, sch, embeds, noise, ts, lambda s: torch.randn(*s, generator=r2), chunk_size)
    assert (cached - full).abs().max() < KV_TOL


def test_grad_modes_keep_the_graph_where_asked(teacher_policy, embeds):
    model = _causal(teacher_policy)
    sch = teacher_policy.schedule
    ts = student_timesteps(sch, 4)
    noise = torch.randn(2, 8, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    for mode, expect in (("last", [False, False, True]), ("all", [True, True, True])):
        out = self_rollout(model, sch, embeds, noise, ts, randn=lambda s: torch.randn(*s, generator=g), grad=mode)
        kept = []
        for c in range(3):  # does chunk c's output reach the weights?
            model.zero_grad()
            if out.latents.requires_grad:
                out.latents[:, :, c].sum().backward(retain_graph=True)
            kept.append(any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()))
        assert kept == expect, mode


def test_save_reload_as_pipeline_folder(teacher_policy, embeds, tmp_path):
    from trl_video.models.policy import load_policy

    policy = copy.copy(teacher_policy)
    object.__setattr__(policy, "_modules", dict(teacher_policy._modules))
    policy.transformer = _causal(teacher_policy, chunk_size=1)
    policy.save_pretrained(tmp_path / "causal")
    cfg = (tmp_path / "causal" / "transformer" / "config.json").read_text()
    assert '"_class_name": "CausalWanTransformer3DModel"' in cfg and '"chunk_size": 1' in cfg
    loaded = load_policy(str(tmp_path / "causal"))
    assert type(loaded.transformer) is CausalWanTransformer3DModel
    x = torch.randn(2, 8, 3, 8, 8)
    t = torch.tensor([300.0, 600.0])
    with torch.no_grad():
        assert torch.equal(loaded.transformer(x, t, embeds, return_dict=False)[0],
                           policy.transformer(x, t, embeds, return_dict=False)[0])


def test_lora_trains_through_the_causal_model(teacher_policy, embeds):
    from peft import LoraConfig

    model = _causal(teacher_policy)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    out = model(torch.randn(1, 8, 3, 8, 8), torch.tensor([500.0]), embeds[:1], return_dict=False)[0]
    out.pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
