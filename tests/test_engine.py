"""The core engine at scale (issue 11): precision (bf16 weights, fp32 trainables, fp16 loss scaling), per-group LR
schedules sized to the optimiser steps each group takes, gradient sync without a flat copy, the bounded text
cache and pre-encoded prompt embeddings, step metrics."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn
from trainer_probes import record_losses

from trl_video import hookimpl
from trl_video.components.base import Phase, Trainable
from trl_video.config import VideoRewardConfig
from trl_video.errors import TrlVideoError
from trl_video.plugins import Registry, make_plugin_manager
from trl_video.trainer import VideoRewardTrainer


def small_config(tmp_path, **kw) -> VideoRewardConfig:
    # 16x16 pixels, 5 frames: the CPU's bf16/fp16 convolutions are slow, so the steps here stay small
    base = dict(model="tiny-wan-random", method="refl", reward="alignment", prompts="world:train",
                sampler_args={"num_steps": 2, "grad_steps": 1}, prompts_per_step=2, group_size=1, max_steps=2,
                lora_r=4, learning_rate=1e-2, report_to="none", save_model_at_end=False, height=16, width=16,
                num_frames=5, output_dir=str(tmp_path / "run"), seed=1)
    base.update(kw)
    return VideoRewardConfig(**base)


def frozen_dtypes(tr: VideoRewardTrainer) -> set[torch.dtype]:
    pol = tr.policy
    out = {p.dtype for p in pol.vae.parameters()} | {p.dtype for p in pol.text_encoder.parameters()}
    return out | {p.dtype for p in pol.transformer.parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_recipe_loads_frozen_weights_in_bf16_and_trains_fp32_lora(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, mixed_precision="bf16"))
    assert frozen_dtypes(tr) == {torch.bfloat16}
    lora = {n: p.detach().clone() for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    emb, _ = tr.policy.encode_prompts(["a red circle moving left on a dark background"])
    assert emb.dtype == torch.bfloat16  # the text encoder ran in bf16
    metrics = tr.training_step()
    assert all(math.isfinite(v) for v in metrics.values())
    after = {n: p for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(after[n], v) for n, v in lora.items() if "lora_B" in n)  # it trained
    state = tr.optimizers["policy"].state[next(iter(after.values()))]
    assert state["exp_avg"].dtype == torch.float32  # AdamW moments follow the fp32 masters
    assert frozen_dtypes(tr) == {torch.bfloat16}


def test_full_finetune_bf16_keeps_masters_fp32_and_reference_bf16(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, mixed_precision="bf16", use_peft=False))
    assert {p.dtype for p in tr.policy.transformer.parameters()} == {torch.float32}
    with tr.policy.reference() as ref:
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tr.policy.vae.parameters()} == {torch.bfloat16}


def test_trainable_dtype_bf16_option(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, mixed_precision="bf16", trainable_dtype="bf16"))
    assert {p.dtype for p in tr.policy.trainable_parameters()} == {torch.bfloat16}


def test_fp16_overflow_skips_the_step_and_counts_it(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, mixed_precision="fp16", ema_decay=0.9, lr_scheduler_type="linear",
                                         max_steps=4))
    before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    ema_before = [p.clone() for p in tr.ctx.ema["policy"].shadow_params]
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # the fp16 backward overflows at this scale
    m = tr.training_step()
    assert m["skipped_steps/policy"] == 1.0
    assert "grad_norm/policy" not in m  # no inf/nan norm is logged
    assert m["loss_scale"] == 2.0 ** 119  # the scaler backed off
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.trainable_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, tr.ctx.ema["policy"].shadow_params))
    assert tr.schedulers["policy"].last_epoch == 0  # the schedule did not advance either
    assert m["lr/policy"] == pytest.approx(1e-2)


# ------------------------------------------------------------------------------------------------ LR schedules
class ScheduleProbeLoss:
    """Three groups with different step patterns: ``policy`` once per step, ``fake`` 3 times per step (DMD's
    fake updates), ``slow`` twice every 2nd step (an every-M phase). Losses are tiny quadratics: no sampling."""

    name = "schedule_probe"

    def setup(self, ctx):
        torch.manual_seed(0)
        self.fake, self.slow = nn.Linear(3, 1), nn.Linear(3, 1)
        return {"fake": Trainable(self.fake, lr=0.5), "slow": Trainable(self.slow, lr=0.25)}

    def phases(self, step):
        out = [Phase("policy", groups=("policy",), needs_rollouts=False),
               Phase("fake", groups=("fake",), repeats=3, needs_rollouts=False)]
        if step % 2 == 1:
            out.append(Phase("slow", groups=("slow",), repeats=2, needs_rollouts=False))
        return out

    def compute(self, ctx, phase, batch):
        if phase.name == "policy":
            params = ctx.policy.trainable_parameters()
        else:
            params = list(ctx.modules[phase.name].parameters())
        loss = sum((p.float() ** 2).sum() for p in params)
        return loss, {}


def probe_registry() -> Registry:
    @hookimpl
    def trl_video_register_losses(register):
        register("schedule_probe", ScheduleProbeLoss)

    plugin = types.SimpleNamespace(__name__="schedule_probe_plugin", trl_video_register_losses=trl_video_register_losses)
    pm, broken = make_plugin_manager(load_entrypoints=False, extra_plugins=[plugin])
    return Registry(pm, broken)


def expected_lr(kind: str, lr0: float, k: int, total: int, warmup: int) -> float:
    """Closed forms of the linear / cosine schedules with linear warm-up at optimiser step k (0-based)."""
    if k < warmup:
        return lr0 * k / warmup
    progress = (k - warmup) / (total - warmup)
    if kind == "linear":
        return lr0 * max(0.0, 1 - progress)
    return lr0 * 0.5 * (1 + math.cos(math.pi * progress))


def test_fp16_logged_grad_norm_is_unscaled(tmp_path):
    """fp16 with a loss scale of 2^16 on the probe's quadratic loss sum(p^2): the gradient is 2p exactly, so the
    logged (pre-clipping) norm must be 2 ||p||, not 65536 times that; the clipped update then uses it."""
    tr = VideoRewardTrainer(small_config(tmp_path, loss="schedule_probe", mixed_precision="fp16", max_grad_norm=1e-3),
                            registry=probe_registry())
    assert frozen_dtypes(tr) == {torch.float16}
    params = tr.policy.trainable_parameters()
    want = 2 * torch.cat([p.detach().flatten() for p in params]).norm().item()
    assert want > 0.01
    m = tr.training_step()
    assert m["loss_scale"] == 2.0 ** 16 and "skipped_steps/policy" not in m
    assert m["grad_norm/policy"] == pytest.approx(want, rel=1e-5)


def test_fp16_loss_scale_is_checkpointed(tmp_path):
    cfg = small_config(tmp_path, loss="schedule_probe", mixed_precision="fp16", max_steps=1)
    tr = VideoRewardTrainer(cfg, registry=probe_registry())
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120, growth_interval=1)
    tr.training_step()
    tr.global_step = 1
    tr.save_checkpoint()
    again = VideoRewardTrainer(cfg, registry=probe_registry(), resume=True)
    again.load_checkpoint(tmp_path / "run" / "checkpoint-1")
    assert again.scaler.get_scale() == tr.scaler.get_scale() != 2.0 ** 16
    assert again.scaler.state_dict() == tr.scaler.state_dict()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_every_group_follows_its_schedule_across_repeats(tmp_path, kind):
    steps, warmup = 6, 2
    cfg = small_config(tmp_path, loss="schedule_probe", lr_scheduler_type=kind, warmup_steps=warmup, max_steps=steps,
                       max_grad_norm=0.0)
    tr = VideoRewardTrainer(cfg, registry=probe_registry())
    # the optimiser steps each group takes, and during the first `warmup` trainer steps
    assert tr.planned_steps == {"policy": 6, "fake": 18, "slow": 6}
    seen: dict[str, list[float]] = {g: [] for g in tr.optimizers}
    for g, opt in tr.optimizers.items():
        opt.register_step_pre_hook(lambda o, args, kw, g=g: seen[g].append(o.param_groups[0]["lr"]))
    for _ in range(steps):
        tr.training_step()
        tr.global_step += 1
    lr0 = {"policy": 1e-2, "fake": 0.5, "slow": 0.25}
    warm = {"policy": 2, "fake": 6, "slow": 2}  # slow runs (2 repeats) at step 1 only within the first 2 steps
    for g, lrs in seen.items():
        assert len(lrs) == tr.planned_steps[g], g
        want = [expected_lr(kind, lr0[g], k, len(lrs), warm[g]) for k in range(len(lrs))]
        assert lrs == pytest.approx(want, abs=1e-12), g
    # the old behaviour (every schedule sized to max_steps) would have hit 0 after 6 of the 18 fake steps
    assert min(seen["fake"][warm["fake"]:-1]) > 0


def test_constant_schedule_needs_no_count(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, loss="schedule_probe", max_steps=10**6), registry=probe_registry())
    assert tr.schedulers["fake"].get_last_lr()[0] == 0.5


# ------------------------------------------------------------------------------------------------ grad sync
@pytest.fixture()
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_grad_sync_has_no_flat_copy(gloo_world_of_one, monkeypatch):
    """Every tensor handed to all_reduce is either a parameter's own .grad (reduced in place) or a bucket of at
    most bucket_bytes; the gradients together are far larger than a bucket, so no full flat copy exists."""
    from trl_video.grad_sync import all_reduce_gradients

    dist = gloo_world_of_one
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in (100, 50, 300, 4096, 10, 200, 3000)]
    params.append(nn.Parameter(torch.randn(7)))  # no gradient on this rank: gets a zero one
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params[:-1]]
    bucket = 2048
    seen: list[tuple[int, int]] = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        seen.append((tensor.data_ptr(), tensor.numel() * tensor.element_size()))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    calls = all_reduce_gradients(params, bucket_bytes=bucket)
    total = sum(p.numel() * 4 for p in params)
    grad_ptrs = {p.grad.data_ptr() for p in params}
    assert calls == len(seen) and 1 < calls < len(params)  # small grads were bucketed
    assert total > 10 * bucket
    for ptr, nbytes in seen:
        assert ptr in grad_ptrs or nbytes <= bucket, (ptr, nbytes)
    assert max(n for p, n in seen if p not in grad_ptrs) <= bucket
    # world of one: the mean is the gradient itself
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)
    assert torch.equal(params[-1].grad, torch.zeros(7))


def test_grad_sync_skips_fsdp_sharded_parameters(gloo_world_of_one, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from trl_video.grad_sync import all_reduce_gradients, is_sharded

    mesh = init_device_mesh("cpu", (1,))
    sharded = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    plain = nn.Parameter(torch.randn(5))
    plain.grad = torch.ones(5)
    assert is_sharded(sharded) and not is_sharded(plain)
    seen = []
    real = gloo_world_of_one.all_reduce
    monkeypatch.setattr(gloo_world_of_one, "all_reduce", lambda t, *a, **k: (seen.append(t), real(t, *a, **k))[1])
    assert all_reduce_gradients([sharded, plain], bucket_bytes=1024) == 1
    assert sharded.grad is None and len(seen) == 1 and seen[0] is plain.grad


# ------------------------------------------------------------------------------------------------ text embeddings
PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background",
           "a green circle moving right on a dark background"]


def test_text_cache_is_a_bounded_lru_on_cpu():
    from trl_video.models.policy import load_policy

    pol = load_policy("tiny-wan-random")
    pol.configure_text_cache(2)
    ref = {p: pol._encode_text([p])[0][0] for p in PROMPTS}
    calls = pol.text_encoder_calls
    pol.encode_prompts(PROMPTS[:2])
    pol.encode_prompts([PROMPTS[0]])  # touch: PROMPTS[1] is now the least recently used
    pol.encode_prompts([PROMPTS[2]])  # evicts PROMPTS[1]
    assert list(pol._prompt_cache) == [PROMPTS[0], PROMPTS[2]]
    assert all(e.device.type == "cpu" for e, _ in pol._prompt_cache.values())
    assert pol.text_encoder_calls - calls == 3
    emb, _ = pol.encode_prompts([PROMPTS[1], PROMPTS[0]])
    assert pol.text_encoder_calls - calls == 4  # only the evicted prompt was encoded again
    torch.testing.assert_close(emb[0], ref[PROMPTS[1]])
    torch.testing.assert_close(emb[1], ref[PROMPTS[0]])
    pol.configure_text_cache(0)
    pol.encode_prompts([PROMPTS[0]])
    assert len(pol._prompt_cache) == 0


def test_encode_prompts_command_and_training_from_the_store(tmp_path, capsys):
    from datasets import load_from_disk

    from trl_video.cli import main
    from trl_video.models.policy import load_policy

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "emb"
    assert main(["encode-prompts", "--model", "tiny-wan-random", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out), "--dtype", "float32"]) == 0
    ds = load_from_disk(str(out))
    assert ds["prompt"] == ["", *PROMPTS]
    pol = load_policy("tiny-wan-random")
    emb, mask = pol._encode_text(PROMPTS)
    for i, row in enumerate(ds.select(range(1, 4)).with_format("torch")):
        n = int(mask[i].sum())
        assert row["n_tokens"] == n and row["embeds"].shape == (n, emb.shape[-1])  # padding is not stored
        torch.testing.assert_close(row["embeds"], emb[i, :n])
    # the same command again refuses to overwrite
    assert main(["encode-prompts", "--model", "tiny-wan-random", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    # training reads the store, never the text encoder, and sees the same embeddings
    tr = VideoRewardTrainer(small_config(tmp_path, prompts=str(tmp_path / "prompts.txt"), prompt_embeds=str(out),
                                         text_cache_size=1))
    calls = tr.policy.text_encoder_calls
    got, got_mask = tr.policy.encode_prompts(PROMPTS)
    torch.testing.assert_close(got, emb)
    assert torch.equal(got_mask, mask)
    tr.training_step()
    assert tr.policy.text_encoder_calls == calls and tr.policy.embedding_store.reads >= 3
    assert len(tr.policy._prompt_cache) <= 1


def test_prompt_embeds_of_another_model_are_refused(tmp_path):
    from trl_video.models.policy import encode_prompt_dataset, load_policy

    encode_prompt_dataset(load_policy("tiny-cogvideox-random"), PROMPTS[:1], tmp_path / "emb")
    with pytest.raises(TrlVideoError, match="prompt_embeds.*cogvideox"):
        VideoRewardTrainer(small_config(tmp_path, prompt_embeds=str(tmp_path / "emb")))


# ------------------------------------------------------------------------------------------------ metrics
def test_step_metrics_are_means_over_micro_batches(tmp_path):
    tr = VideoRewardTrainer(small_config(tmp_path, gradient_accumulation_steps=2))
    seen = record_losses(tr)
    m = tr.training_step()
    assert len(seen) == 2 and seen[0] != seen[1]
    assert m["loss/policy"] == pytest.approx(sum(seen) / 2, rel=1e-6)
    assert m["samples_per_second"] == pytest.approx(4 / m["seconds"])  # 2 micro-batches of 2 samples
    assert m["peak_memory_mb"] > 50  # peak RSS of the step (a torch process is far above 50 MiB)


def test_nfe_and_samples_generated_are_logged_cumulatively(tmp_path):
    from trl_video.evaluation import sample_videos

    tr = VideoRewardTrainer(small_config(tmp_path))
    calls: list[int] = []  # an independent count: every transformer call's batch rows
    tr.policy.transformer.register_forward_pre_hook(
        lambda mod, args, kw: calls.append(int(kw.get("hidden_states", args[0] if args else None).shape[0])),
        with_kwargs=True)
    m1 = tr.training_step()
    assert m1["nfe_sampler"] == 2 * 2 and m1["samples_generated"] == 2  # 2 samples x 2 ODE steps
    assert m1["nfe"] == sum(calls) >= m1["nfe_sampler"]
    sample_videos(tr.policy, ["a red ball"], [0], num_steps=3)  # between steps (an evaluation): not counted
    m2 = tr.training_step()
    assert m2["nfe_sampler"] == 8 and m2["samples_generated"] == 4
    assert m2["nfe"] == sum(calls) - 3 == 2 * m1["nfe"]


def test_auxiliary_trainables_forwards_are_logged_as_nfe_aux(tmp_path):
    """FCRM trains an auxiliary baseline net (`b_phi`): its forwards in training steps are counted in `nfe_aux`
    (batch rows, cumulative), checked against an independent hook; a method without one logs 0."""
    tr = VideoRewardTrainer(small_config(tmp_path, method="fcrm", sampler="ode", estimator="group", group_size=2,
                                         sampler_args={"num_steps": 2}))
    aux = tr.groups["b_phi"].module
    rows: list[int] = []
    aux.register_forward_pre_hook(lambda mod, args, kw: rows.append(
        int((kw or {}).get("hidden_states", args[0] if args else next(iter(kw.values()))).shape[0])), with_kwargs=True)
    m1 = tr.training_step()
    assert m1["nfe_aux"] == sum(rows) > 0
    m2 = tr.training_step()
    assert m2["nfe_aux"] == sum(rows) > m1["nfe_aux"]
    assert VideoRewardTrainer(small_config(tmp_path / "refl")).training_step()["nfe_aux"] == 0
