"""RSM presets on the CPU world, side by side: flow-grpo, dance-grpo, tempflow-grpo and the zeroth-order
redesign rsm-zo (fair clipping, branching reallocated to early steps, short lookahead), several seeds.

The trainers of one seed run interleaved, one training step each in turn, so the wall-clock columns share the
machine's load. Compute is counted by a forward pre-hook on the transformer: sampler NFE (rollouts, including
the loss-side branches of rsm-zo) and loss NFE (training forwards, reference forwards for the KL), in
samples x network calls. Every `--eval-every` steps the policy is scored on held-out (prompt, seed) pairs with
the 10-step ODE; at the end the trained policy is evaluated against the base with `trl_video.evaluation.evaluate`
(the code of `trl-video eval`: paired before/after on world:heldout).

    OMP_NUM_THREADS=1 nice python benchmarks/rsm/grpo_cpu.py --seeds 0 1 2 --steps 16 --out benchmarks/rsm/results
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from trl_video.config import config_from_dict
from trl_video.evaluation import eval_pairs, evaluate, sample_videos
from trl_video.models.policy import load_policy
from trl_video.trainer import VideoRewardTrainer

RECIPES = {"flow-grpo": "recipes/tiny/flow_grpo.yaml", "dance-grpo": "recipes/tiny/dance_grpo.yaml",
           "tempflow-grpo": "recipes/tiny/tempflow_grpo.yaml", "rsm-zo": "recipes/tiny/rsm_zo.yaml",
           "rsm-rsd": "recipes/tiny/rsm_rsd.yaml"}


class NFECounter:
    """Counts transformer calls x batch size, split by what is running (sampler | loss)."""

    def __init__(self) -> None:
        self.counts = {"sampler": 0, "loss": 0, "eval": 0}
        self.phase = "eval"  # outside the wrapped sampler / loss calls: evaluation

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.counts[self.phase] += int(x.shape[0]) if x is not None else 1

    @contextlib.contextmanager
    def during(self, phase: str):
        prev, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = prev


def instrument(trainer: VideoRewardTrainer, counter: NFECounter) -> None:
    trainer.policy.transformer.register_forward_pre_hook(counter.hook, with_kwargs=True)
    fresh, compute = trainer._fresh_rollouts, trainer.loss.compute

    def fresh_counted():
        with counter.during("sampler"):
            return fresh()

    def compute_counted(ctx, phase, batch):
        with counter.during("loss"):
            return compute(ctx, phase, batch)

    trainer._fresh_rollouts = fresh_counted
    trainer.loss.compute = compute_counted
    if hasattr(trainer.loss, "branch_chunks"):  # loss-side branches are rollouts
        branch = trainer.loss.branch_chunks

        def branch_counted(ctx, batch):
            with counter.during("sampler"):
                return branch(ctx, batch)

        trainer.loss.branch_chunks = branch_counted


@torch.no_grad()
def quick_eval(policy: Any, reward: Any, prompts: list[str], seeds: list[int], steps: int) -> float:
    lat = sample_videos(policy, prompts, seeds, steps)
    return float(reward(policy.decode(lat), prompts).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["flow-grpo", "dance-grpo", "tempflow-grpo", "rsm-zo"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--final-eval-prompts", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="override a recipe key of one method, e.g. rsm-zo:learning_rate=3e-3")
    ap.add_argument("--out", default="benchmarks/rsm/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base_recipes = {m: yaml.safe_load(Path(RECIPES[m]).read_text()) for m in a.methods}
    for item in a.set:
        m, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        base_recipes[m][k] = yaml.safe_load(v)
    base = load_policy(base_recipes[a.methods[0]]["model"])
    eval_p, eval_s = eval_pairs("world:heldout", a.eval_prompts, seed=4321)
    runs: list[dict[str, Any]] = []
    for seed in a.seeds:
        trainers, counters, rows = {}, {}, {}
        for m in a.methods:
            rec = dict(base_recipes[m], seed=seed, max_steps=a.steps, report_to="none", save_model_at_end=False,
                       eval_at_end=False, output_dir=str(out / "runs" / f"{m}-s{seed}"))
            trainer = VideoRewardTrainer(config_from_dict(rec), policy=copy.deepcopy(base))
            counters[m] = NFECounter()
            instrument(trainer, counters[m])
            trainers[m] = trainer
            rows[m] = {"method": m, "seed": seed, "curve": [], "seconds": 0.0}
        for step in range(a.steps + 1):
            for m, trainer in trainers.items():
                if step % a.eval_every == 0 or step == a.steps:
                    r = quick_eval(trainer.policy, trainer.reward, eval_p, eval_s, 10)
                    rows[m]["curve"].append({"step": step, "heldout_reward": r, "seconds": rows[m]["seconds"],
                                             "sampler_nfe": counters[m].counts["sampler"],
                                             "loss_nfe": counters[m].counts["loss"]})
                    print(f"seed {seed} {m:<14} step {step:>3}  held-out reward {r:.4f}  "
                          f"sampler NFE {counters[m].counts['sampler']:>6}  {rows[m]['seconds']:7.1f} s", flush=True)
                if step == a.steps:
                    continue
                trainer.ctx.step = trainer.global_step
                t0 = time.perf_counter()
                met = trainer.training_step()
                rows[m]["seconds"] += time.perf_counter() - t0
                trainer.global_step += 1
                rows[m].setdefault("train_reward", []).append(met.get("reward_mean"))
        for m, trainer in trainers.items():
            fp, fs = eval_pairs("world:heldout", a.final_eval_prompts, seed=1234)
            with torch.no_grad():
                res = evaluate(trainer.policy, fp, fs, {trainer.config.reward: trainer.reward},
                               out / "runs" / f"{m}-s{seed}" / "eval", num_steps=10)
            rows[m].update({"final": {k: res[k] for k in ("reward_before", "reward_after", "gain", "gain_sem")},
                            "sampler_nfe": counters[m].counts["sampler"], "loss_nfe": counters[m].counts["loss"]})
            runs.append(rows[m])
            print(f"seed {seed} {m:<14} final (trl-video eval, {a.final_eval_prompts} held-out pairs): "
                  f"{res['reward_before']:.4f} -> {res['reward_after']:.4f} (gain {res['gain']:+.4f} +- "
                  f"{res['gain_sem']:.4f}); sampler NFE {counters[m].counts['sampler']}, "
                  f"{rows[m]['seconds']:.0f} s", flush=True)
        (out / "grpo_cpu.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    summary = summarise(runs, a.methods)
    (out / "grpo_cpu.md").write_text(summary + "\n")
    print(summary)
    return 0


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> str:
    lines = ["| method | seeds | held-out reward before -> after (mean over seeds) | gain +- s.d. over seeds | "
             "sampler NFE | loss NFE | train seconds |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        gains = [r["final"]["gain"] for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(f"| `{m}` | {len(rs)} | {statistics.mean(r['final']['reward_before'] for r in rs):.4f} -> "
                     f"{statistics.mean(r['final']['reward_after'] for r in rs):.4f} | {statistics.mean(gains):+.4f} "
                     f"+- {sd:.4f} | {statistics.mean(r['sampler_nfe'] for r in rs):.0f} | "
                     f"{statistics.mean(r['loss_nfe'] for r in rs):.0f} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    # compute to reach the tempflow-grpo final reward (held-out quick eval, mean over seeds per eval point)
    if "tempflow-grpo" in methods:
        def curve(m: str) -> list[tuple[float, float, float]]:
            rs = [r for r in runs if r["method"] == m]
            n = min(len(r["curve"]) for r in rs)
            return [(statistics.mean(r["curve"][k]["heldout_reward"] for r in rs),
                     statistics.mean(r["curve"][k]["sampler_nfe"] for r in rs),
                     statistics.mean(r["curve"][k]["seconds"] for r in rs)) for k in range(n)]
        target = curve("tempflow-grpo")[-1]
        lines.append(f"\nTarget: tempflow-grpo's final held-out reward {target[0]:.4f} at sampler NFE {target[1]:.0f}, "
                     f"{target[2]:.0f} s (mean over seeds).")
        for m in methods:
            hit = next((c for c in curve(m)[1:] if c[0] >= target[0]), None)  # after training started
            lines.append(f"- `{m}`: " + (f"reaches it at sampler NFE {hit[1]:.0f} ({hit[1] / target[1]:.2f}x), "
                                         f"{hit[2]:.0f} s ({hit[2] / max(target[2], 1e-9):.2f}x)" if hit else
                                         "does not reach it within the run"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
