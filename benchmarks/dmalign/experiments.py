"""DM-Align experiments on the CPU world (``trl-video bench dmalign.experiments <what> [options]``; the former
``trl-video bench dmalign.experiments <what>`` still works).

* ``baselines``: the teacher at 50 ODE steps with CFG ``--guidance`` (on the evaluation noises: the noise floor), the
  teacher at 4 ODE steps with the same CFG and the teacher run as a 4-step ``fewstep`` generator without CFG (= the
  student at initialisation).
* ``train --variant dmd|pair|group``: trains the 4-step student with DM-Align through ``VideoRewardTrainer`` (the DMD
  real score with the same CFG) and evaluates it like the baselines, plus its FD difference to the teacher's 4-step
  ODE with a paired bootstrap s.e.; ``--eval-every N`` records a learning curve.
* ``rescore``: evaluates saved ``samples_*.pt`` of earlier runs again.
* ``table``: the paper-Table-1-style comparison of everything measured so far (markdown).
* ``memory``: parameter / optimiser memory of the three roles (tiny-wan measured; Wan2.1-1.3B from its config
  instantiated on the meta device).

Distances: the Frechet distance (the FID/FVD formula) between Gaussian fits of 13 hand-made features of the decoded
clips (object area, colour, position, displacement, sharpness, frame difference; z-scored by the teacher-50 set),
and the unbiased MMD^2 with an RBF kernel on flattened normalised latents (bandwidth = median pairwise distance
of the teacher-50 set, fixed for every comparison), against (a) the teacher's 50-step distribution (distillation;
sampled on noises independent of the evaluated models' noises) and (b) the preferred set (ground-truth world clips
encoded with the VAE, the Pair target). Reward: the built-in differentiable ``alignment`` reward on decoded clips.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from trl_video.evaluation import video_features
from trl_video.stats import bootstrap, frechet_distance, mean_sem, median_bandwidth, mmd2

RESULTS = "out/dmalign_experiments"
K = 4


# ------------------------------------------------------------------------------------------------ sampling
def ode_samples(policy: Any, prompts: list[str], seeds: list[int], num_steps: int, net: Any = None,
                bs: int = 64, guidance_scale: float = 1.0) -> torch.Tensor:
    """The teacher's deterministic ODE sampler (the core's evaluation sampler, CFG ``guidance_scale``) from the
    noises :func:`fewstep_samples` starts from (seed ``s * 1009``)."""
    from trl_video.evaluation import sample_videos

    return sample_videos(policy, prompts, [s * 1009 for s in seeds], num_steps, transformer=net, batch_size=bs,
                         guidance_scale=guidance_scale)


def fewstep_samples(policy: Any, prompts: list[str], seeds: list[int], num_steps: int = K, net: Any = None,
                    bs: int = 64) -> torch.Tensor:
    """The core ``fewstep`` sampler's rule (:func:`trl_video.sampling.fewstep_sample`: predict x0, re-noise to the
    next of the K uniform timesteps) with per-seed noise (:func:`_noise`, salted by the step), so every model is
    evaluated on the same noises."""
    from trl_video.sampling import fewstep_sample, sample_batched, seeded_noise

    times = [1.0 - k / num_steps for k in range(num_steps)]
    return sample_batched(policy, prompts, [s * 1009 for s in seeds], lambda x, emb, ss: fewstep_sample(
        policy, x, emb, times, lambda k, shape: seeded_noise(shape[1:], [s + k for s in ss]), net=net), bs)


# ------------------------------------------------------------------------------------------------ metrics


def bootstrap_se(a: torch.Tensor, b: torch.Tensor, n: int = 200, seed: int = 0) -> float:
    """Standard error of ``frechet_distance(a, b)`` from resampling the evaluated set ``a`` (the reference fixed)."""
    return float(bootstrap(lambda x: frechet_distance(x, b), a, n=n, seed=seed)["se"])  # type: ignore[arg-type]


def paired_gap(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, n: int = 500, seed: int = 0) -> dict:
    """``FD(a, ref) - FD(b, ref)`` for two feature sets of the same prompts and noises, with the s.e. and the share
    of resamples >= 0 from a paired bootstrap (one index draw for both sets)."""
    res = bootstrap(lambda x, y: frechet_distance(x, ref) - frechet_distance(y, ref), a, b, n=n, seed=seed)
    values = res["values"]
    assert isinstance(values, torch.Tensor)
    return {"fd_minus_teacher_ode": res["value"], "fd_minus_teacher_ode_se": res["se"],
            "fd_minus_teacher_ode_p": float((values >= 0).double().mean())}


@torch.no_grad()
def decode_all(policy: Any, latents: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([policy.decode(latents[i:i + bs]) for i in range(0, len(latents), bs)])


def alignment_reward(pixels: torch.Tensor, prompts: list[str], per_sample: bool = False) -> Any:
    from trl_video.components.rewards import AlignmentReward

    r = AlignmentReward()(pixels, prompts).detach().float()
    return r if per_sample else float(r.mean())


# ------------------------------------------------------------------------------------------------ data
def eval_set(n_prompts: int = 48, per_prompt: int = 2, seed: int = 4242) -> tuple[list[str], list[int]]:
    from trl_video import world

    recs = world.world_examples("train", n_prompts, seed=seed)
    prompts = [r["prompt"] for r in recs for _ in range(per_prompt)]
    seeds = [seed * 100_000 + i for i in range(len(prompts))]
    return prompts, seeds


@torch.no_grad()
def encode_world(policy: Any, prompts: list[str], seeds: list[int], bs: int = 32) -> torch.Tensor:
    from trl_video.world import render_batch

    return torch.cat([policy.encode_video(render_batch(prompts[i:i + bs], seeds[i:i + bs]))
                      for i in range(0, len(prompts), bs)])


PREFERRED_KINDS = ("world", "teacher-best")


def preferred_latents(policy: Any, prompts: list[str], seeds: list[int], kind: str, guidance_scale: float) -> torch.Tensor:
    """One preferred latent per (prompt, seed). 'world': the ground-truth world clip, encoded with the VAE (real
    videos). 'teacher-best': the better, by the alignment reward, of two teacher samples (50 DDIM steps, CFG
    ``guidance_scale``; a curated best-of-2 set, which lies inside the teacher's distribution)."""
    if kind == "world":
        return encode_world(policy, prompts, seeds)
    cands = [ode_samples(policy, prompts, [s * 7 + j for s in seeds], 50, guidance_scale=guidance_scale)
             for j in (1, 2)]
    rewards = torch.stack([alignment_reward(decode_all(policy, c), prompts, per_sample=True) for c in cands])
    pick = rewards.argmax(0).view(-1, *([1] * (cands[0].ndim - 1)))
    return torch.where(pick == 0, cands[0], cands[1])


def build_preferred_set(policy: Any, out: str, n: int = 480, seed: int = 77, kind: str = "world",
                        guidance_scale: float = 1.0) -> str:
    """Preferred latents (:func:`preferred_latents`) of ``n`` train captions as an offline-latents dataset: the
    DM-Pair preferred set."""
    from trl_video import world
    from trl_video.data import save_offline_latents

    if Path(out, "dataset_info.json").exists():
        return out
    recs = world.world_examples("train", n, seed=seed)
    prompts, seeds = [r["prompt"] for r in recs], [r["seed"] for r in recs]
    save_offline_latents(out, prompts, preferred_latents(policy, prompts, seeds, kind, guidance_scale),
                         source="real" if kind == "world" else "generated")
    return out


def preferred_dir(root: Path, kind: str, guidance_scale: float) -> str:
    return str(root / ("preferred_latents" if kind == "world" else f"preferred_latents_{kind}_w{guidance_scale:g}"))


# ------------------------------------------------------------------------------------------------ experiments
REF_SEED_OFFSET = 500_000  # the reference sets' noises are independent of the evaluated models' noises


def _ref_sets(policy: Any, root: Path, guidance_scale: float, preferred: str = "world") -> dict[str, torch.Tensor]:
    """Teacher-50 reference set (CFG ``guidance_scale``, on noises independent of the evaluation noises, so that a
    deterministic sampler of the same teacher gets no advantage from shared noise), the teacher-50 set and the
    teacher's 4-step ODE on the evaluation noises (the noise floor and the baseline every student is paired with)
    and the preferred eval set, cached on disk. Call it on the freshly loaded teacher."""
    cache = root / f"reference_sets_w{guidance_scale:g}.pt"
    prompts, seeds = eval_set()
    w = guidance_scale
    sets = torch.load(cache, weights_only=True) if cache.exists() else {}
    todo = {"teacher50": ([s + REF_SEED_OFFSET for s in seeds], 50), "teacher50_b": (seeds, 50),
            "teacher_ode4": (seeds, K)}
    missing = {k: v for k, v in todo.items() if k not in sets}
    for key, (noise_seeds, steps) in missing.items():
        sets[key] = ode_samples(policy, prompts, noise_seeds, steps, guidance_scale=w)
    if missing:
        torch.save(sets, cache)
    name = "preferred_eval.pt" if preferred == "world" else f"preferred_eval_{preferred}_w{w:g}.pt"
    gt_cache = root / name
    if gt_cache.exists():
        sets["gt"] = torch.load(gt_cache, weights_only=True)
    else:
        sets["gt"] = preferred_latents(policy, prompts, [s + 7 for s in seeds], preferred, guidance_scale)
        torch.save(sets["gt"], gt_cache)
    return sets


def evaluate_samples(policy: Any, lat: torch.Tensor, sets: dict[str, torch.Tensor], prompts: list[str],
                     paired_with: str | None = None) -> dict:
    """MMD^2 on latents and the Frechet distance of decoded-clip features (z-scored by the teacher-50 set) to the
    teacher-50 set and to the preferred (ground-truth) set, plus the alignment reward. The reference sets' features
    are computed once and kept in ``sets``. ``paired_with``: the key in ``sets`` of another model's latents on the
    same prompts and noises (``teacher_ode4``): adds the FD difference ``mine - other`` with its paired bootstrap
    s.e."""
    h = median_bandwidth(sets["teacher50"])
    for name in ("teacher50", "gt", *([paired_with] if paired_with else [])):
        if f"features_{name}" not in sets:
            sets[f"features_{name}"] = video_features(decode_all(policy, sets[name]))
    ref_t, ref_gt = sets["features_teacher50"], sets["features_gt"]
    pixels = decode_all(policy, lat)
    mine = video_features(pixels)
    rewards = alignment_reward(pixels, prompts, per_sample=True)
    mu, sd = ref_t.mean(0), ref_t.std(0).clamp_min(1e-6)
    z = lambda f: (f - mu) / sd  # noqa: E731
    return {"fd_teacher50": frechet_distance(z(mine), z(ref_t)), "fd_preferred": frechet_distance(z(mine), z(ref_gt)),
            "fd_teacher50_se": bootstrap_se(z(mine), z(ref_t)),
            "mmd2_teacher50": mmd2(lat, sets["teacher50"], h), "mmd2_preferred": mmd2(lat, sets["gt"], h),
            "reward_alignment": float(rewards.mean()), "reward_alignment_se": mean_sem(rewards)["sem"],
            "bandwidth": h, "n": len(lat),
            **(paired_gap(z(mine), z(sets[f"features_{paired_with}"]), z(ref_t)) if paired_with else {})}


def run_baselines(model: str, root: Path, guidance_scale: float, preferred: str = "world") -> dict:
    from trl_video.models.policy import load_policy

    policy = load_policy(model)
    w = guidance_scale
    sets = _ref_sets(policy, root, w, preferred)
    prompts, seeds = eval_set()
    nfe = 2 if w != 1.0 else 1  # network calls per step (CFG: conditional + unconditional)
    res = {"teacher50 (indep. seeds, noise floor)": {"nfe": 50 * nfe, **evaluate_samples(
               policy, sets["teacher50_b"], sets, prompts)},
           "teacher ODE 4-step": {"nfe": K * nfe, **evaluate_samples(policy, sets["teacher_ode4"], sets, prompts)},
           "teacher fewstep 4 (student init)": {"nfe": 4, **evaluate_samples(
               policy, fewstep_samples(policy, prompts, seeds), sets, prompts)},
           ("ground truth (preferred)" if preferred == "world" else f"preferred set ({preferred})"): {
               "nfe": 0, **evaluate_samples(policy, sets["gt"], sets, prompts)}}
    return res


VARIANTS: dict[str, dict[str, Any]] = {
    "dmd": {"method_args": {"align": "none", "align_weight": 0.0}, "sampler_args": {"num_steps": K, "grad": False}},
    "pair": {"method_args": {"align": "pair"}},
    "group": {"method_args": {"align": "group", "top_n": 2}, "prompts_per_step": 2, "group_size": 4},
}


def run_training(model: str, variant: str, steps: int, root: Path, lr: float, seed: int = 0,
                 fake_lr: float | None = None, prompts_per_step: int = 4, guidance_scale: float = 1.0,
                 method_args: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 eval_every: int = 0, tag: str = "", preferred: str = "world") -> dict:
    from trl_video.config import config_from_dict
    from trl_video.models.policy import load_policy
    from trl_video.trainer import VideoRewardTrainer

    policy = load_policy(model)
    sets = _ref_sets(policy, root, guidance_scale, preferred)
    rec: dict[str, Any] = dict(model=model, method="dmalign", reward="alignment", prompts="world:train",
                               prompts_per_step=prompts_per_step, group_size=2, max_steps=steps, learning_rate=lr,
                               use_peft=False, output_dir=str(root / f"run_{variant}_{int(time.time())}"),
                               report_to="none", save_model_at_end=False, save_total_limit=1, seed=seed,
                               logging_steps=10)
    over = dict(VARIANTS[variant])
    rec["method_args"] = dict(over.pop("method_args"), real_guidance_scale=guidance_scale,
                              **({"fake_lr": fake_lr} if fake_lr else {}), **(method_args or {}))
    rec.update(over)
    rec.update(overrides or {})
    if variant == "pair":
        rec["offline_latents"] = build_preferred_set(policy, preferred_dir(root, preferred, guidance_scale),
                                                     kind=preferred, guidance_scale=guidance_scale)
    prompts, seeds = eval_set()
    curve: list[dict[str, float]] = []

    class LearningCurve:  # a transformers-style callback: the distances every `eval_every` steps
        def on_step_end(self, args: Any, state: Any, control: Any, trainer: Any = None, **kw: Any) -> None:
            if eval_every and state.global_step % eval_every == 0 and state.global_step < steps:
                ev = evaluate_samples(trainer.policy, fewstep_samples(trainer.policy, prompts, seeds), sets, prompts)
                curve.append({"step": state.global_step, **{k: round(ev[k], 4) for k in (
                    "fd_teacher50", "fd_preferred", "reward_alignment")}})
                print(json.dumps(curve[-1]), flush=True)

    t0 = time.time()
    tr = VideoRewardTrainer(config_from_dict(rec), policy=policy, callbacks=[LearningCurve()])
    tr.train()
    secs = time.time() - t0
    lat = fewstep_samples(tr.policy, prompts, seeds)
    name = f"samples_{variant}{'_' + tag if tag else ''}_w{guidance_scale:g}.pt"
    torch.save(lat, root / name)  # re-analysis without retraining
    ev = evaluate_samples(tr.policy, lat, sets, prompts, paired_with="teacher_ode4")
    hist = tr.history
    return {"nfe": K, "steps": steps, "train_seconds": round(secs, 1), "recipe": rec, **ev, "curve": curve,
            "train_reward_first": hist[0].get("reward_mean") if hist else None,
            "train_reward_last": hist[-1].get("reward_mean") if hist else None}


def rescore(model: str, root: Path, guidance_scale: float, files: list[str], suffix: str,
            preferred: str = "world") -> dict:
    """Evaluate saved student samples (``samples_*.pt`` of earlier ``train`` runs) against the reference sets without
    retraining (e.g. after a change of the metrics)."""
    from trl_video.models.policy import load_policy

    policy = load_policy(model)
    sets = _ref_sets(policy, root, guidance_scale, preferred)
    prompts, _ = eval_set()
    return {f"{Path(f).stem}{suffix}": {"nfe": K, **evaluate_samples(
        policy, torch.load(root / f, weights_only=True), sets, prompts, paired_with="teacher_ode4")} for f in files}


def role_memory_report(model: str) -> dict:
    """Measured parameter memory of the roles for the tiny model (full fine-tuning and LoRA generator) and the
    same accounting for Wan2.1-T2V-1.3B's transformer built from its config on the meta device."""
    from trl_video.models.policy import load_policy

    out: dict[str, Any] = {}
    for lora in (False, True):
        policy = load_policy(model)
        if lora:
            policy.add_lora(64 if "1.3" in model else 8)
        else:
            policy.transformer.requires_grad_(True)
            policy.freeze_reference()
        n_all = sum(p.numel() for p in policy.transformer.parameters())
        n_tr = sum(p.numel() for p in policy.transformer.parameters() if p.requires_grad)
        out[f"{model} ({'LoRA' if lora else 'full'} generator)"] = _accounting(n_all, n_tr, lora, bytes_=4)
    try:
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                        num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        eps=1e-6, rope_max_seq_len=1024)
        n = sum(p.numel() for p in wan.parameters())
        lora_n = 30 * 2 * 4 * 2 * 64 * 1536  # rank 64 on q,k,v,o of self- and cross-attention (1536 -> 1536)
        out["Wan2.1-T2V-1.3B (full generator, fp32 weights)"] = _accounting(n, n, False, bytes_=4)
        out["Wan2.1-T2V-1.3B (full generator, bf16 weights)"] = _accounting(n, n, False, bytes_=2)
        out["Wan2.1-T2V-1.3B (LoRA-64 generator, bf16 weights)"] = _accounting(n + lora_n, lora_n, True, bytes_=2)
    except Exception as exc:  # diffusers without Wan
        out["Wan2.1-T2V-1.3B"] = f"unavailable: {exc}"
    return out


