"""RSM presets on the CPU world, side by side: flow-grpo, dance-grpo, tempflow-grpo and the zeroth-order
redesign rsm-zo (fair clipping, branching reallocated to early steps, short lookahead), several seeds.

The trainers of one seed run interleaved, one training step each in turn, so the wall-clock columns share the
machine's load. Compute is counted by a forward pre-hook on the transformer: sampler NFE (rollouts, including
the loss-side branches of rsm-zo) and loss NFE (training forwards, reference forwards for the KL), in
samples x network calls. Every `--eval-every` steps the policy is scored on held-out (prompt, seed) pairs with
the 10-step ODE; at the end the trained policy is evaluated against the base with `trl_video.evaluation.evaluate`
(the code of `trl-video eval`: paired before/after on world:heldout).

    OMP_NUM_THREADS=1 trl-video bench rsm.grpo --seeds 0 1 2 3 4 --steps 16 --eval-every 4

Seeds are independent, so on a crowded machine each seed can run as its own process (``--seeds 0 --out DIR0``
...) and ``--from-json DIR0/grpo_cpu.json DIR1/grpo_cpu.json ...`` writes the same tables and plot; within a
seed the methods stay interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from trl_video.config import config_from_dict
from trl_video.errors import TrlVideoError
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


class ScoreTimer:
    """Seconds spent scoring samples during training (``ctx.score``: VAE decode + reward model), and the decode
    part of it, so wall-clock can also be read without the reward computation (the RSM paper reports its
    zeroth-order wall-clock "excluding GenEval reward computation", App. F)."""

    def __init__(self) -> None:
        self.score_s = 0.0
        self.decode_s = 0.0
        self._inside = False

    def wrap(self, trainer: VideoRewardTrainer) -> None:
        score, decode = trainer.ctx.score, trainer.policy.decode

        def timed_score(*args: Any, **kwargs: Any):
            t0, self._inside = time.perf_counter(), True
            try:
                return score(*args, **kwargs)
            finally:
                self._inside = False
                self.score_s += time.perf_counter() - t0

        def timed_decode(*args: Any, **kwargs: Any):
            if not self._inside:
                return decode(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                self.decode_s += time.perf_counter() - t0

        trainer.ctx.score = timed_score  # type: ignore[method-assign]
        trainer.policy.decode = timed_decode  # type: ignore[method-assign]


def instrument(trainer: VideoRewardTrainer, counter: NFECounter, timer: ScoreTimer | None = None) -> None:
    trainer.policy.transformer.register_forward_pre_hook(counter.hook, with_kwargs=True)
    if timer is not None:
        timer.wrap(trainer)
    fresh, compute = trainer._fresh_rollouts, trainer.loss.compute

    def fresh_counted(*args: Any, **kwargs: Any):
        with counter.during("sampler"):
            return fresh(*args, **kwargs)

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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--final-eval-prompts", type=int, default=96)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="override a recipe key of one method, e.g. rsm-zo:learning_rate=3e-3")
    ap.add_argument("--out", default="benchmarks/rsm/results", help="grpo_cpu.json / .md / .png go here")
    ap.add_argument("--runs-dir", default="out/bench/rsm_grpo", help="per-run eval grids and GIFs (not committed)")
    ap.add_argument("--from-json", nargs="+", metavar="PATH",
                    help="only summarise finished runs (e.g. one file per seed run as separate processes) into --out")
    a = ap.parse_args(argv)
    if a.from_json:
        saved = [json.loads(Path(p).read_text()) for p in a.from_json]
        runs = [r for d in saved for r in d["runs"]]
        methods = list(dict.fromkeys(r["method"] for r in runs))
        return write_results(Path(a.out), {"args": [d["args"] for d in saved], "runs": runs}, methods)
    # a label 'preset#variant' runs the preset's recipe under its own name (ablations: --set 'flow-grpo#g8:...')
    unknown = [m for m in a.methods if m.split("#")[0] not in RECIPES]
    if unknown:
        raise TrlVideoError(f"--methods {unknown}: known presets {list(RECIPES)} (a variant is 'PRESET#label')")
    base_recipes = {m: yaml.safe_load(Path(RECIPES[m.split("#")[0]]).read_text()) for m in a.methods}
    for item in a.set:
        m, _, kv = item.partition(":")
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise TrlVideoError(f"--set '{item}': expected METHOD:KEY=VALUE")
        if m not in base_recipes:
            raise TrlVideoError(f"--set '{item}': method '{m}' is not in --methods {a.methods}")
        base_recipes[m][k] = yaml.safe_load(v)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_policy(base_recipes[a.methods[0]]["model"])
    eval_p, eval_s = eval_pairs("world:heldout", a.eval_prompts, seed=4321)
    runs: list[dict[str, Any]] = []
    for seed in a.seeds:
        trainers, counters, timers, rows = {}, {}, {}, {}
        for m in a.methods:
            rec = dict(base_recipes[m], seed=seed, max_steps=a.steps, report_to="none", save_model_at_end=False,
                       eval_at_end=False, output_dir=str(Path(a.runs_dir) / f"{m}-s{seed}"))
            trainer = VideoRewardTrainer(config_from_dict(rec), policy=copy.deepcopy(base))
            counters[m], timers[m] = NFECounter(), ScoreTimer()
            instrument(trainer, counters[m], timers[m])
            trainers[m] = trainer
            rows[m] = {"method": m, "seed": seed, "curve": [], "seconds": 0.0}
        for step in range(a.steps + 1):
            for m, trainer in trainers.items():
                if step % a.eval_every == 0 or step == a.steps:
                    r = quick_eval(trainer.policy, trainer.reward, eval_p, eval_s, 10)
                    rows[m]["curve"].append({"step": step, "heldout_reward": r, "seconds": rows[m]["seconds"],
                                             "score_seconds": timers[m].score_s,
                                             "decode_seconds": timers[m].decode_s,
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
                rows[m]["score_seconds"], rows[m]["decode_seconds"] = timers[m].score_s, timers[m].decode_s
                rows[m].setdefault("train_reward", []).append(met.get("reward_mean"))
        for m, trainer in trainers.items():
            fp, fs = eval_pairs("world:heldout", a.final_eval_prompts, seed=1234)
            with torch.no_grad():
                res = evaluate(trainer.policy, fp, fs, {trainer.config.reward: trainer.reward},
                               Path(a.runs_dir) / f"{m}-s{seed}" / "eval", num_steps=10)
            rows[m].update({"final": {k: res[k] for k in ("reward_before", "reward_after", "gain", "gain_sem")},
                            "sampler_nfe": counters[m].counts["sampler"], "loss_nfe": counters[m].counts["loss"]})
            runs.append(rows[m])
            print(f"seed {seed} {m:<14} final (trl-video eval, {a.final_eval_prompts} held-out pairs): "
                  f"{res['reward_before']:.4f} -> {res['reward_after']:.4f} (gain {res['gain']:+.4f} +- "
                  f"{res['gain_sem']:.4f}); sampler NFE {counters[m].counts['sampler']}, "
                  f"{rows[m]['seconds']:.0f} s", flush=True)
        (out / "grpo_cpu.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    return write_results(out, {"args": vars(a), "runs": runs}, a.methods)


def write_results(out: Path, result: dict[str, Any], methods: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_cpu.json").write_text(json.dumps(result, indent=1))
    summary = summarise(result["runs"], methods)
    (out / "grpo_cpu.md").write_text(summary + "\n")
    plot(result["runs"], methods, out / "grpo_cpu.png")
    print(summary)
    print(f"wrote {out}/grpo_cpu.json, grpo_cpu.md, grpo_cpu.png")
    return 0


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (0 for one seed)."""
    return statistics.mean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def reach(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first eval point after training started whose held-out reward is >= target."""
    return next((c for c in run["curve"][1:] if c["heldout_reward"] >= target), None)


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> str:
    lines = ["| method | seeds | held-out reward before -> after (mean over seeds) | gain: mean +- s.e. over seeds "
             "| gain per seed (+- its s.e. over the eval pairs) | sampler NFE | loss NFE | train seconds (mean, "
             "min-max) |", "|---|---|---|---|---|---|---|---|"]
    for m, rs in runs_by_method(runs, methods):
        gain, sem = mean_sem([r["final"]["gain"] for r in rs])
        secs = [r["seconds"] for r in rs]
        per_seed = ", ".join(f"{r['final']['gain']:+.3f}+-{r['final']['gain_sem']:.3f}" for r in rs)
        lines.append(f"| `{m}` | {len(rs)} | {statistics.mean(r['final']['reward_before'] for r in rs):.4f} -> "
                     f"{statistics.mean(r['final']['reward_after'] for r in rs):.4f} | **{gain:+.4f} +- {sem:.4f}** | "
                     f"{per_seed} | {statistics.mean(r['sampler_nfe'] for r in rs):.0f} | "
                     f"{statistics.mean(r['loss_nfe'] for r in rs):.0f} | {statistics.mean(secs):.0f} "
                     f"({min(secs):.0f}-{max(secs):.0f}) |")
    if "tempflow-grpo" not in methods:
        return "\n".join(lines)
    # compute to reach tempflow-grpo's final reward, seed by seed (same seed = same prompts, same eval pairs)
    lines += ["", "Compute to reach `tempflow-grpo`'s final held-out reward (its last quick-eval point, per seed; "
              "the first eval point of each run at or above it), as a ratio to what `tempflow-grpo` spent on the same "
              "seed (mean, min-max over the seeds that reach it). NFE = transformer calls x samples in the sampler "
              "(rollouts and loss-side branches); seconds = training steps only, the methods interleaved step by "
              "step; 'w/o reward model' subtracts the reward model's calls (the RSM paper's wall-clock excludes the "
              "reward computation), 'w/o scoring' also the VAE decode of the scored samples.",
              "", "| method | seeds reaching it | sampler NFE to reach | x tempflow-grpo's | seconds to reach | "
              "x tempflow-grpo's | w/o reward model: x tempflow-grpo's | w/o scoring: x tempflow-grpo's |",
              "|---|---|---|---|---|---|---|---|"]
    temp = {r["seed"]: r for r in runs if r["method"] == "tempflow-grpo"}

    def fmt(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"

    for m in methods:
        hits, nfe_ratio, sec_ratio, no_rm_ratio, no_score_ratio = [], [], [], [], []
        for r in (r for r in runs if r["method"] == m and r["seed"] in temp):
            t_end = temp[r["seed"]]["curve"][-1]
            hit = reach(r, t_end["heldout_reward"])
            if hit is not None:
                hits.append(hit)
                nfe_ratio.append(hit["sampler_nfe"] / max(t_end["sampler_nfe"], 1))
                sec_ratio.append(hit["seconds"] / max(t_end["seconds"], 1e-9))
                if "score_seconds" in hit and "score_seconds" in t_end:
                    no_rm = [c["seconds"] - c["score_seconds"] + c["decode_seconds"] for c in (hit, t_end)]
                    no_sc = [c["seconds"] - c["score_seconds"] for c in (hit, t_end)]
                    no_rm_ratio.append(no_rm[0] / max(no_rm[1], 1e-9))
                    no_score_ratio.append(no_sc[0] / max(no_sc[1], 1e-9))
        n = sum(1 for r in runs if r["method"] == m)
        if not hits:
            lines.append(f"| `{m}` | 0 of {n} | - | - | - | - | - | - |")
            continue
        nf, sc = [h["sampler_nfe"] for h in hits], [h["seconds"] for h in hits]
        lines.append(f"| `{m}` | {len(hits)} of {n} | {statistics.mean(nf):.0f} ({min(nf)}-{max(nf)}) | "
                     f"{fmt(nfe_ratio)} | {statistics.mean(sc):.0f} ({min(sc):.0f}-{max(sc):.0f}) | "
                     f"{fmt(sec_ratio)} | {fmt(no_rm_ratio)} | {fmt(no_score_ratio)} |")
    lines += seed_mean_reach(runs, methods)
    timed = [r for r in runs if "score_seconds" in r]
    if timed:
        lines += ["", "Where a training step's time goes (mean over seeds of each run's totals / steps):", "",
                  "| method | seconds per step | of which VAE decode of scored samples | of which reward model |",
                  "|---|---|---|---|"]
        for m, rs in runs_by_method(timed, methods):
            steps = [max(len(r.get("train_reward", [])), 1) for r in rs]
            per = statistics.mean(r["seconds"] / k for r, k in zip(rs, steps))
            dec = statistics.mean(r["decode_seconds"] / k for r, k in zip(rs, steps))
            rm = statistics.mean((r["score_seconds"] - r["decode_seconds"]) / k for r, k in zip(rs, steps))
            lines.append(f"| `{m}` | {per:.2f} | {dec:.2f} | {rm:.2f} |")
    return "\n".join(lines)


def runs_by_method(runs: list[dict[str, Any]], methods: list[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(method, its runs)`` in ``methods`` order, for the methods that have runs."""
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            yield m, rs


def seed_mean_reach(runs: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """The same question on the seed-mean curves (less eval noise than seed by seed): the first eval point where a
    method's mean held-out reward over seeds is at or above `tempflow-grpo`'s mean final one, with the mean NFE and
    seconds spent by then, as ratios to `tempflow-grpo`'s mean totals."""
    temp = [r for r in runs if r["method"] == "tempflow-grpo"]
    if not temp:
        return []
    n_pts = min(len(r["curve"]) for r in runs)

    def mean_at(rs: list[dict[str, Any]], k: int, key: str) -> float:
        return statistics.mean(float(r["curve"][k][key]) for r in rs)

    target = mean_at(temp, n_pts - 1, "heldout_reward")
    t_nfe, t_sec = mean_at(temp, n_pts - 1, "sampler_nfe"), mean_at(temp, n_pts - 1, "seconds")
    lines = ["", f"On the seed-mean curves: `tempflow-grpo`'s mean final quick-eval reward is {target:.4f}; the first "
             "eval point where each method's mean over seeds reaches it, and the mean compute spent by then:", "",
             "| method | step | mean reward there +- s.e. | sampler NFE (x tempflow-grpo's) | seconds (x tempflow-grpo's) |",
             "|---|---|---|---|---|"]
    for m, rs in runs_by_method(runs, methods):
        hit = next((k for k in range(1, n_pts) if mean_at(rs, k, "heldout_reward") >= target), None)
        if hit is None:
            best = max(mean_at(rs, k, "heldout_reward") for k in range(n_pts))
            lines.append(f"| `{m}` | not reached (best {best:.4f}) | - | - | - |")
            continue
        mu, se = mean_sem([float(r["curve"][hit]["heldout_reward"]) for r in rs])
        nfe, sec = mean_at(rs, hit, "sampler_nfe"), mean_at(rs, hit, "seconds")
        lines.append(f"| `{m}` | {rs[0]['curve'][hit]['step']} | {mu:.4f} +- {se:.4f} | {nfe:.0f} "
                     f"({nfe / max(t_nfe, 1):.2f}x) | {sec:.1f} ({sec / max(t_sec, 1e-9):.2f}x) |")
    return lines


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Held-out reward (quick eval, mean over seeds +- s.e.) against sampler NFE and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for m, rs in runs_by_method(runs, methods):
        n = min(len(r["curve"]) for r in rs)
        rew = [mean_sem([r["curve"][k]["heldout_reward"] for r in rs]) for k in range(n)]
        mu, se = [v[0] for v in rew], [v[1] for v in rew]
        for ax, key in zip(axes, ("sampler_nfe", "seconds")):
            x = [statistics.mean(r["curve"][k][key] for r in rs) for k in range(n)]
            ax.plot(x, mu, marker="o", ms=3, label=m)
            ax.fill_between(x, [a - b for a, b in zip(mu, se)], [a + b for a, b in zip(mu, se)], alpha=0.2)
    axes[0].set_xlabel("sampler NFE (transformer calls x samples)")
    axes[1].set_xlabel("training seconds (interleaved)")
    axes[0].set_ylabel("held-out alignment reward (ODE, 10 steps)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CPU world, tiny-wan: mean over {len({r['seed'] for r in runs})} seeds +- s.e.", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
