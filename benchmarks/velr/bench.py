"""VELR benchmarks (``benchmarks/velr``, from a checkout), ``trl-video bench velr.<name>`` (the former names
``velr-build-dataset``, ``velr-pretrain``, ``velr-eval-lrm``, ``velr-compare`` and ``memory`` still work):

* ``build-dataset``: (latent, prompt, pixel reward) HF dataset from synthetic world clips encoded with
  the policy's VAE plus the policy's own samples; the reward is a pixel reward on the DECODED latents.
* ``pretrain``: Huber pre-training of the ensemble (each member on its own shuffles); MSE / Pearson per
  member and for the ensemble on a held-out split, and the paper-Table-3-style row for 1/3/5/10 members.
* ``eval-lrm``: the same table for a saved LRM, and the ensemble variance in-distribution vs on
  out-of-distribution latents (re-noised latents, pure noise, held-out-caption clips, another model's samples).
* ``compare``: two short VELR runs, online alignment on vs off: LRM-vs-true reward gap curves and the
  TRUE pixel reward before/after (decoded, scored at evaluation).
* ``memory``: peak memory of one VELR step vs one pixel-space ReFL step (the core's ``refl``), each in a
  fresh subprocess (torch.profiler ``profile_memory`` peak of the step + ru_maxrss growth), and the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vidrl_plugin_velr.lrm import LRMReward, aggregate, huber_loss, last_token, member_variance, pearson

DATASET_META = "velr_dataset.json"


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ dataset
@torch.no_grad()
def truncated_x0_samples(policy: Any, prompts: list[str], seeds: list[int], num_steps: int = 20,
                         end_range: tuple[float, float] = (0.4, 0.7), batch: int = 16) -> torch.Tensor:
    """What VELR's sampler hands the LRM: ODE down to a random step ``t_end`` (a fraction of the grid drawn in
    ``end_range`` per batch), then a one-shot x0 prediction."""
    from trl_video.sampling import ode_sample, sample_batched

    grid = policy.schedule.timesteps(num_steps)
    g = torch.Generator().manual_seed(int(seeds[0]) if seeds else 0)
    lo, hi = int(end_range[0] * num_steps), int(end_range[1] * num_steps)

    def truncated(x: torch.Tensor, emb: torch.Tensor, _seeds: list[int]) -> torch.Tensor:
        end = int(torch.randint(lo, hi + 1, (1,), generator=g))  # one t_end per batch
        x = ode_sample(policy, x, emb, grid, end=end)
        return policy.predict_x0(x, grid[end].expand(len(x)), emb)

    return sample_batched(policy, prompts, seeds, truncated, batch)


def build_dataset(model: str, out: str, n_world: int = 256, n_policy: int = 256, num_steps: int = 20,
                  pixel_reward: str = "alignment", split: str = "train", seed: int = 0, batch: int = 16,
                  policy: Any = None, n_x0: int = 0) -> dict[str, Any]:
    """World clips (encoded with the policy's VAE) + the policy's ODE samples (+ ``n_x0`` truncated one-shot
    x0 predictions, VELR's own inputs), each scored by a pixel reward on its decoded latents. Saved with
    ``save_to_disk`` (columns prompt, latents, reward, source)."""
    import datasets

    from trl_video import world
    from trl_video.data import offline_features
    from trl_video.evaluation import sample_videos
    from trl_video.models.policy import load_policy
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    policy = policy or load_policy(model)
    reward = build_reward(get_registry(), pixel_reward, {})
    recs = world.world_examples(split, n_world + n_policy + n_x0, seed=seed + 11)
    prompts_w = [r["prompt"] for r in recs[:n_world]]
    seeds_w = [r["seed"] for r in recs[:n_world]]
    prompts_p = [r["prompt"] for r in recs[n_world:n_world + n_policy]]
    prompts_x = [r["prompt"] for r in recs[n_world + n_policy:]]
    lat, src = [], []
    with torch.no_grad():
        for i in range(0, n_world, batch):
            clips = world.render_batch(prompts_w[i:i + batch], seeds_w[i:i + batch])
            lat.append(policy.encode_video(clips).float().cpu())
            src += ["world"] * len(clips)
        if n_policy:
            lat.append(sample_videos(policy, prompts_p, [seed * 100003 + 7 + i for i in range(n_policy)], num_steps,
                                     batch_size=batch).float().cpu())
            src += ["policy"] * n_policy
        if n_x0:
            lat.append(truncated_x0_samples(policy, prompts_x, [seed * 100003 + 50021 + i for i in range(n_x0)],
                                            num_steps, batch=batch).float().cpu())
            src += ["policy_x0"] * n_x0
        latents = torch.cat(lat)
        prompts = prompts_w + prompts_p + prompts_x
        rewards = torch.cat([reward(policy.decode(latents[i:i + batch]), prompts[i:i + batch]).float().cpu()
                             for i in range(0, len(prompts), batch)])
    ds = datasets.Dataset.from_dict({"prompt": prompts, "latents": latents.numpy(), "reward": rewards.tolist(),
                                     "source": src}, features=offline_features(tuple(latents.shape[1:])))
    ds.save_to_disk(out)
    meta = {"model": model, "pixel_reward": pixel_reward, "split": split, "n_world": n_world, "n_policy": n_policy,
            "n_x0": n_x0, "num_steps": num_steps, "seed": seed,
            "reward_mean": {s: float(rewards[[i for i, x in enumerate(src) if x == s]].mean()) for s in set(src)},
            "reward_std": float(rewards.std())}
    (Path(out) / DATASET_META).write_text(json.dumps(meta, indent=2))
    return meta


def build_dataset_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench velr.build-dataset",
                                 description="Build the LRM pre-training dataset (latent, prompt, pixel reward).")
    ap.add_argument("--model", default="tiny-cogvideox")
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=256, help="synthetic world clips (encoded with the VAE)")
    ap.add_argument("--policy", type=int, default=256, help="the policy's own ODE samples")
    ap.add_argument("--x0", type=int, default=0, help="truncated one-shot x0 predictions (VELR's LRM inputs)")
    ap.add_argument("--num-steps", type=int, default=20)
    ap.add_argument("--pixel-reward", default="alignment")
    ap.add_argument("--split", default="train", help="world caption split (train|heldout)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    meta = build_dataset(a.model, a.out, a.world, a.policy, a.num_steps, a.pixel_reward, a.split, a.seed, n_x0=a.x0)
    _log(json.dumps(meta, indent=2))
    _log(f"wrote {a.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def load_latent_dataset(path: str) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str], dict[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(path).with_format("torch")[:]
    meta_p = Path(path) / DATASET_META
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    return (ds["latents"].float(), list(ds["prompt"]), ds["reward"].float(), list(ds["source"]), meta)


# ------------------------------------------------------------------------------------------ metrics
def lrm_table(preds: torch.Tensor, target: torch.Tensor, sizes: tuple[int, ...] = (1, 3, 5, 10),
              how: str = "mean") -> dict[str, Any]:
    """``preds [N, B]``: per-member MSE / Pearson and the first-k-member ensembles' (members are trained
    independently, so the first k of N are an ensemble of k)."""
    members = [{"mse": float(((p - target) ** 2).mean()), "pearson": pearson(p, target)} for p in preds]
    table = {}
    for k in sizes:
        if k <= len(preds):
            agg = aggregate(preds[:k], how)
            table[str(k)] = {"mse": float(((agg - target) ** 2).mean()), "pearson": pearson(agg, target)}
    single = {"mse_mean": float(np.mean([m["mse"] for m in members])),
              "mse_std": float(np.std([m["mse"] for m in members])),
              "pearson_mean": float(np.mean([m["pearson"] for m in members]))}
    return {"members": members, "ensembles": table, "single_member_avg": single}


def _predict_all(lrm: LRMReward, latents: torch.Tensor, text: torch.Tensor, batch: int = 64) -> torch.Tensor:
    assert lrm.ensemble is not None
    with torch.no_grad():
        return torch.cat([lrm.ensemble(latents[i:i + batch], text[i:i + batch]) for i in range(0, len(latents), batch)],
                         1)


def _print_table(title: str, tab: dict[str, Any]) -> None:
    _log(f"{title}: members MSE {tab['single_member_avg']['mse_mean']:.3e} +- {tab['single_member_avg']['mse_std']:.3e}"
         f", Pearson {tab['single_member_avg']['pearson_mean']:.3f} (average single member)")
    _log("  k   | MSE     | Pearson")
    for k, row in tab["ensembles"].items():
        _log(f"  {k:<3} | {row['mse']:.3e} | {row['pearson']:.4f}")


# ------------------------------------------------------------------------------------------ pretraining
def pretrain(data: str, out: str, members: int = 10, epochs: int = 20, lr: float = 1e-4, batch: int = 4,
             delta: float = 1.0, heldout_frac: float = 0.2, widths: tuple[int, ...] = (32, 64, 128), heads: int = 4,
             layers: int = 2, seed: int = 0, model: str | None = None, policy: Any = None,
             log_every: int = 5) -> dict[str, Any]:
    """Huber pre-training of an ensemble; every member walks its own shuffles of the training split."""
    from trl_video.models.policy import load_policy

    latents, prompts, rewards, sources, meta = load_latent_dataset(data)
    model = model or meta.get("model")
    policy = policy or load_policy(model)
    emb, mask = policy.encode_prompts(prompts)
    text = last_token(emb, mask).float()
    n = len(prompts)
    g = torch.Generator().manual_seed(seed + 5)
    perm = torch.randperm(n, generator=g)
    n_held = max(1, int(round(n * heldout_frac)))
    held, train = perm[:n_held].sort().values, perm[n_held:].sort().values
    lrm = LRMReward(members=members, widths=widths, heads=heads, layers=layers, seed=seed)
    lrm.ensure_built(tuple(latents.shape[1:]), text.shape[-1])
    assert lrm.ensemble is not None
    ens = lrm.ensemble
    opt = torch.optim.AdamW(ens.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / batch)
    orders = [torch.zeros(0, dtype=torch.long) for _ in range(members)]
    history = []
    t0 = time.perf_counter()
    for ep in range(epochs):
        tot = 0.0
        for _ in range(steps_per_epoch):
            loss = torch.zeros(())
            for i in range(members):
                if len(orders[i]) < batch:
                    orders[i] = torch.cat([orders[i], train[torch.randperm(len(train), generator=g)]])
                rows, orders[i] = orders[i][:batch], orders[i][batch:]
                pred = ens.members[i](latents[rows], text[rows])
                loss = loss + huber_loss(pred, rewards[rows], delta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) / members
        row = {"epoch": ep + 1, "train_huber": tot / steps_per_epoch, "seconds": time.perf_counter() - t0}
        if (ep + 1) % log_every == 0 or ep + 1 == epochs:
            ph = _predict_all(lrm, latents[held], text[held])
            row["heldout_mse_ens"] = float(((ph.mean(0) - rewards[held]) ** 2).mean())
            row["heldout_pearson_ens"] = pearson(ph.mean(0), rewards[held])
            _log(json.dumps(row))
        history.append(row)
    ptr, ph = _predict_all(lrm, latents[train], text[train]), _predict_all(lrm, latents[held], text[held])
    report = {"train": lrm_table(ptr, rewards[train]), "heldout": lrm_table(ph, rewards[held]),
              "heldout_variance": float(member_variance(ph).mean()), "history": history,
              "n_train": len(train), "n_heldout": len(held), "epochs": epochs, "lr": lr, "batch": batch,
              "delta": delta, "reward_std_heldout": float(rewards[held].std()),
              "params_per_member": sum(p.numel() for p in ens.members[0].parameters())}
    lrm.save(out, extra={"text_model": model, "data": str(data), "heldout_indices": held.tolist(),
                         "pretrain": {k: v for k, v in report.items() if k != "history"}})
    (Path(out) / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    return report


def pretrain_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench velr.pretrain",
                                 description="Pre-train the ensemble LRM with the Huber loss (paper Eq. 6).")
    ap.add_argument("--data", required=True, help="folder written by velr-build-dataset")
    ap.add_argument("--out", required=True, help="LRM folder (reward_args {path: ...})")
    ap.add_argument("--model", help="policy whose text encoder embeds the prompts (default: the dataset's)")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3, help="paper App. C.1: about 3 epochs")
    ap.add_argument("--lr", type=float, default=1e-4, help="paper: 1e-4 CogVideoX-1.5, 2e-5 Wan-2.1")
    ap.add_argument("--batch", type=int, default=4, help="paper App. C.1: 4")
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--heldout-frac", type=float, default=0.2)
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rep = pretrain(a.data, a.out, a.members, a.epochs, a.lr, a.batch, a.delta, a.heldout_frac,
                   tuple(int(w) for w in a.widths.split(",")), a.heads, a.layers, a.seed, a.model)
    _print_table("train", rep["train"])
    _print_table("held-out", rep["heldout"])
    for i, m in enumerate(rep["heldout"]["members"]):
        _log(f"  member {i}: held-out MSE {m['mse']:.3e}, Pearson {m['pearson']:.4f}")
    _log(f"wrote {a.out} ({rep['params_per_member']} parameters per member)")
    return 0


# ------------------------------------------------------------------------------------------ evaluation
def eval_lrm(lrm_path: str, data: str | None = None, ood_model: str | None = None, n_ood: int = 64,
             noise_levels: tuple[float, ...] = (0.3, 0.6), policy: Any = None, seed: int = 0,
             ood_seed: int = 7) -> dict[str, Any]:
    from trl_video import world
    from trl_video.evaluation import sample_videos
    from trl_video.models.policy import load_policy

    lrm = LRMReward(path=lrm_path)
    data = data or lrm.meta["data"]
    latents, prompts, rewards, sources, meta = load_latent_dataset(data)
    policy = policy or load_policy(lrm.meta.get("text_model") or meta["model"])
    lrm.attach_text_encoder(policy.encode_prompts)
    held = torch.tensor(lrm.meta["heldout_indices"])
    z, ps, r = latents[held], [prompts[i] for i in held.tolist()], rewards[held]
    text = lrm.text_tokens(ps, torch.device("cpu"))
    preds = _predict_all(lrm, z, text)
    out: dict[str, Any] = {"heldout": lrm_table(preds, r)}
    var: dict[str, float] = {"in_distribution (held-out)": float(member_variance(preds).mean())}
    g = torch.Generator().manual_seed(seed + 99)
    sch = policy.schedule
    for t in noise_levels:  # re-noised along the model's own forward process
        zt = sch.add_noise(z, torch.randn(z.shape, generator=g), torch.full((len(z),), t))
        var[f"re-noised t={t}"] = float(member_variance(_predict_all(lrm, zt, text)).mean())
    var["pure noise"] = float(member_variance(_predict_all(lrm, torch.randn(z.shape, generator=g), text)).mean())
    recs = world.world_examples("heldout", n_ood, seed=seed + 3)
    hp = [x["prompt"] for x in recs]
    with torch.no_grad():
        zh = policy.encode_video(world.render_batch(hp, [x["seed"] for x in recs])).float()
    var["held-out captions (world clips)"] = float(member_variance(
        _predict_all(lrm, zh, lrm.text_tokens(hp, torch.device("cpu")))).mean())
    if ood_model is None and policy.family in ("wan", "cogvideox"):
        ood_model = f"tiny-{policy.family}-random"  # another (randomly initialised) model of the family
    if ood_model:
        other = load_policy(ood_model, seed=ood_seed)
        if tuple(other.latent_shape) == tuple(z.shape[1:]):
            zo = sample_videos(other, ps[:n_ood], list(range(min(n_ood, len(ps)))), 10).float()
            var[f"other model ({ood_model}, seed {ood_seed}) samples"] = float(member_variance(
                _predict_all(lrm, zo, text[:len(zo)])).mean())
    out["variance"] = var
    return out


def eval_lrm_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench velr.eval-lrm",
                                 description="Ensemble-size table and in- vs out-of-distribution variance.")
    ap.add_argument("--lrm", required=True)
    ap.add_argument("--data", help="default: the dataset the LRM was trained on (its held-out split)")
    ap.add_argument("--ood-model", help="model whose samples are the other-dataset OOD set "
                                        "(default: tiny-<family>-random with --ood-seed)")
    ap.add_argument("--ood-seed", type=int, default=7)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = eval_lrm(a.lrm, a.data, a.ood_model, ood_seed=a.ood_seed)
    _print_table("held-out", res["heldout"])
    _log("ensemble variance (mean over samples):")
    for k, v in res["variance"].items():
        _log(f"  {k:<40} {v:.3e}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ online on/off
def compare(lrm_path: str, model: str, out: str, steps: int = 40, batch: int = 8, extra: dict[str, Any] | None = None,
            variants: tuple[str, ...] = ("on", "off"), pixel_reward: str = "alignment") -> dict[str, Any]:
    from trl_video.config import VideoRewardConfig
    from trl_video.trainer import VideoRewardTrainer

    results: dict[str, Any] = {}
    for v in variants:
        cfg = dict(model=model, method="velr", reward="lrm", reward_args={"path": lrm_path},
                   method_args={"pixel_reward": pixel_reward, "online_alignment": v == "on", "true_reward_every": 1},
                   prompts="world:train", prompts_per_step=batch, group_size=1, max_steps=steps,
                   output_dir=f"{out}/{v}", report_to="none", eval_at_end=True, eval_rewards=[pixel_reward],
                   eval_num_prompts=32, eval_num_steps=10, save_model_at_end=False)
        for k, val in (extra or {}).items():
            if isinstance(val, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **val}
            else:
                cfg[k] = val
        t0 = time.perf_counter()
        res = VideoRewardTrainer(VideoRewardConfig(**cfg)).train()
        rows = [json.loads(x) for x in Path(f"{out}/{v}/metrics.jsonl").read_text().splitlines()]
        ev = res["eval"]["per_reward"]
        results[v] = {
            "abs_gap": [r.get("buffer/abs_gap") for r in rows], "true_reward": [r.get("buffer/true_reward") for r in rows],
            "lrm_reward": [r.get("buffer/lrm_reward") for r in rows],
            "eval_true_before": ev[pixel_reward]["before"]["mean"], "eval_true_after": ev[pixel_reward]["after"]["mean"],
            "eval_true_gain": ev[pixel_reward]["gain"]["mean"], "eval_true_gain_sem": ev[pixel_reward]["gain"]["sem"],
            "eval_lrm_before": ev["lrm"]["before"]["mean"], "eval_lrm_after": ev["lrm"]["after"]["mean"],
            "seconds": time.perf_counter() - t0}
    (Path(out) / "compare.json").write_text(json.dumps(results, indent=2))
    _plot_compare(results, Path(out) / "gap_curves.png")
    return results


def _plot_compare(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for v, res in results.items():
        gap = np.array([x if x is not None else np.nan for x in res["abs_gap"]], dtype=float)
        k = max(1, len(gap) // 8)
        sm = np.convolve(np.nan_to_num(gap), np.ones(k) / k, mode="valid")
        axes[0].plot(np.arange(len(sm)) + k, sm, label=f"online alignment {v}")
        tr = np.array([x if x is not None else np.nan for x in res["true_reward"]], dtype=float)
        lr = np.array([x if x is not None else np.nan for x in res["lrm_reward"]], dtype=float)
        axes[1].plot(np.convolve(np.nan_to_num(tr), np.ones(k) / k, mode="valid"), label=f"true ({v})")
        axes[1].plot(np.convolve(np.nan_to_num(lr), np.ones(k) / k, mode="valid"), "--", label=f"LRM ({v})")
    axes[0].set_title("|R_lrm - R_true| on the step's samples")
    axes[1].set_title("reward of the step's samples")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench velr.compare",
                                 description="VELR with online LRM alignment on vs off (gap curves, true reward).")
    ap.add_argument("--lrm", required=True)
    ap.add_argument("--model", default="tiny-cogvideox")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pixel-reward", default="alignment", help="the true reward (must match the LRM's data)")
    ap.add_argument("--set", action="append", default=[], help="extra config key=json-value")
    a = ap.parse_args(argv)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    res = compare(a.lrm, a.model, a.out, a.steps, a.batch, extra, pixel_reward=a.pixel_reward)
    for v, r in res.items():
        gaps = [x for x in r["abs_gap"] if x is not None]
        q = max(1, len(gaps) // 4)
        _log(f"online alignment {v}: |gap| first quarter {np.mean(gaps[:q]):.4f} -> last quarter "
             f"{np.mean(gaps[-q:]):.4f}; TRUE reward at eval {r['eval_true_before']:.4f} -> "
             f"{r['eval_true_after']:.4f} (gain {r['eval_true_gain']:.4f} +- {r['eval_true_gain_sem']:.4f}); "
             f"LRM reward {r['eval_lrm_before']:.4f} -> {r['eval_lrm_after']:.4f}; {r['seconds']:.0f}s")
    return 0


# ------------------------------------------------------------------------------------------ memory
def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training step of ``spec['variant']`` in this (fresh) process; peak of the step's allocations."""
    from torch.profiler import ProfilerActivity, profile

    from trl_video.config import VideoRewardConfig
    from trl_video.models.policy import load_policy
    from trl_video.trainer import VideoRewardTrainer

    torch.manual_seed(0)
    policy = load_policy(spec["model"])
    for key, attr in (("height", "height"), ("width", "width"), ("frames", "num_frames")):
        if spec.get(key):  # presets have fixed sizes: resize the policy (random weights work at any size)
            setattr(policy, attr, int(spec[key]))
    common = dict(model=spec["model"], prompts="world:train", prompts_per_step=spec["batch"], group_size=1,
                  max_steps=10, output_dir=tempfile.mkdtemp(prefix="velr-mem-"), report_to="none",
                  save_model_at_end=False)
    S, K = spec["num_steps"], spec["grad_steps"]
    if spec["variant"] == "refl":
        cfg = VideoRewardConfig(method="refl", reward=spec["pixel_reward"], **common,
                                sampler_args={"num_steps": S, "grad_steps": K})
    else:
        mid = max(0, min(S - K, S // 2 - K // 2))
        with_true = spec["variant"] == "velr"
        cfg = VideoRewardConfig(method="velr", reward="lrm", reward_args=spec.get("lrm_args", {}), **common,
                                sampler_args={"num_steps": S, "grad_steps": K, "start_range": [mid, mid]},
                                method_args={"pixel_reward": spec["pixel_reward"], "online_alignment": with_true,
                                             "true_reward_every": 1 if with_true else 0})
    import warnings

    warnings.simplefilter("ignore")
    trainer = VideoRewardTrainer(cfg, policy=policy)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a whole training cycle, every phase included: VELR aligns its LRM every `align_every` steps (10), so a cycle
    # is that many steps (the same count for ReFL); each step's own allocation peak, the max over the cycle
    step_peaks = []
    for step in range(int(spec.get("cycle_steps") or 10)):
        trainer.global_step = step  # the loss picks its phases by step (train() advances it; here we do)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.training_step()
        mem = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
        step_peaks.append(int(max(itertools.accumulate((e.nbytes() for e in mem), initial=0))))
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # resident for the whole run, outside any step's allocations: the auxiliary models' weights (the LRM
    # ensemble, trained or not) and the optimiser state of every group but the policy's (same LoRA in all variants)
    aux_modules = [g.module for n, g in trainer.groups.items() if n != "policy"]
    reward_net = trainer.reward if isinstance(trainer.reward, torch.nn.Module) else getattr(trainer.reward, "ensemble", None)
    if isinstance(reward_net, torch.nn.Module):
        aux_modules.append(reward_net)
    params = {id(p): p for m in aux_modules for p in m.parameters()}
    state = [t for n, opt in trainer.optimizers.items() if n != "policy" for st in opt.state.values()
             for t in st.values() if isinstance(t, torch.Tensor)]
    aux_bytes = sum(p.numel() * p.element_size() for p in params.values()) + sum(t.numel() * t.element_size()
                                                                                 for t in state)
    return {"variant": spec["variant"], "peak_step_bytes": step_peaks[0], "step_peaks_bytes": step_peaks,
            "peak_cycle_step_bytes": max(step_peaks), "peak_cycle_step_index": step_peaks.index(max(step_peaks)),
            "aux_resident_bytes": int(aux_bytes), "peak_cycle_bytes": max(step_peaks) + int(aux_bytes),
            "ru_maxrss_growth_kb": int(rss1 - rss0), "ru_maxrss_kb": int(rss1),
            "latent_shape": list(trainer.policy.latent_shape)}


def measure_memory(variant: str, **spec: Any) -> dict[str, Any]:
    """Run :func:`_memory_child` in a fresh interpreter (glibc keeps freed pages: no reuse across variants)."""
    spec = {"variant": variant, **spec}
    env = dict(os.environ, TRL_VIDEO_VELR_MEMSPEC=json.dumps(spec))
    child = "from trl_video.bench_discovery import import_benchmark; import_benchmark('velr').memory_child_main()"
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True,
                          text=True, timeout=3600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("VELR_MEMORY ")]
    if proc.returncode or not line:
        raise RuntimeError(f"memory child '{variant}' failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line[-1][len("VELR_MEMORY "):])


def memory_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench velr.memory",
                                 description="Peak memory of one VELR step vs one pixel-space ReFL step "
                                             "(decode + pixel reward with grad), same model and batch, each in a "
                                             "fresh subprocess.")
    ap.add_argument("--method", default="velr", choices=["velr"])
    ap.add_argument("--model", default="tiny-cogvideox")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--grad-steps", type=int, default=2)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--pixel-reward", default="alignment")
    ap.add_argument("--cycle-steps", type=int, default=10,
                    help="training steps profiled (VELR aligns its LRM every align_every = 10 steps: one cycle)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    spec = dict(model=a.model, batch=a.batch, num_steps=a.num_steps, grad_steps=a.grad_steps, height=a.height,
                width=a.width, frames=a.frames, pixel_reward=a.pixel_reward, cycle_steps=a.cycle_steps)
    res = {v: measure_memory(v, **spec) for v in ("refl", "velr", "velr_no_true_reward")}
    base0, base = res["refl"]["peak_step_bytes"], res["refl"]["peak_cycle_bytes"]
    _log(f"model {a.model} latents {res['refl']['latent_shape']} batch {a.batch}, {a.num_steps} sampling steps, "
         f"{a.grad_steps} grad steps; a cycle of {a.cycle_steps} steps (VELR's LRM alignment included)")
    _log(f"{'variant':<22}{'step 0 (MB)':>12}{'x refl':>8}{'cycle max step (MB)':>21}{'at step':>8}"
         f"{'+ aux resident (MB)':>21}{'= cycle peak (MB)':>19}{'x refl':>8}{'ru_maxrss growth (MB)':>23}")
    for v, r in res.items():
        _log(f"{v:<22}{r['peak_step_bytes'] / 2**20:>12.2f}{r['peak_step_bytes'] / base0:>8.3f}"
             f"{r['peak_cycle_step_bytes'] / 2**20:>21.2f}{r['peak_cycle_step_index']:>8}"
             f"{r['aux_resident_bytes'] / 2**20:>21.2f}{r['peak_cycle_bytes'] / 2**20:>19.2f}"
             f"{r['peak_cycle_bytes'] / base:>8.3f}{r['ru_maxrss_growth_kb'] / 1024:>23.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"spec": spec, "results": res}, indent=2))
    return 0


def memory_child_main() -> None:
    """The fresh interpreter of :func:`measure_memory`."""
    print("VELR_MEMORY " + json.dumps(_memory_child(json.loads(os.environ["TRL_VIDEO_VELR_MEMSPEC"]))), flush=True)


BENCHMARKS = {"build-dataset": build_dataset_main, "pretrain": pretrain_main, "eval-lrm": eval_lrm_main,
              "compare": compare_main, "memory": memory_main}
BENCHMARK_ALIASES = {"velr-build-dataset": "build-dataset", "velr-pretrain": "pretrain", "velr-eval-lrm": "eval-lrm",
                     "velr-compare": "compare"}
