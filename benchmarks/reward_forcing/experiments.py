"""Reward-Forcing on the CPU world (tiny-wan): the experiments behind the plugin README's figures.

    python benchmarks/reward_forcing/experiments.py ode      # stage 1: regression loss, accuracy vs teacher, chunk jumps
    python benchmarks/reward_forcing/experiments.py reward   # stage 2: last vs random frames, >= 3 seeds
    python benchmarks/reward_forcing/experiments.py stream   # = trl-video bench reward_forcing.stream, results/

Results go to ``benchmarks/reward_forcing/results/*.json`` (and sample grids as PNG). Every number printed in the
README comes from these files. Run with ``OMP_NUM_THREADS=1 nice -n 10`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import vidrl_plugin_reward_forcing  # noqa: F401  (registers the causal model class before folders are loaded)
import yaml
from torch import Tensor

from trl_video.bench_discovery import import_benchmark
from trl_video.errors import TrlVideoError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
ODE_DATA = REPO / "out/tiny/reward_forcing_ode_data"
HELDOUT_ODE = REPO / "out/tiny/reward_forcing_ode_heldout"
STAGE1 = REPO / "out/tiny/reward_forcing_ode"


# ----------------------------------------------------------------------------------------------- helpers
def _recipe(name: str, **over: Any) -> dict[str, Any]:
    rec = yaml.safe_load((REPO / "recipes/tiny" / name).read_text())
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(rec.get(k), dict):
            rec[k] = {**rec[k], **v}
        else:
            rec[k] = v
    return rec


def _train(recipe: dict[str, Any], policy: Any = None):
    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    cfg = config_from_dict(recipe, where="experiment recipe")
    trainer = VideoRewardTrainer(cfg, policy=policy, recipe=recipe)
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


def _ema_weights(trainer: Any) -> None:
    ema = trainer.ctx.ema.get("policy")
    if ema is not None:
        ema.copy_to(trainer.policy.trainable_parameters())


def _heldout_items(seeds: int):
    _eval_items = import_benchmark("assets", "pretrain")._eval_items  # the asset builder's helpers

    return _eval_items("heldout", seeds)


@torch.no_grad()
def student_videos(policy: Any, prompts: list[str], seeds: list[int], num_steps: int = 4) -> Tensor:
    """Self-rollout samples decoded, ``[N, 3, F, H, W]``: the sampler component's evaluation loop (the one
    ``eval_at_end`` / ``trl-video eval`` use; noise and re-noising seeded per item)."""
    from vidrl_plugin_reward_forcing.sampler import SelfRolloutSampler

    lat = SelfRolloutSampler(num_steps=num_steps).evaluation_sampler()(policy, prompts, seeds, None)
    return torch.cat([policy.decode(lat[i:i + 16]) for i in range(0, len(lat), 16)])


@torch.no_grad()
def teacher_videos(policy: Any, prompts: list[str], seeds: list[int], num_steps: int = 20) -> Tensor:
    sample_videos = import_benchmark("assets", "pretrain").sample_videos  # the asset builder's helpers

    return sample_videos(policy, prompts, seeds, steps=num_steps)


def pixel_to_latent_frame(j: int, temporal: int) -> int:
    """Wan's causal VAE: pixel frame 0 <- latent 0, pixel frames 1 + temporal*(i-1) .. temporal*i <- latent i."""
    return 0 if j == 0 else (j - 1) // temporal + 1


def frame_diff_per_pair(videos: Tensor) -> Tensor:
    """Mean |difference| of each consecutive pixel-frame pair over the batch, ``[F - 1]``."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))


def chunk_jump(videos: Tensor, chunk_size: int, temporal: int) -> dict[str, float]:
    """Mean |frame difference| between consecutive pixel frames that straddle a chunk boundary vs inside a chunk."""
    d = frame_diff_per_pair(videos)
    chunk = [pixel_to_latent_frame(j, temporal) // chunk_size for j in range(videos.shape[2])]
    at = [float(d[j]) for j in range(len(d)) if chunk[j] != chunk[j + 1]]
    inside = [float(d[j]) for j in range(len(d)) if chunk[j] == chunk[j + 1]]
    res = {"boundary": statistics.fmean(at) if at else float("nan"),
           "inside": statistics.fmean(inside) if inside else float("nan")}
    res["ratio"] = res["boundary"] / res["inside"] if inside and res["inside"] > 0 else float("nan")
    return {k: round(v, 5) for k, v in res.items()}


def motion(videos: Tensor) -> Tensor:
    """Per-video mean absolute frame difference (the motion reward)."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().flatten(1).mean(1)


