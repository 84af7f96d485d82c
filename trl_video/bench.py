"""Benchmarks (not timed tests): each prints both sides of a ratio measured in one run."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def _manual_refl_step(policy, opt, reward, prompts, gen, num_steps: int, grad_steps: int, max_norm: float) -> float:
    """A minimal hand-written ReFL step: no trainer, no hooks, no logging."""
    sch = policy.schedule
    grid = sch.timesteps(num_steps)
    emb, _ = policy.encode_prompts(prompts)
    x = torch.randn(len(prompts), *policy.latent_shape, generator=gen)
    for i in range(num_steps):
        with torch.set_grad_enabled(i >= num_steps - grad_steps):
            t = grid[i].expand(len(prompts))
            v = policy.predict(x, t, emb)
            x, _ = sch.ddim_step(sch.to_x0(v, x, t), sch.to_eps(v, x, t), grid[i], grid[i + 1])
    loss = -reward(policy.decode(x), prompts).mean()
    loss.backward()
    params = policy.trainable_parameters()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def bench_overhead(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench overhead",
                                 description="Trainer step vs a hand-written PyTorch ReFL step (same work).")
    ap.add_argument("--model", default="tiny-wan")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--num-steps", type=int, default=8, help="sampling steps")
    ap.add_argument("--grad-steps", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)

    import tempfile

    from .components.rewards import AlignmentReward
    from .config import VideoRewardConfig
    from .models.policy import load_policy
    from .trainer import VideoRewardTrainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_policy(a.model)
    out = tempfile.mkdtemp(prefix="trl-video-bench-")
    cfg = VideoRewardConfig(model=a.model, method="refl", reward="alignment", prompts="world:train",
                            prompts_per_step=a.batch, group_size=1, max_steps=10**6, output_dir=out,
                            report_to="none", sampler_args={"num_steps": a.num_steps, "grad_steps": a.grad_steps},
                            logging_steps=10**6)
    trainer = VideoRewardTrainer(cfg, policy=copy.deepcopy(base))
    manual = copy.deepcopy(base)
    torch.manual_seed(0)
    manual.add_adapter(cfg.peft_config())
    opt = torch.optim.AdamW(manual.trainable_parameters(), lr=cfg.learning_rate)
    reward = AlignmentReward()
    prompts_all = trainer.prompt_sampler.prompts
    gen = torch.Generator().manual_seed(0)

    def run_trainer() -> float:
        t0 = time.perf_counter()
        trainer.training_step()
        trainer.global_step += 1
        return time.perf_counter() - t0

    def run_manual() -> float:
        idx = torch.randint(len(prompts_all), (a.batch,), generator=gen).tolist()
        t0 = time.perf_counter()
        _manual_refl_step(manual, opt, reward, [prompts_all[i] for i in idx], gen, a.num_steps, a.grad_steps,
                          cfg.max_grad_norm)
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        run_trainer()
        run_manual()
    t_tr, t_man = [], []
    for i in range(a.steps):  # interleaved so machine-load drift hits both sides alike
        if i % 2:
            t_tr.append(run_trainer())
            t_man.append(run_manual())
        else:
            t_man.append(run_manual())
            t_tr.append(run_trainer())
    med_tr, med_man = statistics.median(t_tr), statistics.median(t_man)
    res = {"model": a.model, "batch": a.batch, "sampling_steps": a.num_steps, "grad_steps": a.grad_steps,
           "timed_steps": a.steps, "trainer_step_s": med_tr, "manual_step_s": med_man, "ratio": med_tr / med_man,
           "target": 1.03}
    print(f"ReFL step ({a.model}, batch {a.batch}, {a.num_steps} sampling steps, {a.grad_steps} with grad), "
          f"median of {a.steps}:")
    print(f"  trainer      {med_tr * 1000:8.1f} ms")
    print(f"  hand-written {med_man * 1000:8.1f} ms")
    print(f"  ratio        {res['ratio']:8.3f}  (target <= 1.03)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
