"""Evaluation: fixed seeds, before/after rewards, GIF/PNG grids, reward curve, ``eval_results.json``."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import TrlVideoError
from .stats import mean_sem

if TYPE_CHECKING:
    from .plan import Plan
    from .plugins import Registry


@torch.no_grad()
def sample_videos(policy: Any, prompts: list[str], seeds: list[int], num_steps: int = 20, transformer: Any = None,
                  batch_size: int = 16, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic ODE samples (one noise per seed) -> normalised latents ``[N, C, F, H, W]``.

    ``guidance_scale > 1``: classifier-free guidance (:meth:`VideoPolicy.predict_guided`; the tiny bases are
    trained with 10% empty prompts).
    """
    if len(prompts) != len(seeds):
        raise TrlVideoError(f"sample_videos: {len(prompts)} prompts but {len(seeds)} seeds")
    from .sampling import ode_sample, sample_batched

    grid = policy.schedule.timesteps(num_steps)
    return sample_batched(policy, prompts, seeds, lambda x, emb, _: ode_sample(
        policy, x, emb, grid, net=transformer, guidance_scale=guidance_scale), batch_size)


#: ``(policy, prompts, seeds, transformer) -> latents [N, C, F, H, W]``: how evaluation draws one video per
#: (prompt, seed) pair, the same video for the same pair whatever the batch; ``transformer`` (or None) replaces
#: the policy's network (the reference / base weights)
EvalSampler = Callable[[Any, list[str], list[int], Any], torch.Tensor]


@dataclass
class EvalSampling:
    """How evaluation samples a run's policy (training's eval, ``trl-video eval``, the checkpoint curve).

    ``sample``: the run's sampler component's ``evaluation_sampler()`` when it has one (a generator that is only
    valid under its own sampling loop, e.g. Reward-Forcing's causal self-rollout), else the deterministic ODE
    sampler with ``eval_num_steps``. ``prepare``: adapts a freshly loaded base model as the method did before
    training (``MethodSpec.prepare_policy``), so that "before" is the model the run started from.
    """

    name: str
    sample: EvalSampler
    prepare: Callable[[Any], None] | None = None


def ode_sampling(num_steps: int) -> EvalSampling:
    """The default: :func:`sample_videos`, ``num_steps`` deterministic ODE steps."""
    return EvalSampling(f"ode-{num_steps}", lambda policy, prompts, seeds, transformer: sample_videos(
        policy, prompts, seeds, num_steps, transformer=transformer))


def eval_sampling(plan: Plan, sampler: Any, num_steps: int) -> EvalSampling:
    """The :class:`EvalSampling` of a run: its ``plan`` (method) and its built sampler component."""
    own = getattr(sampler, "evaluation_sampler", None)
    custom = own() if callable(own) else None
    base = ode_sampling(num_steps) if custom is None else EvalSampling(plan.components["sampler"][0], custom)
    prepare = plan.method.prepare_policy
    if prepare is not None:
        method_config = plan.method_config
        base.prepare = lambda policy: prepare(policy, method_config)
    return base


def eval_sampling_for_run(run: dict[str, Any], num_steps: int, registry: Registry | None = None) -> EvalSampling:
    """The :class:`EvalSampling` of a recorded run: ``run`` holds its config's ``method``, ``method_args``,
    ``sampler`` and ``sampler_args`` (a checkpoint's ``trainer_state.json`` config, or the ``run`` entry a saved
    model's ``trl_video.json`` carries); a model that records no method is sampled with the ODE sampler."""
    if not run.get("method"):
        return ode_sampling(num_steps)
    from .config import VideoRewardConfig
    from .plan import resolve_plan
    from .plugins import get_registry

    registry = registry or get_registry()
    keys = ("method", "method_args", "sampler", "sampler_args")
    config = VideoRewardConfig.from_dict({k: run[k] for k in keys if run.get(k) is not None}, where="recorded run")
    plan = resolve_plan(config, registry)
    name, args = plan.components["sampler"]
    return eval_sampling(plan, registry.create("sampler", name, **args), num_steps)


