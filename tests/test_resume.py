"""Acceptance: an interrupted-and-resumed run is bit-identical to a straight run (CPU), checkpoints are
written atomically and rotated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_video.callbacks import StopAfterStep
from trl_video.config import VideoRewardConfig
from trl_video.errors import TrlVideoError
from trl_video.trainer import VideoRewardTrainer, find_checkpoints

MAX_STEPS = 4


def config(out: Path, **kw) -> VideoRewardConfig:
    base = dict(model="tiny-wan-random", method="refl", reward="alignment", prompts="world:train",
                sampler_args={"num_steps": 2, "grad_steps": 1}, prompts_per_step=1, group_size=2,
                max_steps=MAX_STEPS, save_steps=2, use_peft=True, lora_r=4, ema_decay=0.9, learning_rate=1e-2,
                report_to="none", save_model_at_end=False, output_dir=str(out), seed=3)
    base.update(kw)
    return VideoRewardConfig(**base)


def trainable(tr: VideoRewardTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}


def ema_params(tr: VideoRewardTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.ctx.ema["policy"].shadow_params]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_tmp_dirs(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # straight run, keeping only the last checkpoint
    a_dir = root / "straight"
    a = VideoRewardTrainer(config(a_dir, save_total_limit=1))
    a.train()
    assert a.global_step == MAX_STEPS
    # interrupted after 2 steps ...
    b_dir = root / "resumed"
    b1 = VideoRewardTrainer(config(b_dir), callbacks=[StopAfterStep(2)])
    init = {n: p for n, p in trainable(b1).items()}
    b1.train()
    assert b1.global_step == 2
    mid = trainable(b1)
    del b1
    # ... and continued by a new trainer
    b2 = VideoRewardTrainer(config(b_dir), resume=True)
    assert b2.resume_from is not None and b2.resume_from.name == "checkpoint-2"
    b2.train()
    return dict(a=a, b2=b2, a_dir=a_dir, b_dir=b_dir, init=init, mid=mid)


def test_resume_is_bit_identical(runs):
    a, b2 = runs["a"], runs["b2"]
    assert b2.global_step == MAX_STEPS
    wa, wb = trainable(a), trainable(b2)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all("lora" in n for n in wa)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    ea, eb = ema_params(a), ema_params(b2)
    assert len(ea) == len(wa)
    for x, y in zip(ea, eb):
        assert torch.equal(x, y)
    assert a.ctx.ema["policy"].optimization_step == b2.ctx.ema["policy"].optimization_step == MAX_STEPS
    # optimiser state too
    sa, sb = a.optimizers["policy"].state_dict()["state"], b2.optimizers["policy"].state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    # the logged rewards of steps 3..4 agree (same prompts, same noise)
    ra = {r["step"]: r["reward_mean"] for r in metrics_rows(runs["a_dir"])}
    rb = {r["step"]: r["reward_mean"] for r in metrics_rows(runs["b_dir"])}
    assert [ra[s] for s in (3, 4)] == [rb[s] for s in (3, 4)]
    assert sorted(rb) == [1, 2, 3, 4]


def test_training_actually_moves_the_weights(runs):
    """Guards the identity check against a vacuous pass: every phase changed the weights, and the EMA
    differs from the weights."""
    init, mid, final = runs["init"], runs["mid"], trainable(runs["b2"])
    lora_b = [n for n in init if "lora_B" in n]
    assert lora_b and all(not torch.equal(init[n], mid[n]) for n in lora_b)
    assert all(not torch.equal(mid[n], final[n]) for n in lora_b)
    ema = ema_params(runs["b2"])
    assert any(not torch.equal(e, w) for e, w in zip(ema, final.values()))


def test_checkpoint_contents_match(runs):
    ta = load_file(str(runs["a_dir"] / "checkpoint-4" / "trainable.safetensors"))
    tb = load_file(str(runs["b_dir"] / "checkpoint-4" / "trainable.safetensors"))
    assert ta.keys() == tb.keys() and all(k.startswith("policy/") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    final = trainable(runs["a"])
    for n, w in final.items():
        assert torch.equal(ta[f"policy/{n}"], w)
    state = json.loads((runs["b_dir"] / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    for name in ("optimizers.pt", "ema.pt", "components.pt", "rng-0.pt"):
        assert (runs["b_dir"] / "checkpoint-4" / name).exists()


def test_atomic_and_rotation(runs):
    a_dir, b_dir = runs["a_dir"], runs["b_dir"]
    assert no_tmp_dirs(a_dir) == [] and no_tmp_dirs(b_dir) == []
    # save_total_limit=1: only the last checkpoint of the straight run remains
    assert [p.name for p in find_checkpoints(a_dir)] == ["checkpoint-4"]
    assert sorted(p.name for p in a_dir.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    # default limit 2: checkpoints 2 and 4
    assert [p.name for p in find_checkpoints(b_dir)] == ["checkpoint-2", "checkpoint-4"]


def test_crash_during_save_leaves_previous_checkpoint(runs, monkeypatch):
    """A failure while writing a checkpoint must not produce a (partial) checkpoint-N."""
    tr, out = runs["a"], runs["a_dir"]
    tr.global_step = 6

    def boom():
        raise RuntimeError("disk full")

    monkeypatch.setattr(tr, "_component_states", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tr.save_checkpoint()
    assert not (out / "checkpoint-6").exists()
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-4"]
    monkeypatch.undo()
    # the next save cleans the stale temporary folder and lands atomically
    tr.save_checkpoint()
    assert (out / "checkpoint-6" / "trainer_state.json").exists()
    assert no_tmp_dirs(out) == []
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-6"]
    tr.global_step = MAX_STEPS


def test_refuses_existing_output_without_resume(runs):
    with pytest.raises(TrlVideoError, match="resume"):
        VideoRewardTrainer(config(runs["b_dir"]), policy=runs["b2"].policy)


def test_accepted_changes_replace_the_restored_hyperparameters(runs, tmp_path):
    """An accepted change reaches the restored optimiser, scheduler and EMA (they would otherwise keep the
    checkpoint's values); the AdamW moments and the EMA weights stay the checkpoint's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["b_dir"], run)
    tr = VideoRewardTrainer(config(run, max_steps=6, learning_rate=0.02, weight_decay=0.1, adam_epsilon=1e-6,
                                   lr_scheduler_type="linear", warmup_steps=1, ema_decay=0.5),
                            resume=True, accept_recipe_changes=True)
    tr._prepare_resume(tr.resume_from)
    tr.load_checkpoint(tr.resume_from, verified=True)
    assert tr.global_step == MAX_STEPS
    group, sch = tr.optimizers["policy"].param_groups[0], tr.schedulers["policy"]
    # transformers' linear schedule at step 4 of 6 with 1 warm-up step: (6 - 4) / (6 - 1)
    lr = 0.02 * (6 - MAX_STEPS) / (6 - 1)
    assert group["initial_lr"] == 0.02 and sch.base_lrs == [0.02]
    assert group["lr"] == pytest.approx(lr) and sch.get_last_lr() == [group["lr"]]
    assert group["weight_decay"] == 0.1 and group["eps"] == 1e-6 and sch.last_epoch == MAX_STEPS
    ema = tr.ctx.ema["policy"]
    assert ema.decay == 0.5 and ema.optimization_step == MAX_STEPS
    for x, y in zip(ema.shadow_params, ema_params(runs["b2"])):
        assert torch.equal(x, y)
    sa, sb = tr.optimizers["policy"].state_dict()["state"], runs["b2"].optimizers["policy"].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
