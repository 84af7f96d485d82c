"""Worker for tests/test_fsdp.py: the same short trainings sharded with FSDP2 over 2 CPU processes (``torchrun
--nproc_per_node 2`` with ``ACCELERATE_USE_CPU=true``: accelerate owns the gloo process group, the trainer applies
``fully_shard``) and unsharded in 1 process at the same global batch.

Usage: ``fsdp_worker.py OUTDIR SCENARIO[,SCENARIO...]``; a name ending in ``-ddp`` runs the scenario unsharded
on the same processes (the trainer's all-reduce path). Scenarios:

* ``refl``: ReFL on a LoRA of tiny-wan-random with a KL anchor (policy + reference = the same sharded transformer
  with the adapter disabled, several forwards per backward), gradient checkpointing and a policy EMA (diffusers
  EMAModel over the sharded parameters); 2 steps, checkpoint at step 1, LoRA export at the end. With 2 processes
  the worker also resumes a copy of the run from checkpoint-1 and finishes it (``refl-resumed``).
* ``dmd``: DM-Align (DMD, full fine-tuning) on tiny-cogvideox-random: the generator, its frozen reference copy and
  the trainable fake score are all sharded; 2 steps of 1 generator + 2 fake updates.
* ``fcrm``: FCRM (double estimator: two noising batches per backward) with an EMA behaviour sampler and the
  replicated b_phi auxiliary trainable; 2 steps. FCRM draws its timesteps and noise from ``ctx.generator``
  directly, per rank, so its reference is the same 2 processes unsharded (``fcrm-ddp``), not 1 process.

Sampling noise is made a function of the *global* sample index (each rank draws the global batch's noise from a
shared-seed generator and keeps its slice), so the 2-process and 1-process runs see the same samples; the
generator is the trainer's own ``ctx.generator``, so checkpoints save and restore it.

Per scenario it writes ``SCENARIO/rank{r}.json`` (how many elements of each module this rank holds) and, from
rank 0, ``SCENARIO/grads.safetensors``: the full (gathered) gradient of every trainable group at every optimiser
step, as the optimiser sees it (after the reduce-scatter / all-reduce and clipping).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SCENARIOS = {
    "refl": dict(model="tiny-wan-random", method="refl", reward="alignment", method_args={"kl_weight": 0.1},
                 sampler_args={"num_steps": 2, "grad_steps": 2}, use_peft=True, lora_r=4, ema_decay=0.9,
                 gradient_checkpointing=True, learning_rate=1e-2, max_steps=2, save_steps=1, prompts_per_step=2, group_size=1),
    "dmd": dict(model="tiny-cogvideox-random", method="dmalign", reward="alignment",
                method_args={"align": "none", "align_weight": 0.0, "fake_updates": 2, "fake_lr": 1e-3},
                sampler_args={"num_steps": 2, "grad": False}, use_peft=False, learning_rate=1e-3, max_steps=2,
                save_steps=0, prompts_per_step=2, group_size=1),
    "fcrm": dict(model="tiny-wan-random", method="fcrm", reward="alignment", sampler="ode",
                 sampler_args={"num_steps": 2, "behaviour": "ema"}, ema_decay=0.9, estimator="group",
                 method_args={"estimator": "double", "b_phi_lr": 1e-2, "b_phi_hidden": 16}, use_peft=True,
                 lora_r=4, learning_rate=1e-2, max_steps=2, save_steps=0, prompts_per_step=1, group_size=2),
}


def global_noise(trainer, seed: int) -> None:
    """Noise as a function of the global sample index (see the module docstring)."""
    ctx = trainer.ctx
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    ctx.generator = torch.Generator().manual_seed(seed)

    def draw(fn, *shape: int) -> torch.Tensor:
        n = shape[0]
        full = fn(n * world, *shape[1:], generator=ctx.generator)
        return full[rank * n:(rank + 1) * n].to(ctx.device)

    ctx.randn = lambda *shape: draw(torch.randn, *shape)  # type: ignore[method-assign]
    ctx.rand = lambda *shape: draw(torch.rand, *shape)  # type: ignore[method-assign]


def make_trainer(name: str, out: Path, fsdp: bool, resume: bool = False):
    from trl_video.config import VideoRewardConfig
    from trl_video.trainer import VideoRewardTrainer

    cfg = VideoRewardConfig(**SCENARIOS[name], prompts="world:train", report_to="none", save_model_at_end=True, adam_epsilon=1e-6, output_dir=str(out), seed=3,
                            fsdp=fsdp)
    trainer = VideoRewardTrainer(cfg, resume=resume)
    global_noise(trainer, 1234)
    return trainer


def record_grads(trainer, grads: dict[str, torch.Tensor]) -> None:
    """Optimiser pre-step hooks saving the full gradient of each group (gathering DTensors: all ranks run it)."""
    from trl_video.sharding import to_full

    for name, opt in trainer.optimizers.items():
        calls = [0]

        def hook(opt, args, kwargs, name=name, calls=calls):
            params = [p for g in opt.param_groups for p in g["params"]]
            flat = torch.cat([to_full(p.grad).flatten() if p.grad is not None else torch.zeros(p.numel())
                              for p in params])
            grads[f"{name}/{calls[0]}"] = flat.detach().cpu().clone()
            calls[0] += 1

        opt.register_step_pre_hook(hook)


def held(trainer) -> dict[str, dict[str, int]]:
    """Elements this rank holds / the full size, per sharded module."""
    from trl_video.sharding import local_numel

    mods = {"policy": trainer.policy.transformer, **{n: g.module for n, g in trainer.groups.items() if n != "policy"}}
    ref = getattr(trainer.policy, "_frozen_reference", None)
    if ref is not None:
        mods["reference"] = ref
    return {n: {"local": sum(local_numel(p) for p in m.parameters()), "full": sum(p.numel() for p in m.parameters()),
                "trainable_local": sum(local_numel(p) for p in m.parameters() if p.requires_grad)}
            for n, m in mods.items()}


def main(outdir: str, scenarios: str) -> None:
    out = Path(outdir)
    for run in scenarios.split(","):
        name = run.removesuffix("-ddp")
        trainer = make_trainer(name, out / run, fsdp=not run.endswith("-ddp"))
        acc = trainer.accelerator
        fsdp = acc.num_processes > 1 and not run.endswith("-ddp")
        assert (trainer.sharding is not None) == fsdp
        rank = acc.process_index
        info = {"rank": rank, "world": acc.num_processes, "held": held(trainer),
                "sharding": trainer.sharding.describe() if trainer.sharding else ""}
        grads: dict[str, torch.Tensor] = {}
        record_grads(trainer, grads)
        trainer.train()
        (out / run / f"rank{rank}.json").write_text(json.dumps(info))
        if acc.is_main_process:
            save_file(grads, str(out / run / "grads.safetensors"))
        if fsdp and name == "refl":
            # resume a copy of the run from its step-1 checkpoint and finish it
            resumed = out / "refl-resumed"
            if acc.is_main_process:
                shutil.copytree(out / run, resumed, ignore=shutil.ignore_patterns("checkpoint-2", "model",
                                                                                  "metrics.jsonl"))
            acc.wait_for_everyone()
            again = make_trainer(name, resumed, fsdp, resume=True)
            assert again.resume_from is not None and again.resume_from.name == "checkpoint-1"
            again.train()
        acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