def _accounting(n_all: int, n_train: int, lora: bool, bytes_: int) -> dict:
    """MiB per role: generator weights (+ its trainable part's grads and AdamW fp32 moments), real (0 extra with a
    LoRA generator: adapter disabled; a frozen copy otherwise), fake (full trainable copy + grads + AdamW)."""
    mib = 2**20
    base = n_all - (n_train if lora else 0)
    gen = n_all * bytes_ + n_train * (bytes_ + 8)
    real = 0 if lora else base * bytes_
    fake = base * (2 * bytes_ + 8)
    return {"params_total": n_all, "params_trainable_generator": n_train,
            "generator_MiB": round(gen / mib, 1), "real_extra_MiB": round(real / mib, 1),
            "fake_MiB": round(fake / mib, 1), "total_MiB": round((gen + real + fake) / mib, 1),
            "fake_share": round(fake / (gen + real + fake), 3)}


def table(root: Path) -> str:
    res = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    rows = ["| model | NFE | FD to teacher-50 +- bootstrap s.e. (lower = better distilled) | FD to preferred set | "
            "MMD^2 to teacher-50 | MMD^2 to preferred | alignment reward |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if not isinstance(r, dict) or "mmd2_teacher50" not in r:
            continue
        se = f" +- {r['fd_teacher50_se']:.3f}" if "fd_teacher50_se" in r else ""
        fd = (f"{r['fd_teacher50']:.3f}{se} | {r['fd_preferred']:.3f}" if "fd_teacher50" in r else "- | -")
        rows.append(f"| {name} | {r['nfe']} | {fd} | {r['mmd2_teacher50']:.4f} | {r['mmd2_preferred']:.4f} | "
                    f"{r['reward_alignment']:.3f} |")
    return "\n".join(rows)


def _save(root: Path, updates: dict) -> None:
    path = root / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(updates)
    path.write_text(json.dumps(res, indent=2, default=str))


def bench_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench dmalign.experiments")
    ap.add_argument("what", choices=["toy", "baselines", "train", "table", "memory", "preferred", "rescore"])
    ap.add_argument("--model", default="tiny-cogvideox")
    ap.add_argument("--variant", choices=list(VARIANTS), default="dmd")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--fake-lr", type=float, default=1e-4)
    ap.add_argument("--prompts-per-step", type=int, default=4, help="dmd / pair (group: its own 2 x 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=6.0,
                    help="CFG scale of the teacher (default 6 = the CogVideoX pipeline default): the reference sets, the "
                         "teacher's 4-step ODE and the DMD real score")
    ap.add_argument("--method-args", default="{}", help="JSON merged into method_args, e.g. '{\"dmd_step\": \"last\"}'")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="recipe overrides, e.g. adam_beta1=0.0")
    ap.add_argument("--eval-every", type=int, default=0, help="learning curve: distances every N training steps")
    ap.add_argument("--preferred", choices=PREFERRED_KINDS, default="world",
                    help="the Pair target and the 'FD to preferred' set: ground-truth world clips, or the best of two "
                         "teacher samples by the alignment reward")
    ap.add_argument("--samples", nargs="*", default=[], help="rescore: saved samples_*.pt files in --out")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    if a.what == "toy":
        from .toy import run, toy_table

        res = run(str(root), steps=a.steps, lr=a.lr, seed=a.seed)
        print(toy_table(res))
        return 0
    if a.what == "preferred":
        from trl_video.models.policy import load_policy

        print(build_preferred_set(load_policy(a.model), preferred_dir(root, a.preferred, a.guidance),
                                  kind=a.preferred, guidance_scale=a.guidance))
        return 0
    suffix = f" [w={a.guidance:g}{'' if a.preferred == 'world' else ', preferred=' + a.preferred}]"
    if a.what == "baselines":
        _save(root, {k + suffix: v for k, v in run_baselines(a.model, root, a.guidance, a.preferred).items()})
    elif a.what == "rescore":
        _save(root, rescore(a.model, root, a.guidance, a.samples, suffix, a.preferred))
    elif a.what == "train":
        name = {"dmd": "DMD only (align weight 0)", "pair": "DM-Align (Pair)", "group": "DM-Align (Group)"}[a.variant]
        overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
        _save(root, {f"{name}{a.tag}{suffix}": run_training(
            a.model, a.variant, a.steps, root, a.lr, a.seed, a.fake_lr, a.prompts_per_step, a.guidance,
            json.loads(a.method_args), overrides, a.eval_every, a.tag.strip().replace(" ", "_"), a.preferred)})
    elif a.what == "memory":
        rep = role_memory_report(a.model)
        _save(root, {"memory": rep})
        print(json.dumps(rep, indent=2))
        return 0
    print(table(root))
    return 0
