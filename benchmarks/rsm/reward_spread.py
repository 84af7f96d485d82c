"""Where a GRPO group's reward spread comes from on the CPU world (why the tiny recipes share a group's noise).

Samples G members of each of P held-out prompts with the Flow-GRPO SDE (a = 0.7) or DanceGRPO's (eta = 0.3) and
reports the within-group reward standard deviation when the members differ (a) only by their initial noise (ODE),
(b) only by the SDE steps (one initial noise per group, ``same_noise``), (c) by both (the papers' Flow-GRPO
sampling). A zeroth-order GRPO gradient credits the SDE steps only: the share of (c)'s variance that (a) explains
is advantage noise.

    trl-video bench rsm.spread        # ~1 min
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trl_video.components.base import TrainContext
from trl_video.components.rewards import AlignmentReward
from trl_video.components.samplers import SDESampler
from trl_video.config import VideoRewardConfig
from trl_video.evaluation import eval_pairs
from trl_video.models.policy import load_policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/rsm/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from accelerate import Accelerator

    policy = load_policy("tiny-wan")
    reward = AlignmentReward()
    prompts_u, _ = eval_pairs("world:heldout", a.prompts, seed=a.seed)
    prompts = [p for p in prompts_u for _ in range(a.group_size)]
    gids = torch.arange(a.prompts).repeat_interleave(a.group_size)
    emb = policy.encode_prompts(prompts)[0]
    cfg = VideoRewardConfig(model="tiny-wan", report_to="none", save_model_at_end=False, seed=a.seed)
    rows = []
    for sde_type, eta, steps in (("flow_grpo", 0.7, 6), ("dance_grpo", 0.3, 8)):
        for label, kw in (("initial noise only (ODE)", {"eta": 0.0}), ("SDE only (same_noise)", {"same_noise": True}),
                          ("both (independent noise + SDE)", {})):
            ctx = TrainContext(policy=policy, config=cfg, accelerator=Accelerator(), reward=reward,
                               method_config=None, generator=torch.Generator().manual_seed(1000 + a.seed))
            sampler = SDESampler(num_steps=steps, sde_type=sde_type, **{"eta": eta, **kw})
            with torch.no_grad():
                out = sampler.sample(ctx, prompts, emb, gids)
                r = reward(policy.decode(out.latents), prompts).view(a.prompts, a.group_size)
            var = float(r.var(1).mean())
            rows.append({"sde_type": sde_type, "eta": eta, "num_steps": steps, "spread": label,
                         "within_group_std": var**0.5, "within_group_var": var, "mean_reward": float(r.mean())})
            print(f"{sde_type:<10} {label:<32} within-group reward std {var**0.5:.3f}  mean {float(r.mean()):.3f}",
                  flush=True)
    lines = ["| SDE | members differ by | within-group reward std | variance / the 'both' variance | mean reward |",
             "|---|---|---|---|---|"]
    for r in rows:
        both = next(x for x in rows if x["sde_type"] == r["sde_type"] and x["spread"].startswith("both"))
        lines.append(f"| {r['sde_type']} (eta {r['eta']}, {r['num_steps']} steps) | {r['spread']} | "
                     f"{r['within_group_std']:.3f} | {r['within_group_var'] / both['within_group_var']:.2f} | "
                     f"{r['mean_reward']:.3f} |")
    table = "\n".join(lines) + (f"\n\n{a.prompts} held-out prompts x G = {a.group_size}, base tiny-wan, "
                                "alignment reward; variance = mean over prompts of the within-group variance.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_spread.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    (out / "reward_spread.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
