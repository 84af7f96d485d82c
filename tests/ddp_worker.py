"""Worker for tests/test_distributed.py, run under ``accelerate launch --multi_gpu --num_processes 2`` on CPU.

Trains ReFL on tiny-wan-random for 2 steps (prompts_per_step=2, group_size=2: global batch 4, 2 per rank;
estimator ``group`` so the trainer's gathered group statistics are exercised), then takes one more step with
a second trainer laid out as prompts_per_step=1, group_size=4, whose single group spans both ranks. Records,
per rank:

* ``rank{r}.safetensors``: initial and final trainable weights (``init/…``, ``final/…``), the local gradient
  of step 1 before the all-reduce (``local_grad``) and after it (``synced_grad``), both flattened in
  ``group_params`` order; the direct GroupAdvantage inputs/outputs (``direct/…``).
* ``rank{r}.json``: per step the prompts, group ids, rewards and advantages this rank saw (``steps`` for the
  2x2 run, ``span_steps`` for the 1x4 step); for one step with 2 micro-batches per rank, every loss value and
  reward this rank computed (``acc_losses``, ``acc_rewards``) and the metrics the trainer returned
  (``acc_metrics``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


class Recording:
    """Estimator wrapper recording inputs and outputs."""

    name = "recording"

    def __init__(self, inner, log: list[dict]):
        self.inner, self.log = inner, log

    def __call__(self, ctx, batch):
        res = self.inner(ctx, batch)
        self.log.append({"prompts": list(batch.prompts), "group_ids": batch.group_ids.tolist(),
                         "rewards": batch.rewards.detach().float().tolist(),
                         "advantages": res.advantages.detach().float().tolist()})
        return res


def main(outdir: str) -> None:
    from trainer_probes import record_losses  # tests/, the folder this script runs from

    from trl_video.components.estimators import GroupAdvantage
    from trl_video.config import VideoRewardConfig
    from trl_video.rollouts import Rollouts
    from trl_video.trainer import VideoRewardTrainer

    out = Path(outdir)
    cfg = VideoRewardConfig(model="tiny-wan-random", method="refl", reward="alignment", prompts="world:train",
                            estimator="group", sampler_args={"num_steps": 2, "grad_steps": 1}, prompts_per_step=2,
                            group_size=2, max_steps=2, use_peft=True, lora_r=4, learning_rate=1e-2,
                            report_to="none", save_model_at_end=False, save_steps=0, output_dir=str(out / "run"),
                            seed=5)
    trainer = VideoRewardTrainer(cfg)
    acc = trainer.accelerator
    rank = acc.process_index
    assert acc.num_processes == 2, acc.num_processes
    assert cfg.per_process_batch == 2

    tensors: dict[str, torch.Tensor] = {}
    for n, p in trainer.policy.transformer.named_parameters():
        if p.requires_grad:
            tensors[f"init/{n}"] = p.detach().clone().contiguous()

    # ---- record what the estimator sees and returns
    steps: list[dict] = []
    trainer.estimator = Recording(trainer.estimator, steps)

    # ---- capture the gradient before / after the all-reduce of the first optimiser step
    sync = trainer._sync_gradients
    captured: dict[str, torch.Tensor] = {}

    def flat_grads(params) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params])

    def recording_sync(params):
        first = "local_grad" not in captured
        if first:
            captured["local_grad"] = flat_grads(params).clone()
        sync(params)
        if first:
            captured["synced_grad"] = flat_grads(params).clone()

    trainer._sync_gradients = recording_sync
    trainer.train()
    trainer._sync_gradients = sync
    tensors.update(captured)
    for n, p in trainer.policy.transformer.named_parameters():
        if p.requires_grad:
            tensors[f"final/{n}"] = p.detach().clone().contiguous()

    # ---- a second layout: one prompt, G = 4, so the group is split over the two ranks
    cfg2 = VideoRewardConfig(**{**cfg.to_dict(), "prompts_per_step": 1, "group_size": 4,
                                "output_dir": str(out / "run_span")})
    trainer2 = VideoRewardTrainer(cfg2, policy=trainer.policy)
    span_steps: list[dict] = []
    trainer2.estimator = Recording(trainer2.estimator, span_steps)
    trainer2.training_step()

    # ---- logged metrics: 2 micro-batches per rank; record every loss value each rank computes
    cfg3 = VideoRewardConfig(**{**cfg.to_dict(), "gradient_accumulation_steps": 2, "output_dir": str(out / "run_acc")})
    trainer3 = VideoRewardTrainer(cfg3, policy=trainer.policy)
    losses = record_losses(trainer3)
    rewards: list[float] = []
    score = trainer3.ctx.score

    def recording_score(*args, **kwargs):
        r = score(*args, **kwargs)
        rewards.extend(r.detach().float().tolist())
        return r

    trainer3.ctx.score = recording_score
    logged = trainer3.training_step()

    # ---- GroupAdvantage directly, with groups that span the two ranks
    g = torch.Generator().manual_seed(100 + rank)
    r = torch.randn(4, generator=g)
    gids = torch.tensor([[0, 1, 0, 2], [1, 0, 2, 1]][rank])
    lat = torch.zeros(4, 1, 1, 1, 1)
    batch = Rollouts(latents=lat, prompts=["p"] * 4, rewards=r, group_ids=gids, source="online")
    adv = GroupAdvantage(eps=1e-4)(trainer.ctx, batch).advantages
    adv_b = GroupAdvantage(std="batch", eps=1e-4)(trainer.ctx, batch).advantages
    tensors.update({"direct/rewards": r, "direct/group_ids": gids, "direct/adv": adv.contiguous(),
                    "direct/adv_batch": adv_b.contiguous()})

    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": acc.num_processes, "steps": steps, "span_steps": span_steps,
                                                      "acc_losses": losses, "acc_rewards": rewards,
                                                      "acc_metrics": logged,
                                                      "global_step": trainer.global_step}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