def to_uint8_frames(videos: torch.Tensor) -> np.ndarray:
    """``[N, 3, F, H, W]`` in [-1, 1] -> ``[N, F, H, W, 3]`` uint8."""
    v = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def video_grid(videos: torch.Tensor, cols: int = 4, upscale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile N clips into one clip ``[F, H', W', 3]`` (nearest upscaling so small clips are visible)."""
    frames = to_uint8_frames(videos)
    n, f, h, w, _ = frames.shape
    frames = frames.repeat(upscale, 2).repeat(upscale, 3)
    h, w = h * upscale, w * upscale
    rows = math.ceil(n / cols)
    grid = np.full((f, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = frames[i]
    return grid


def save_gif(path: Path, clip: np.ndarray, fps: int = 6) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, clip, duration=int(1000 / fps), loop=0)


def save_before_after_png(path: Path, before: torch.Tensor, after: torch.Tensor, prompts: list[str], n: int = 6,
                          upscale: int = 3) -> None:
    """Rows: prompts; columns: first/middle/last frame before, then after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(prompts))
    fb, fa = to_uint8_frames(before[:n]), to_uint8_frames(after[:n])
    idx = [0, fb.shape[1] // 2, fb.shape[1] - 1]
    fig, axes = plt.subplots(n, 6, figsize=(6 * 1.3, n * 1.45))
    axes = np.atleast_2d(axes)
    for r in range(n):
        for j, f in enumerate(idx):
            for k, (src, tag) in enumerate(((fb, "before"), (fa, "after"))):
                ax = axes[r, j + 3 * k]
                ax.imshow(src[r, f].repeat(upscale, 0).repeat(upscale, 1))
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{tag} f{f}", fontsize=7)
        axes[r, 0].set_ylabel(prompts[r].replace(" moving", "\nmoving").replace(" on a", "\non a"), fontsize=5,
                              rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_curve(metrics_path: Path, out: Path, key: str = "reward_mean") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    if not rows:
        return False
    steps = np.array([r["step"] for r in rows])
    vals = np.array([r[key] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, vals, alpha=0.35, label=key)
    k = max(1, len(vals) // 20)
    if k > 1:
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=f"{key} (moving avg {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def evaluate(policy_after: Any, prompts: list[str], seeds: list[int], rewards: dict[str, Any], out_dir: str | Path, *,
             policy_before: Any = None, transformer_before: Any = None, num_steps: int = 20,
             metrics_path: str | Path | None = None, main_reward: str | None = None,
             prompts_source: str | None = None, checkpoints_dir: str | Path | None = None,
             base_model: str | None = None, sampling: EvalSampling | None = None) -> dict[str, Any]:
    """Score the same (prompt, seed) pairs before and after; write JSON (``evaluate.save``), GIFs, PNG grid and
    reward curve. The metrics are the package's ``evaluate`` modules (:func:`load_metric`): ``reward_gain`` per
    reward, ``frechet_distance`` and ``diversity`` on :func:`video_features`; plus the reward-hacking monitor
    (:mod:`trl_video.monitor`): held-out rewards, distance to the world's ground truth, diversity, and, given the
    run's ``checkpoints_dir`` and ``base_model``, reward vs distance per checkpoint. ``sampling``: how both
    models are sampled (:class:`EvalSampling`; default: ``num_steps`` ODE steps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_reward = main_reward or next(iter(rewards))
    sampling = sampling or ode_sampling(num_steps)
    lat_after = sampling.sample(policy_after, prompts, seeds, None)
    before_policy = policy_before or policy_after
    if transformer_before is not None or policy_before is not None:
        lat_before = sampling.sample(before_policy, prompts, seeds, transformer_before)
    else:
        with policy_after.reference() as ref:
            lat_before = sampling.sample(policy_after, prompts, seeds, ref)
    with torch.no_grad():
        pix_after = torch.cat([policy_after.decode(lat_after[i:i + 16]) for i in range(0, len(prompts), 16)])
        pix_before = torch.cat([before_policy.decode(lat_before[i:i + 16]) for i in range(0, len(prompts), 16)])
    per_reward: dict[str, Any] = {}
    gains: dict[str, Any] = {}
    reward_gain = load_metric("reward_gain")
    for name, fn in rewards.items():
        with torch.no_grad():
            rb = fn(pix_before if fn.space == "pixel" else lat_before, prompts).float().cpu()
            ra = fn(pix_after if fn.space == "pixel" else lat_after, prompts).float().cpu()
        per_reward[name] = {"before": mean_sem(rb), "after": mean_sem(ra), "gain": mean_sem(ra - rb)}
        gains[name] = reward_gain.compute(predictions=ra.double().tolist(), references=rb.double().tolist())
    main = gains[main_reward]
    results = {
        "reward": main_reward,
        "reward_before": main["before"], "reward_after": main["after"],
        "gain": main["gain"], "gain_sem": main["gain_sem"], "gain_in_sem": main["gain_in_sem"],
        "per_reward": per_reward, "metrics": {"reward_gain": gains, **feature_metrics(pix_before, pix_after,
                                                                                      prompts, seeds)},
        "num_prompts": len(prompts), "prompts_source": prompts_source, "seeds": list(seeds),
        "prompts": list(prompts), "num_steps": num_steps, "sampler": sampling.name,
    }
    results["monitor"] = _hacking_monitor(per_reward, main_reward, rewards[main_reward], prompts, seeds, pix_before,
                                          pix_after, out, num_steps, checkpoints_dir, base_model,
                                          policy_after.device)
    save_results(out / "eval_results.json", results)
    n = min(16, len(prompts))
    save_gif(out / "samples_before.gif", video_grid(pix_before[:n]))
    save_gif(out / "samples_after.gif", video_grid(pix_after[:n]))
    save_before_after_png(out / "samples_before_after.png", pix_before, pix_after, prompts)
    if metrics_path is not None:
        plot_reward_curve(Path(metrics_path), out / "reward_curve.png")
    return results


def _hacking_monitor(per_reward: dict[str, Any], trained: str, reward: Any, prompts: list[str], seeds: list[int],
                     pix_before: torch.Tensor, pix_after: torch.Tensor, out: Path, num_steps: int,
                     checkpoints_dir: str | Path | None, base_model: str | None, device: Any) -> dict[str, Any]:
    from . import monitor

    ref = monitor.world_reference(prompts, seeds)
    ref_feats = video_features(ref) if ref is not None else None
    before, after = monitor.distance_stats(pix_before, ref_feats), monitor.distance_stats(pix_after, ref_feats)
    reference = monitor.distance_stats(ref, ref_feats) if ref is not None else None
    res = monitor.summarise(per_reward, trained, before, after, reference)
    if checkpoints_dir is not None and base_model is not None:
        points = [{"step": 0, "reward": per_reward[trained]["before"]["mean"], **before}]
        points += monitor.checkpoint_curve(base_model, Path(checkpoints_dir), prompts, seeds, reward, ref_feats,
                                           num_steps, device)
        res["checkpoints"] = points
        if monitor.plot_reward_vs_distance(points, out / "reward_vs_distance.png", trained):
            res["plot"] = "reward_vs_distance.png"
    return res


def eval_pairs(prompts_source: str, n: int, seed: int = 1234) -> tuple[list[str], list[int]]:
    from .data import load_prompts

    pool = load_prompts(prompts_source)
    if not pool:
        raise TrlVideoError(f"no prompts in '{prompts_source}'")
    prompts = [pool[i % len(pool)] for i in range(n)]
    seeds = [seed + i for i in range(n)]
    return prompts, seeds


def evaluate_trainer(trainer: Any) -> dict[str, Any]:
    """End-of-training evaluation: the base (adapter disabled / frozen copy) vs the trained policy, both sampled
    as the run's sampler says (:func:`eval_sampling`)."""
    cfg = trainer.config
    if not trainer.is_main:
        return {}
    from .plan import build_reward

    prompts, seeds = eval_pairs(cfg.eval_prompts, cfg.eval_num_prompts)
    rewards = {cfg.reward: trainer.reward}
    for name in cfg.eval_rewards:
        rewards[name] = build_reward(trainer.registry, name, {})
    trainer.policy.eval()
    results = evaluate(trainer.policy, prompts, seeds, rewards, trainer.output_dir / "eval",
                       num_steps=cfg.eval_num_steps, metrics_path=trainer.output_dir / "metrics.jsonl",
                       main_reward=cfg.reward, prompts_source=cfg.eval_prompts, checkpoints_dir=trainer.output_dir,
                       base_model=cfg.model, sampling=eval_sampling(trainer.plan, trainer.sampler, cfg.eval_num_steps))
    return results


# ------------------------------------------------------------------------------------------ evaluate modules
METRICS_DIR = Path(__file__).parent / "metrics"
METRICS = ("reward_gain", "frechet_distance", "diversity")


@functools.cache
def load_metric(name: str) -> Any:
    """One of the package's ``evaluate`` modules (``trl_video/metrics/<name>/<name>.py``), loaded with
    ``evaluate.load(<local path>)``: reward_gain, frechet_distance, diversity."""
    import evaluate

    if name not in METRICS:
        raise TrlVideoError(f"unknown metric '{name}' (trl-video ships {', '.join(METRICS)})")
    return evaluate.load(str(METRICS_DIR / name))


def save_results(path: Path, results: dict[str, Any]) -> None:
    """``evaluate.save`` (the results plus timestamp, git commit, library and Python versions)."""
    import evaluate

    # evaluate.save asks git for the commit; outside a checkout git complains on the inherited stderr
    with open(os.devnull, "w") as devnull:
        saved = os.dup(2)
        os.dup2(devnull.fileno(), 2)
        try:
            evaluate.save(str(path), **results)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def video_features(pix: torch.Tensor) -> torch.Tensor:
    """13 interpretable statistics per decoded clip ``[B, 3, F, H, W]`` in [-1, 1] (a hand-made stand-in for the
    I3D features of FVD, which need hub weights): object area and its change over time, object colour (3) and its
    change, background level, mean object position (2) and displacement (2), spatial sharpness, frame difference."""
    x = (pix.float().clamp(-1, 1) + 1) / 2
    b, _, f, h, w = x.shape
    sat = x.amax(1) - x.amin(1)  # [B, F, H, W]; world objects are saturated, backgrounds grey
    m = torch.sigmoid((sat - 0.4) * 20)
    msum = m.flatten(2).sum(-1) + 1e-3  # [B, F]
    area_t = m.flatten(2).mean(-1)
    col_t = (x * m[:, None]).flatten(3).sum(-1) / msum[:, None]  # [B, 3, F]
    bg = (x.mean(1) * (1 - m)).flatten(1).sum(1) / ((1 - m).flatten(1).sum(1) + 1e-3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    cx = (m * xx).flatten(2).sum(-1) / msum
    cy = (m * yy).flatten(2).sum(-1) / msum
    fr = torch.arange(f, dtype=torch.float32) - (f - 1) / 2

    def slope(c: torch.Tensor) -> torch.Tensor:  # least-squares displacement over the clip
        return (c * fr).sum(-1) / fr.pow(2).sum() * (f - 1)

    sharp = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3, 4)) + (x[..., 1:] - x[..., :-1]).abs().mean(
        (1, 2, 3, 4))
    tdiff = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2, 3, 4))
    return torch.stack([area_t.mean(1), area_t.std(1), *col_t.mean(2).unbind(1), col_t.std(2).mean(1), bg,
                        cx.mean(1), cy.mean(1), slope(cx), slope(cy), sharp, tdiff], 1).double()