def _mean_se(xs: list[float]) -> dict[str, Any]:
    """Mean and standard error (:func:`trl_video.stats.mean_sem`; NaN s.e. for one value), values kept."""
    from trl_video.stats import mean_sem

    ms = mean_sem(torch.tensor(xs, dtype=torch.float64))
    se = ms["sem"] if len(xs) > 1 else float("nan")
    return {"mean": round(ms["mean"], 5), "se": round(se, 5), "n": len(xs), "values": [round(x, 5) for x in xs]}


def _save(name: str, res: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"results: {path}")
    return path


@torch.no_grad()
def heldout_regression(model: Any, policy: Any, path: Path, n: int = 64) -> float:
    """Stage-1 loss on held-out trajectories, with fixed per-chunk levels (every level for every chunk)."""
    from vidrl_plugin_reward_forcing.loss import ode_regression
    from vidrl_plugin_reward_forcing.ode import ODETrajectories

    data = ODETrajectories(path, policy.latent_shape)
    rows = data.ds[list(range(min(n, len(data))))]
    emb, _ = policy.encode_prompts(list(rows["prompt"]))
    n_chunks = policy.latent_shape[1] // model.config.chunk_size
    losses = []
    for k in range(len(data.timesteps)):  # all chunks at level k, then a staggered pattern
        for pattern in (torch.full((n_chunks,), k), (torch.arange(n_chunks) + k) % len(data.timesteps)):
            idx = pattern.long().expand(len(rows["prompt"]), n_chunks)
            losses.append(float(ode_regression(model, policy.schedule, rows["states"].float(), rows["x0"].float(),
                                               data.timesteps, emb, idx)))
    return statistics.fmean(losses)


