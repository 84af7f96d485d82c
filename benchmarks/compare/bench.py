"""``trl-video bench compare.compare``: every method on one task, side by side, several training seeds each.

Runs the recipes (default ``recipes/compare/*.yaml``: same base model, prompts, reward, an equal budget of
optimiser steps x fresh rollouts) one process per (method, seed), seeds outermost so the machine's load drifts over
every method alike. Each run trains with ``VideoRewardTrainer`` and, every ``--eval-every`` steps (and at step 0),
scores the policy on the same held-out (prompt, seed) pairs with the deterministic ODE sampler and the pixel
reward (``--reward``, default alignment: VELR, trained on its latent reward model, is scored with it too), plus
the reward-hacking monitor's Frechet distance to the world's reference clips and its diversity. From the run's
``metrics.jsonl`` (the trainer's cumulative ``nfe``, ``nfe_sampler``, ``samples_generated``, each step's
``seconds`` and ``peak_memory_mb``) every eval point gets its wall-clock (training steps only; evaluations
excluded), NFE and samples. Peak training memory is the max of ``peak_memory_mb`` over every step, every loss
phase included (on CPU: the process's peak RSS, so every resident auxiliary model and optimiser state counts).

The target (held-out reward = the base model's + ``--target-gain``) is fixed and printed before any run; time /
NFE / samples / steps to it follow ``analysis.py``'s interpolation rule. Output under ``--out``: ``compare.json``,
``compare.md`` (ratios to ``--baseline`` paired by seed, spread over seeds), ``reward_vs_seconds.png``,
``reward_vs_nfe.png`` (seed bands = min..max over seeds), ``reward_vs_distance.png``, and each run's folder.

    OMP_NUM_THREADS=1 trl-video bench compare.compare --seeds 0 1 2         # the default comparison (about an hour+)
    OMP_NUM_THREADS=1 trl-video bench compare.compare --quick               # smoke run: 3 methods, 1 seed, 4 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from . import analysis

QUICK_METHODS = ("flow_grpo", "refl", "nft")  # recipe stems


def _recipe_samples_per_step(rec: dict[str, Any]) -> int:
    return int(rec.get("prompts_per_step", 1)) * int(rec.get("group_size", 1)) * int(
        rec.get("gradient_accumulation_steps", 1))


# ------------------------------------------------------------------------------------------------ one run
def worker_main(argv: list[str]) -> int:
    """One (recipe, seed) run in this process; writes ``run.json`` into ``--out``."""
    ap = argparse.ArgumentParser(prog="trl-video bench compare (worker)")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--eval-every", type=int, required=True)
    ap.add_argument("--eval-prompts", type=int, required=True)
    ap.add_argument("--eval-num-steps", type=int, required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch
    from transformers import TrainerCallback

    from trl_video.config import config_from_dict
    from trl_video.evaluation import eval_pairs, eval_sampling, video_features
    from trl_video.monitor import diversity, frechet, world_reference
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry
    from trl_video.trainer import VideoRewardTrainer, peak_memory_mb, reset_peak_memory

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    rec = yaml.safe_load(Path(a.recipe).read_text())
    rec.update(seed=a.seed, output_dir=str(out / "train"), report_to="none", save_model_at_end=False,
               eval_at_end=False, logging_steps=1, save_steps=0)
    if a.steps:
        rec["max_steps"] = a.steps
    trainer = VideoRewardTrainer(config_from_dict(rec))
    reward = build_reward(get_registry(), a.reward, {})
    prompts, seeds = eval_pairs(rec.get("eval_prompts", "world:heldout"), a.eval_prompts, seed=4321)
    ref = world_reference(prompts, seeds)
    ref_feats = video_features(ref) if ref is not None else None
    # sampled as the run's method is evaluated everywhere else (a causal generator by its own self-rollout)
    sampling = eval_sampling(trainer.plan, trainer.sampler, a.eval_num_steps)
    evals: list[dict[str, Any]] = []
    eval_peak = [0.0]

    @torch.no_grad()
    def held_out(step: int) -> None:
        reset_peak_memory(trainer.accelerator.device)
        lat = sampling.sample(trainer.policy, prompts, seeds, None)
        pix = torch.cat([trainer.policy.decode(lat[i:i + 16]) for i in range(0, len(lat), 16)])
        r = reward(pix if getattr(reward, "space", "pixel") == "pixel" else lat, prompts).float()
        feats = video_features(pix.cpu())
        point = {"step": step, "reward": float(r.mean()), "reward_sem": float(r.std() / len(r) ** 0.5),
                 "diversity": diversity(feats),
                 "frechet_distance": frechet(feats, ref_feats, 50)["frechet_distance"] if ref_feats is not None
                 else None}
        eval_peak[0] = max(eval_peak[0], peak_memory_mb(trainer.accelerator.device))
        evals.append(point)
        print(f"  step {step:>3}  held-out {a.reward} {point['reward']:.4f}", flush=True)

    class HeldOut(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step % a.eval_every == 0 or state.global_step == trainer.config.max_steps:
                held_out(state.global_step)
            return control

    trainer.add_callback(HeldOut())
    held_out(0)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step, cum = {0: {"seconds": 0.0, "nfe": 0, "nfe_sampler": 0, "samples_generated": 0}}, 0.0
    for row in rows:
        cum += row["seconds"]
        by_step[row["step"]] = {"seconds": cum, **{k: row[k] for k in ("nfe", "nfe_sampler", "samples_generated")}}
    for e in evals:
        e.update(by_step[e["step"]])
    result = {"name": Path(a.recipe).stem, "method": rec["method"], "recipe": a.recipe, "seed": a.seed, "max_steps": trainer.config.max_steps,
              "evals": evals, "train_rewards": [row.get("reward_mean") for row in rows],
              "peak_train_memory_mb": max(row["peak_memory_mb"] for row in rows), "peak_eval_memory_mb": eval_peak[0],
              "process_seconds_incl_evals": elapsed, "load_average_at_end": os.getloadavg()[0]}
    (out / "run.json").write_text(json.dumps(result, indent=1))
    for ck in (out / "train").glob("checkpoint-*"):  # the final checkpoint is not part of the results
        shutil.rmtree(ck)
    return 0


def _run_one(recipe: Path, seed: int, a: argparse.Namespace, out: Path, root: Path) -> dict[str, Any]:
    """The worker in a fresh process (its own peak memory, nothing shared with the other rows), run from the
    repository root (recipes name their auxiliary files relative to it)."""
    cmd = [sys.executable, "-c", "import sys; from trl_video.bench_discovery import import_benchmark; "
           "sys.exit(import_benchmark('compare').worker_main(sys.argv[1:]))",
           "--recipe", str(recipe.resolve()), "--seed", str(seed), "--eval-every", str(a.eval_every),
           "--eval-prompts", str(a.eval_prompts), "--eval-num-steps", str(a.eval_num_steps), "--reward", a.reward,
           "--out", str(out.resolve())]
    if a.steps:
        cmd += ["--steps", str(a.steps)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                              env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(a.threads)})
    if proc.returncode != 0 or not (out / "run.json").exists():
        tail = [ln for ln in (out / "log.txt").read_text().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"name": recipe.stem, "method": yaml.safe_load(recipe.read_text())["method"], "seed": seed, "evals": [],
                "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return dict(json.loads((out / "run.json").read_text()))


# ------------------------------------------------------------------------------------------------ plots
def _style(i: int) -> dict[str, Any]:
    """Row i's line: matplotlib's 10 colours, dashed from the 11th row on (12 rows must stay distinguishable)."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}


