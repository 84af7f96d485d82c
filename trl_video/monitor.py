"""Reward-hacking monitor for ``trl-video eval``: is the trained reward rising for the wrong reasons?

Besides the trained reward it reports, before and after training on the same (prompt, seed) pairs:

* held-out rewards: every evaluated reward the run was not trained on (a hacked reward rises alone);
* distance to reference samples: on the embedded world, the Frechet distance between clip features of the
  samples and of the world's ground-truth clips for the same captions and seeds (:func:`evaluation.video_features`,
  not standardised: the features share units (fractions of the frame, colour levels), and one fixed scale keeps
  the checkpoints' distances comparable; scaling by the reference set's spread alone inflated features the
  reference holds nearly constant), with its bootstrap standard error;
* sample diversity: mean pairwise Euclidean distance between the samples' features (a policy collapsing onto
  one video drives it to 0);

Both numbers come from the package's ``evaluate`` modules (``frechet_distance``, ``diversity``), the same ones
``feature_metrics`` reports, so there is one implementation of each.
* across the run's checkpoints: trained reward vs distance, one point per checkpoint
  (``reward_vs_distance.png``): reward going up while the distance goes up is the hacking signature.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import world


def world_reference(prompts: list[str], seeds: list[int]) -> Tensor | None:
    """Ground-truth clips for world captions (``None`` when a prompt is not a world caption)."""
    if any(world.Caption.parse(p) is None for p in prompts):
        return None
    return world.render_batch(prompts, seeds).float()


@cache
def _metric(name: str) -> Any:
    from .evaluation import load_metric

    return load_metric(name)


def diversity(features: Tensor) -> float:
    """Mean pairwise Euclidean distance over all pairs of distinct samples (the ``diversity`` module)."""
    if len(features) < 2:
        return 0.0
    groups = ["all"] * len(features)  # the module's per-prompt part is not used here
    return float(_metric("diversity").compute(predictions=features.tolist(), references=groups)["diversity"])


def frechet(features: Tensor, ref_feats: Tensor, num_bootstrap: int = 200) -> dict[str, float | None]:
    """Frechet distance of ``features`` to ``ref_feats`` and its bootstrap s.e. (the ``frechet_distance`` module)."""
    res = _metric("frechet_distance").compute(predictions=features.tolist(), references=ref_feats.tolist(),
                                              num_bootstrap=num_bootstrap)
    return {"frechet_distance": res["frechet_distance"], "frechet_distance_se": res["frechet_distance_se"]}


def distance_stats(pix: Tensor, ref_feats: Tensor | None) -> dict[str, float | None]:
    from .evaluation import video_features

    feats = video_features(pix.cpu())
    if ref_feats is None:
        return {"frechet_distance": None, "frechet_distance_se": None, "diversity": diversity(feats)}
    return {**frechet(feats, ref_feats), "diversity": diversity(feats)}


def summarise(per_reward: dict[str, Any], trained: str, before: dict[str, Any], after: dict[str, Any],
              reference: dict[str, Any] | None) -> dict[str, Any]:
    heldout = {n: {"before": v["before"]["mean"], "after": v["after"]["mean"], "gain": v["gain"]["mean"],
                   "gain_sem": v["gain"]["sem"]} for n, v in per_reward.items() if n != trained}
    out: dict[str, Any] = {
        "trained_reward": trained,
        "heldout_rewards": heldout,
        "frechet_distance_to_reference": {"before": before["frechet_distance"], "after": after["frechet_distance"],
                                          "before_se": before["frechet_distance_se"],
                                          "after_se": after["frechet_distance_se"]},
        "diversity": {"before": before["diversity"], "after": after["diversity"]},
        "reference": reference,
    }
    if reference is not None:
        out["diversity"]["reference"] = reference["diversity"]
    return out


def checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The run's config recorded in a checkpoint's ``trainer_state.json``."""
    return dict(json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {}))


def checkpoint_policy(base_model: str, checkpoint: Path, prepare: Callable[[Any], None] | None = None) -> Any:
    """The base model with a checkpoint's trainable weights (its LoRA added as the run configured it);
    ``prepare`` adapts the loaded base first, as the method did before training (``EvalSampling.prepare``)."""
    from safetensors.torch import load_file

    from .models.policy import load_policy

    cfg = checkpoint_config(checkpoint)
    policy = load_policy(cfg.get("model") or base_model, num_frames=cfg.get("num_frames"), height=cfg.get("height"),
                         width=cfg.get("width"))
    if prepare is not None:
        prepare(policy)
    if cfg.get("use_peft", cfg.get("use_lora", True)):
        rank = cfg.get("lora_r", cfg.get("lora_rank", 8))
        policy.add_lora(rank, cfg.get("lora_alpha"), list(cfg.get("lora_target_modules") or []) or None)
    params = dict(policy.transformer.named_parameters())
    tensors = load_file(str(checkpoint / "trainable.safetensors"))
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("policy/") and k[len("policy/"):] in params:
                params[k[len("policy/"):]].copy_(v)
    return policy.eval()


@torch.no_grad()
def checkpoint_curve(base_model: str, output_dir: Path, prompts: list[str], seeds: list[int], reward: Any,
                     ref_feats: Tensor | None, num_steps: int, device: Any = "cpu") -> list[dict[str, Any]]:
    """Trained reward and distance to the reference for every ``checkpoint-N`` of a run, each sampled as its run's
    method is evaluated (:func:`trl_video.evaluation.eval_sampling_for_run`)."""
    from .evaluation import eval_sampling_for_run
    from .trainer import find_checkpoints

    points = []
    for ck in find_checkpoints(output_dir):
        sampling = eval_sampling_for_run(checkpoint_config(ck), num_steps)
        policy = checkpoint_policy(base_model, ck, sampling.prepare).to(device)
        lat = sampling.sample(policy, prompts, seeds, None)
        pix = torch.cat([policy.decode(lat[i:i + 16]) for i in range(0, len(lat), 16)])
        r = reward(pix if reward.space == "pixel" else lat, prompts).float()
        points.append({"step": int(ck.name.split("-")[-1]), "reward": float(r.mean()),
                       **distance_stats(pix, ref_feats)})
    return points


def plot_reward_vs_distance(points: list[dict[str, Any]], out: Path, reward_name: str) -> bool:
    """Trained reward (x) against the Frechet distance to the reference (y), one labelled point per step."""
    pts = [p for p in points if p.get("frechet_distance") is not None]
    if len(pts) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(pts, key=lambda p: p["step"])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs, ys = [p["reward"] for p in pts], [p["frechet_distance"] for p in pts]
    ax.plot(xs, ys, "-", color="0.7", zorder=1)
    sc = ax.scatter(xs, ys, c=[p["step"] for p in pts], cmap="viridis", zorder=2)
    for p in pts:
        ax.annotate(str(p["step"]), (p["reward"], p["frechet_distance"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel(f"trained reward ({reward_name})")
    ax.set_ylabel("Frechet distance to ground truth")
    ax.set_title("reward vs distance across checkpoints (up-right = hacking)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