def feature_metrics(pix_before: torch.Tensor, pix_after: torch.Tensor, prompts: list[str],
                    seeds: list[int], num_bootstrap: int = 200) -> dict[str, Any]:
    """Frechet distances (after vs before; each vs the world's ground-truth clips when every prompt is a world
    caption) and diversity (overall and across the seeds of one prompt) on :func:`video_features`."""
    from . import world

    fb, fa = video_features(pix_before).tolist(), video_features(pix_after).tolist()
    fd, div = load_metric("frechet_distance"), load_metric("diversity")
    fds = {"after_vs_before": fd.compute(predictions=fa, references=fb, num_bootstrap=num_bootstrap)}
    if all(world.Caption.parse(p) is not None for p in prompts):
        real = video_features(world.render_batch(prompts, [s + 1_000_003 for s in seeds])).tolist()
        fds["before_vs_world"] = fd.compute(predictions=fb, references=real, num_bootstrap=num_bootstrap)
        fds["after_vs_world"] = fd.compute(predictions=fa, references=real, num_bootstrap=num_bootstrap)
    return {"frechet_distance": {k: v["frechet_distance"] for k, v in fds.items()},
            "frechet_distance_se": {k: v["frechet_distance_se"] for k, v in fds.items()},
            "diversity": {"before": div.compute(predictions=fb, references=list(prompts)),
                          "after": div.compute(predictions=fa, references=list(prompts))}}