def plots(runs: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in runs if not r.get("error") and r["evals"]]
    names = list(dict.fromkeys(r["name"] for r in ok))
    written = []
    for axis, label, fname in (("seconds", "training wall-clock (s)", "reward_vs_seconds.png"),
                               ("nfe_sampler", "sampler NFE (transformer calls x samples)", "reward_vs_nfe.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for m in names:
            rs = [r for r in ok if r["name"] == m]
            x_max = min(r["evals"][-1][axis] for r in rs)
            grid = np.linspace(0.0, x_max, 50)
            ys = np.array([np.interp(grid, [e[axis] for e in r["evals"]], [e["reward"] for e in r["evals"]])
                           for r in rs])
            (line,) = ax.plot(grid, ys.mean(0), label=f"{m} ({len(rs)} seeds)", **_style(names.index(m)))
            if len(rs) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.12)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reward")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in names:
        pts = [(e["frechet_distance"], e["reward"]) for r in ok if r["name"] == m for e in r["evals"][1:]
               if e["frechet_distance"] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, label=m, s=12, marker="o" if names.index(m) < 10 else "^",
                       color=_style(names.index(m))["color"])
    ax.set_xlabel("Frechet distance to the world's reference clips (lower: closer)")
    ax.set_ylabel("held-out reward")
    ax.set_title("reward vs distance (every eval point of every seed)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_distance.png", dpi=110)
    plt.close(fig)
    return [*written, "reward_vs_distance.png"]


# ------------------------------------------------------------------------------------------------ set-up steps
def setup_specs(recipes: list[Path], root: Path) -> dict[str, dict[str, Any]]:
    """One-off preparation rows need before training (``benchmarks/compare/setup.yaml``; VELR's latent reward model
    is built from pixel-reward labels and pre-trained), for the rows whose ``creates`` does not exist yet."""
    spec_file = Path(__file__).with_name("setup.yaml")
    specs = (yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else None) or {}
    todo = {}
    for r in recipes:
        spec = specs.get(r.stem)
        if spec and (root / spec["creates"]).exists():
            print(f"set-up of {r.stem}: {spec['creates']} exists, not rebuilt (its build time is not measured in "
                  "this run and not added to the row's cost)", flush=True)
        elif spec:
            todo[r.stem] = spec
    return todo


def run_setup(stem: str, spec: dict[str, Any], root: Path, threads: int, log: Path) -> float:
    """Run one row's set-up commands from the repository root; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        for cmd in spec["commands"]:
            print(f"set-up of {stem}: {cmd}", flush=True)
            proc = subprocess.run(shlex.split(cmd), cwd=root, stdout=fh, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                print(f"set-up of {stem} failed (exit {proc.returncode}, see {log}); its rows will report the error",
                      flush=True)
                break
    took = time.perf_counter() - t0
    print(f"set-up of {stem}: {took:.0f} s", flush=True)
    return took


# ------------------------------------------------------------------------------------------------ driver
def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench compare.compare", description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe files (default: recipes/compare/*.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (each row's seed)")
    ap.add_argument("--steps", type=int, help="override every recipe's max_steps (keeps the budget equal)")
    ap.add_argument("--baseline", default="flow_grpo",
                    help="the row (recipe file stem, e.g. flow_grpo) the table's ratios are taken to")
    ap.add_argument("--target-gain", type=float, default=0.025,
                    help="target = base model's held-out reward + this, fixed before the runs (default: half of "
                         "flow-grpo's +0.049 held-out gain in 16 steps, benchmarks/rsm/results, measured earlier)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out (prompt, seed) pairs, same for all")
    ap.add_argument("--eval-num-steps", type=int, default=10)
    ap.add_argument("--reward", default="alignment", help="the pixel reward every method is scored with")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each in its own process with --threads threads (2 x 1 thread on 2 cores)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads per run (default $OMP_NUM_THREADS or 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: flow_grpo, refl, nft; 1 seed; 4 steps; eval every 2 on 8 pairs")
    ap.add_argument("--out", help="default benchmarks/compare/results/{default,quick}")
    ap.add_argument("--replot", metavar="DIR", help="redraw DIR/*.png from DIR/compare.json; runs nothing")
    a = ap.parse_args(argv)
    if a.replot:
        saved = Path(a.replot) / "compare.json"
        if not saved.is_file():
            print(f"error: --replot: {saved} not found", file=sys.stderr)
            return 2
        print("plots: " + ", ".join(plots(json.loads(saved.read_text())["runs"], Path(a.replot))))
        return 0
    root = Path(__file__).resolve().parents[2]
    recipes = [Path(r).resolve() for r in a.recipes] or sorted((root / "recipes" / "compare").glob("*.yaml"))
    if a.quick:
        recipes = [r for r in recipes if r.stem in QUICK_METHODS] if not a.recipes else recipes
        a.seeds, a.steps = a.seeds[:1], a.steps or 4
        a.eval_every, a.eval_prompts = min(a.eval_every, 2), min(a.eval_prompts, 8)
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing or not recipes:
        print(f"error: recipe not found: {', '.join(missing) or 'recipes/compare/*.yaml'}", file=sys.stderr)
        return 2
    if a.jobs < 1 or a.threads < 1:
        print(f"error: --jobs and --threads must be >= 1, got {a.jobs} and {a.threads}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else root / "benchmarks" / "compare" / "results" / ("quick" if a.quick else "default")
    out.mkdir(parents=True, exist_ok=True)
    recs = {r: yaml.safe_load(r.read_text()) for r in recipes}
    names = [r.stem for r in recipes]
    if a.baseline not in names:
        print(f"error: --baseline '{a.baseline}' is none of the rows {names} (recipe file stems)", file=sys.stderr)
        return 2
    print("Budget (equal optimiser steps x fresh rollouts per step; NFE measured, not equalised):")
    budgets = {}
    for r, rec in recs.items():
        steps = a.steps or int(rec.get("max_steps", 0))
        budgets[r.stem] = (steps, _recipe_samples_per_step(rec))
        print(f"  {r.stem:<15} {rec['method']:<14} {steps} steps x {budgets[r.stem][1]} rollouts = "
              f"{steps * budgets[r.stem][1]} samples")
    if len(set(budgets.values())) > 1:
        print("  warning: the recipes' budgets differ", flush=True)
    print(f"Target: held-out {a.reward} >= base reward (step-0 eval, same base and pairs for every method) "
          f"+ {a.target_gain}; baseline `{a.baseline}`; seeds {a.seeds}; {a.jobs} run(s) at once x {a.threads} "
          "thread(s)" + ("  [QUICK SMOKE RUN: not evidence for any claim]" if a.quick else ""), flush=True)
    todo = setup_specs(recipes, root)
    setup_seconds: dict[str, float] = {}
    ready = {stem: threading.Event() for stem in todo}
    # seeds outermost (load drift spreads over every row); rows that need a set-up go last, the set-up itself
    # first, so it runs beside the other rows instead of holding every job
    order: list[tuple[int, Path]] = [(-1, r) for r in recipes if r.stem in todo]
    order += [(seed, r) for seed in a.seeds for r in recipes if r.stem not in todo]
    order += [(seed, r) for seed in a.seeds for r in recipes if r.stem in todo]

    def one(item: tuple[int, Path]) -> dict[str, Any]:
        seed, r = item
        if seed < 0:
            try:
                setup_seconds[r.stem] = run_setup(r.stem, todo[r.stem], root, a.threads, out / "setup" / f"{r.stem}.log")
            finally:
                ready[r.stem].set()
            return {}
        if r.stem in ready:
            ready[r.stem].wait()
        t0 = time.perf_counter()
        run = _run_one(r, seed, a, out / "runs" / f"{r.stem}-s{seed}", root)
        msg = run.get("error") or (f"held-out {run['evals'][0]['reward']:.4f} -> {run['evals'][-1]['reward']:.4f}, "
                                   f"sampler NFE {run['evals'][-1]['nfe_sampler']}, "
                                   f"peak {run['peak_train_memory_mb']:.0f} MiB, load {run['load_average_at_end']:.1f}")
        print(f"seed {seed} {r.stem:<15} {time.perf_counter() - t0:6.0f} s  {msg}", flush=True)
        return run

    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads only wait on the worker processes
        runs = [run for run in pool.map(one, order) if run]
    print(f"all runs: {time.perf_counter() - t_all:.0f} s wall-clock", flush=True)
    base_rewards = [r["evals"][0]["reward"] for r in runs if not r.get("error") and r["evals"]]
    if not base_rewards:
        print("error: every run failed (see runs/*/log.txt)", file=sys.stderr)
        return 1
    base = sum(base_rewards) / len(base_rewards)
    target = base + a.target_gain
    summary = analysis.summarise(runs, a.baseline, target)
    claims = analysis.claims(runs, analysis.SEED_CLAIMS, target, setup_seconds)
    summary.update(args={k: v for k, v in vars(a).items()}, recipes=[str(r.relative_to(root)) if r.is_relative_to(root)
                                                                     else str(r) for r in recipes],
                   base_reward=base, setup_seconds=setup_seconds, claims=claims,
                   budget={m: {"steps": s, "rollouts_per_step": n} for m, (s, n) in budgets.items()},
                   wall_seconds_all_runs=time.perf_counter() - t_all, smoke_run=bool(a.quick))
    md = analysis.markdown(summary) + "\n\n" + analysis.claims_markdown(claims)
    if a.quick:
        md = "**Smoke run (`--quick`): 1 seed, 4 steps — checks the machinery, not evidence for any claim.**\n\n" + md
    (out / "compare.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=str))
    (out / "compare.md").write_text(md + "\n")
    print(md)
    print("plots: " + ", ".join(str(out / p) for p in plots(runs, out)))
    return 0


BENCHMARKS = {"compare": compare_main}
# No bare alias: `velr.compare` also registers the bare name `compare`, which the registry then treats as ambiguous;
# this bench is `trl-video bench compare.compare`.