# ----------------------------------------------------------------------------------------------- stage 1
def run_ode(a: argparse.Namespace) -> int:
    from vidrl_plugin_reward_forcing import RewardForcingConfig, make_causal
    from vidrl_plugin_reward_forcing.ode import build_ode_dataset

    from trl_video.models.policy import load_policy
    score_videos = import_benchmark("assets", "pretrain").score_videos  # the asset builder's helpers
    from trl_video.world import Caption

    if not ODE_DATA.exists():
        raise SystemExit(f"build the training trajectories first: trl-video bench reward_forcing.build-ode "
                         f"--teacher tiny-wan --out {ODE_DATA.relative_to(REPO)} --num 512")
    teacher = load_policy("tiny-wan")
    if not HELDOUT_ODE.exists():
        from trl_video.data import load_prompts

        pool = load_prompts("world:heldout")
        build_ode_dataset(teacher, [pool[i % len(pool)] for i in range(64)], [777_000 + i for i in range(64)],
                          HELDOUT_ODE, teacher_name="tiny-wan")
    items = _heldout_items(a.eval_seeds)
    caps = [c for c, _ in items]
    prompts, seeds = [c.text for c in caps], [s for _, s in items]

    init = load_policy("tiny-wan")
    make_causal(init, RewardForcingConfig(chunk_size=a.chunk_size))
    reg_init = heldout_regression(init.transformer, init, HELDOUT_ODE)
    vids_init = student_videos(init, prompts, seeds)
    recipe = _recipe("reward_forcing_ode.yaml", max_steps=a.steps, output_dir=str(STAGE1), report_to="none",
                     method_args={"chunk_size": a.chunk_size, "ode_steps": a.steps, "ode_dataset": str(ODE_DATA)})
    trainer, secs = _train(recipe)
    reg_trained = heldout_regression(trainer.policy.transformer, trainer.policy, HELDOUT_ODE)
    _ema_weights(trainer)
    reg_ema = heldout_regression(trainer.policy.transformer, trainer.policy, HELDOUT_ODE)
    trainer.save_model(STAGE1 / "model_ema")  # the EMA weights: stage 2 starts here
    vids_student = student_videos(trainer.policy, prompts, seeds)
    vids_teacher = teacher_videos(teacher, prompts, seeds, 20)
    vids_teacher4 = teacher_videos(teacher, prompts, seeds, 4)
    temporal = teacher.vae.config.scale_factor_temporal
    rows = [json.loads(x) for x in (STAGE1 / "metrics.jsonl").read_text().splitlines()]
    sc = {name: score_videos(v, caps) for name, v in (("student_ode_init", vids_student), ("teacher_20step", vids_teacher),
                                                     ("teacher_4step", vids_teacher4), ("causal_before_init", vids_init))}
    from trl_video.world import render_batch

    truth = render_batch(prompts, seeds)
    res = {
        "command": "python benchmarks/reward_forcing/experiments.py ode " + shlex.join(sys.argv[2:]),
        "train_trajectories": 512, "steps": trainer.global_step, "steps_planned": a.steps,
        "stopped_early": trainer.global_step < a.steps, "chunk_size": a.chunk_size, "train_seconds": round(secs, 1),
        "heldout_regression_loss": {"causal_init_from_teacher": round(reg_init, 5), "after_ode_init": round(reg_trained, 5),
                                    "after_ode_init_ema": round(reg_ema, 5)},
        "train_regression_curve": [(r["step"], r.get("ode/regression")) for r in rows],
        "heldout_eval": {"n": len(caps), **{k: {m: v[m] for m in ("color_acc", "motion_acc", "background_acc")}
                                           for k, v in sc.items()}},
        "fraction_of_teacher_20step": {
            m: round(sc["student_ode_init"][m] / sc["teacher_20step"][m], 3) if sc["teacher_20step"][m] else None
            for m in ("color_acc", "motion_acc")},
        "chunk_boundary_jump": {"student_ode_init": chunk_jump(vids_student, a.chunk_size, temporal),
                                "causal_before_init": chunk_jump(vids_init, a.chunk_size, temporal),
                                "teacher_20step": chunk_jump(vids_teacher, a.chunk_size, temporal),
                                "world_truth": chunk_jump(truth, a.chunk_size, temporal)},
        "frame_diff_profile": {name: [round(float(x), 5) for x in frame_diff_per_pair(v)]
                               for name, v in (("student_ode_init", vids_student), ("teacher_20step", vids_teacher),
                                               ("causal_before_init", vids_init), ("world_truth", truth))},
        "motion_mean_abs_frame_diff": {"student_ode_init": round(float(motion(vids_student).mean()), 5),
                                       "teacher_20step": round(float(motion(vids_teacher).mean()), 5),
                                       "world_truth": round(float(motion(truth).mean()), 5)},
    }
    res["vae_temporal"] = temporal
    _save("ode_init", res)
    plot_ode(res, RESULTS / "ode_init.png")
    save_sample_grid = import_benchmark("assets", "pretrain").save_sample_grid  # the asset builder's helpers

    save_sample_grid(RESULTS / "ode_init_student.png", vids_student, caps, "causal student after ODE init (4 steps/chunk)")
    save_sample_grid(RESULTS / "ode_init_teacher.png", vids_teacher, caps, "bidirectional teacher (20 steps)")
    _ = Caption
    return 0


def plot_ode(res: dict[str, Any], out: Path) -> None:
    """Stage 1 at a glance: the training regression curve, the held-out accuracies against the teacher's, and
    the mean |frame difference| of each consecutive pixel-frame pair with the chunk boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    steps, loss = zip(*[(s, v) for s, v in res["train_regression_curve"] if v is not None], strict=True)
    ax[0].plot(steps, loss, lw=1)
    held = res["heldout_regression_loss"]
    ax[0].axhline(held["causal_init_from_teacher"], color="C3", ls="--", lw=1, label="held-out, before")
    ax[0].axhline(held["after_ode_init_ema"], color="C2", ls="--", lw=1, label="held-out, after (EMA)")
    ax[0].set(xlabel="step", ylabel="ODE regression loss", yscale="log", title="stage 1 regression")
    ax[0].legend(fontsize=7)
    ev = res["heldout_eval"]
    names = ["causal_before_init", "student_ode_init", "teacher_4step", "teacher_20step"]
    for k, metric in enumerate(("color_acc", "motion_acc")):
        ax[1].bar([i + 0.4 * k for i in range(len(names))], [ev[n][metric] for n in names], width=0.4,
                  label=metric)
    ax[1].set_xticks([i + 0.2 for i in range(len(names))],
                     ["causal,\nbefore", "student\n(4/chunk)", "teacher\n4 steps", "teacher\n20 steps"], fontsize=7)
    ax[1].set(ylim=(0, 1), title=f"held-out accuracy (n={ev['n']})")
    ax[1].legend(fontsize=7)
    prof = res["frame_diff_profile"]
    for name in ("student_ode_init", "teacher_20step", "world_truth"):
        ax[2].plot(range(len(prof[name])), prof[name], marker="o", ms=3, label=name)
    temporal = res.get("vae_temporal", 4)
    chunk = [pixel_to_latent_frame(j, temporal) // res["chunk_size"] for j in range(len(prof["world_truth"]) + 1)]
    for j in range(len(chunk) - 1):
        if chunk[j] != chunk[j + 1]:
            ax[2].axvline(j, color="0.8", lw=0.8, zorder=0)
    ax[2].set(xlabel="pixel frame pair (j, j+1); grey = chunk boundary", ylabel="mean |frame difference|",
              title="chunk-boundary jump")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- stage 2
REWARD_KEYS = ("last_frame_reward", "frames_reward", "last_frame_alignment", "video_alignment", "motion", "color_acc",
               "motion_acc", "dynamic_degree", "travel_px")


@torch.no_grad()
def _reward_eval(policy: Any, prompts: list[str], seeds: list[int], reward: Any = None
                 ) -> tuple[dict[str, Any], Tensor]:
    """Held-out: the trained reward ``reward`` (default: the world's alignment) on the last frame and averaged over
    every frame scored alone (what random-frame supervision optimises in expectation), the whole-video alignment,
    the motion (mean |frame difference|, which also counts flicker) and the world classifiers' accuracies
    (motion_acc: the centroid moves the named way, i.e. real motion); and the decoded videos it scored."""
    from trl_video.components.rewards import AlignmentReward
    from trl_video.world import Caption

    score_videos = import_benchmark("assets", "pretrain").score_videos  # the asset builder's helpers
    vids = student_videos(policy, prompts, seeds)
    align = AlignmentReward()
    reward = reward if reward is not None else align
    last = reward(vids[:, :, -1:], prompts).float()
    b, _, f = vids.shape[:3]
    one_frame_videos = vids.transpose(1, 2).reshape(b * f, 3, 1, *vids.shape[3:])
    per_frame = reward(one_frame_videos, [p for p in prompts for _ in range(f)]).float().view(b, f)
    sc = score_videos(vids, [Caption.parse(p) for p in prompts])
    return {"last_frame_reward": float(last.mean()), "frames_reward": float(per_frame.mean()),
            "last_frame_alignment": float(align(vids[:, :, -1:], prompts).mean()),
            "video_alignment": float(align(vids, prompts).mean()),
            "motion": float(motion(vids).mean()), "color_acc": sc["color_acc"], "motion_acc": sc["motion_acc"],
            "dynamic_degree": sc["dynamic_degree"], "travel_px": sc["mean_travel_px"],
            # where the frame-to-frame change is: per consecutive pixel-frame pair (the last chunk's frames last)
            "frame_diff_profile": [round(float(x), 5) for x in frame_diff_per_pair(vids)],
            "per_pair_last_frame_reward": [round(float(x), 5) for x in last]}, vids


def run_reward(a: argparse.Namespace) -> int:
    from trl_video.models.policy import load_policy
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    try:
        reward_args = json.loads(a.reward_args)
    except json.JSONDecodeError as exc:
        raise TrlVideoError(f"--reward-args is not JSON: {exc}") from None
    if not isinstance(reward_args, dict):
        raise TrlVideoError(f"--reward-args must be a JSON object, got {type(reward_args).__name__}")
    reward = build_reward(get_registry(), a.reward, reward_args)  # the trained reward, for the evaluation
    start = STAGE1 / "model_ema"
    if not (start / "model_index.json").exists():
        raise TrlVideoError(f"{start} does not exist: run the stage-1 experiment first "
                            "(python benchmarks/reward_forcing/experiments.py ode)")
    items = _heldout_items(a.eval_seeds)
    prompts, seeds = [c.text for c, _ in items], [s for _, s in items]
    base, vids = _reward_eval(load_policy(str(start)), prompts, seeds, reward)
    firsts = [prompts.index(p) for p in dict.fromkeys(prompts)]  # 4 different held-out captions, spread out
    strip_items = firsts[:: max(1, len(firsts) // 4)][:4]
    strips = {"before": vids[strip_items]}
    runs: dict[str, list[dict[str, Any]]] = {}

    def results() -> dict[str, Any]:
        keys = REWARD_KEYS
        summary = {mode: {k: _mean_se([r[k] for r in rs]) for k in keys} for mode, rs in runs.items()}
        gains = {mode: {k: _mean_se([r[k] - base[k] for r in rs]) for k in keys} for mode, rs in runs.items()}
        return {"command": "python benchmarks/reward_forcing/experiments.py reward " + shlex.join(sys.argv[2:]),
                "start": str(start.relative_to(REPO)), "reward": a.reward, "reward_args": reward_args,
                "steps": a.steps, "lr": a.lr, "batch": a.batch,
                "dmd_weight": a.dmd_weight, "grad": a.grad, "seeds_done": min((len(rs) for rs in runs.values()), default=0),
                "heldout_pairs": len(prompts),
                "before": {k: v if isinstance(v, list) else round(v, 5) for k, v in base.items()
                           if k != "per_pair_last_frame_reward"},
                "after": summary, "gain_vs_before": gains, "runs": runs,
                "frame_diff_profile": {  # mean over seeds, per consecutive pixel-frame pair
                    mode: [round(statistics.fmean(col), 5) for col in zip(*(r["frame_diff_profile"] for r in rs),
                                                                         strict=True)]
                    for mode, rs in runs.items()}}

    for seed in range(a.first_seed, a.first_seed + a.seeds):  # seeds outer: an interrupted run still holds paired modes
        for mode in a.modes:
            over: dict[str, Any] = {"method_args": {"frames": mode}}
            if mode == "random" or a.dmd_weight > 0 or a.grad == "all":
                over["sampler_args"] = {"grad": "all"}
            if a.dmd_weight > 0:
                over["method_args"]["dmd_weight"] = a.dmd_weight
            recipe = _recipe("reward_forcing_reward.yaml", model=str(start), seed=seed, max_steps=a.steps,
                             reward=a.reward, reward_args=reward_args,
                             learning_rate=a.lr, prompts_per_step=a.batch, report_to="none", save_model_at_end=False,
                             output_dir=str(REPO / f"out/tiny/{a.name}_{mode}_s{seed}"), **over)
            out = Path(recipe["output_dir"])
            if out.exists():
                import shutil

                shutil.rmtree(out)
            trainer, secs = _train(recipe)
            _ema_weights(trainer)
            ev, vids = _reward_eval(trainer.policy, prompts, seeds, reward)
            # the held-out pairs are the same before and after: the gain's s.e. over pairs (paired)
            ev["last_frame_gain_over_pairs"] = _mean_se([x - y for x, y in zip(
                ev.pop("per_pair_last_frame_reward"), base["per_pair_last_frame_reward"], strict=True)])
            ev["last_frame_gain_over_pairs"].pop("values")
            ev["train_seconds"] = round(secs, 1)
            ev["seed"] = seed
            print(mode, seed, ev, flush=True)
            runs.setdefault(mode, []).append(ev)
            if seed == a.first_seed:  # every frame of a few held-out clips, per arm: what the numbers mean
                strips[mode] = vids[strip_items]
                save_strips(RESULTS / f"{a.name}_frames.png", strips, [prompts[i] for i in strip_items],
                            f"{a.name}: seed {seed}, EMA weights, every pixel frame")
            _save(a.name, results())  # after every run: partial results survive an interruption
            (RESULTS / f"{a.name}.md").write_text(reward_table(results()))
    return 0


def save_strips(path: Path, videos: dict[str, Tensor], prompts: list[str], title: str) -> None:
    """One row of every pixel frame per (held-out clip, arm): ``videos[arm]`` is ``[N, 3, F, H, W]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(videos)
    n, f = len(prompts), next(iter(videos.values())).shape[2]
    fig, axes = plt.subplots(n * len(arms), f, figsize=(0.9 * f + 2.4, 0.95 * n * len(arms)), squeeze=False)
    for i, prompt in enumerate(prompts):
        for j, arm in enumerate(arms):
            row = i * len(arms) + j
            for k in range(f):
                img = ((videos[arm][i, :, k].permute(1, 2, 0).float().numpy() + 1) / 2).clip(0, 1)
                axes[row, k].imshow(img, interpolation="nearest")
                axes[row, k].set_xticks([])
                axes[row, k].set_yticks([])
                if row == 0:
                    axes[row, k].set_title(f"frame {k}", fontsize=7)
            label = (prompt.replace(" moving", "\nmoving").replace(" on a", " on") + "\n" if j == 0 else "") + arm
            axes[row, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reward_table(res: dict[str, Any]) -> str:
    """The stage-2 results file as a markdown table: before, then each mode's after (mean +- s.e. over seeds)."""
    keys = [k for k in REWARD_KEYS if all(k in v for v in res["after"].values())]
    name = res.get("reward", "alignment")
    head = {"last_frame_reward": f"held-out reward R(last frame), R = {name}",
            "frames_reward": "R per frame, mean over frames", "last_frame_alignment": "alignment (last frame)",
            "video_alignment": "whole-video alignment", "motion": "motion (mean abs frame diff)",
            "color_acc": "colour acc", "motion_acc": "motion acc", "dynamic_degree": "dynamic degree (travel >= 3 px)",
            "travel_px": "object travel (px)"}
    if name == "alignment":  # the first files: R is the alignment, its last-frame column is not repeated
        keys = [k for k in keys if k != "last_frame_alignment"]
    lines = [f"Stage 2 on tiny-wan from `{res['start']}`: {res['steps']} steps, lr {res['lr']}, batch {res['batch']}, "
             f"{res['heldout_pairs']} held-out (caption, seed) pairs; after = EMA weights, mean +- s.e. over "
             f"training seeds (n shown). Command: `{res['command']}`.", "",
             "| | " + " | ".join(head[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|",
             "| before (stage-1 model) | " + " | ".join(f"{res['before'][k]:.4f}" for k in keys if k in res["before"])
             + " |"]
    for mode, v in res["after"].items():
        n = v[keys[0]]["n"]
        lines.append(f"| {mode} frame{'s' if mode == 'random' else ''} (n={n} seeds) | "
                     + " | ".join(f"{v[k]['mean']:.4f} +- {v[k]['se']:.4f}" for k in keys) + " |")
    for mode, v in res["gain_vs_before"].items():
        lines.append(f"| gain, {mode} | " + " | ".join(f"{v[k]['mean']:+.4f} +- {v[k]['se']:.4f}" for k in keys
                                                     if k in res["before"]) + " |")
    lines += ["", "Per run, the held-out reward gain over the same pairs (paired s.e. over pairs):", ""]
    for mode, rs in res["runs"].items():
        lines.append(f"* {mode}: " + ", ".join(f"seed {r.get('seed', i)}: {r['last_frame_gain_over_pairs']['mean']:+.4f} +- "
                                                f"{r['last_frame_gain_over_pairs']['se']:.4f}"
                                                for i, r in enumerate(rs)))
    if "frame_diff_profile" in res:
        lines += ["", "Mean abs difference of each consecutive pixel-frame pair (0-1, 1-2, ...; mean over seeds):", ""]
        if isinstance(res["before"].get("frame_diff_profile"), list):
            lines.append("* before: " + ", ".join(f"{x:.4f}" for x in res["before"]["frame_diff_profile"]))
        lines += [f"* {mode}: " + ", ".join(f"{x:.4f}" for x in prof) for mode, prof in res["frame_diff_profile"].items()]
    return "\n".join(lines) + "\n"


def plot_reward_ablation(names: list[str], out: Path) -> None:
    """Last vs random frames, one group of bars per results file (one trained reward each): the motion measures
    after stage 2 (mean +- s.e. over seeds), the stage-1 model's value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    metrics = [("motion", "mean abs frame difference"), ("motion_acc", "motion acc (named direction)"),
               ("dynamic_degree", "dynamic degree (travel >= 3 px)")]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(1.6 * len(runs) + 1.5, 3.0 * len(metrics)))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, res in enumerate(runs):
            for j, mode in enumerate(("last", "random")):
                v = res["after"].get(mode, {}).get(key)
                if v is None:
                    continue
                ax.bar(i + 0.38 * j, v["mean"], width=0.36, yerr=v["se"], capsize=3, color=f"C{j}",
                       label=f"{mode} frame{'s' if mode == 'random' else ''}" if i == 0 else None)
            if key in res["before"]:
                ax.hlines(res["before"][key], i - 0.2, i + 0.58, colors="0.3", linestyles="--", lw=1,
                          label="before (stage 1)" if i == 0 else None)
        ax.set_xticks([i + 0.19 for i in range(len(runs))], [_reward_label(r) for r in runs], fontsize=7)
        ax.set_xlim(-0.4, len(runs) - 0.2)  # the same groups in every panel, with or without bars
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    seeds = sorted({r["seeds_done"] for r in runs})
    fig.suptitle(f"Reward-Forcing stage 2 on tiny-wan, 80 steps: last vs random frame supervision "
                 f"({'/'.join(map(str, seeds))} seeds, 92 held-out pairs, mean +- s.e.)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _reward_label(res: dict[str, Any]) -> str:
    name, args = res.get("reward", "alignment"), res.get("reward_args") or {}
    lr = "" if res.get("lr") == 1e-4 else f"\nlr {res.get('lr'):g}"
    if name == "imagereward":
        return ("world ImageReward\n+ composition" if "composition" in str(args.get("model")) else "world ImageReward") + lr
    weights = args.get("weights") or {}
    return name.replace("+", " +\n") + "".join(f"\n({k} x{w})" for k, w in weights.items()) + lr


# ----------------------------------------------------------------------------------------------- streaming
def run_stream(a: argparse.Namespace) -> int:
    """The streaming benchmark (``trl-video bench reward_forcing.stream``) on the stage-1 student, results here."""
    cmd_stream = import_benchmark("reward_forcing", "commands").cmd_stream  # the one implementation

    return cmd_stream(["--model", str(STAGE1 / "model_ema"), "--length", "3", "--reps", str(a.reps),
                       "--out", str(RESULTS / "stream.gif"), "--json", str(RESULTS / "stream.json")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ode")
    o.add_argument("--steps", type=int, default=400)
    o.add_argument("--chunk-size", type=int, default=1)
    o.add_argument("--eval-seeds", type=int, default=2)
    r = sub.add_parser("reward")
    r.add_argument("--modes", nargs="+", default=["last", "random"])
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--first-seed", type=int, default=0, help="training seeds first-seed .. first-seed + seeds - 1")
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--lr", type=float, default=3e-5)
    r.add_argument("--batch", type=int, default=8, help="prompts per step")
    r.add_argument("--dmd-weight", type=float, default=0.0)
    r.add_argument("--grad", choices=["auto", "all"], default="auto",
                   help="sampler grad: auto = last chunk for last-frame rewards, every chunk for random frames / DMD; "
                        "all = every chunk for every mode (separates the frame choice from where the graph is kept)")
    r.add_argument("--eval-seeds", type=int, default=2)
    r.add_argument("--reward", default="alignment", help="the trained reward (a registered name or `a+b`)")
    r.add_argument("--reward-args", default="{}", help="its reward_args as JSON, e.g. "
                   "'{\"weights\": {\"sharpness\": 1.0}}'")
    r.add_argument("--name", default="reward_last_vs_random")
    sub.add_parser("plot-ode", help="redraw results/ode_init.png from results/ode_init.json")
    pr = sub.add_parser("plot-reward", help="results/reward_ablation.png from stage-2 results files")
    pr.add_argument("names", nargs="+", help="results/NAME.json files (each: last and random modes)")
    t = sub.add_parser("table-reward", help="rewrite results/NAME.md from results/NAME.json")
    t.add_argument("name", nargs="?", default="reward_last_vs_random")
    s = sub.add_parser("stream")
    s.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "table-reward":
        (RESULTS / f"{a.name}.md").write_text(reward_table(json.loads((RESULTS / f"{a.name}.json").read_text())))
        print((RESULTS / f"{a.name}.md").read_text())
        return 0
    if a.cmd == "plot-reward":
        missing = [n for n in a.names if not (RESULTS / f"{n}.json").exists()]
        if missing:
            raise TrlVideoError(f"no results file {RESULTS / missing[0]}.json")
        plot_reward_ablation(a.names, RESULTS / "reward_ablation.png")
        print(f"plot: {RESULTS / 'reward_ablation.png'}")
        return 0
    if a.cmd == "plot-ode":
        plot_ode(json.loads((RESULTS / "ode_init.json").read_text()), RESULTS / "ode_init.png")
        return 0
    return {"ode": run_ode, "reward": run_reward, "stream": run_stream}[a.cmd](a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrlVideoError as exc:  # bad input: one line, exit 2 (as the trl-video command line)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
