"""FCRM benchmarks (``benchmarks/fcrm``, from a checkout):

* ``trl-video bench fcrm.settings`` (former name ``fcrm``): FCRM under each behaviour distribution, side by side;
* ``trl-video bench fcrm.build-offline [N] [MODEL]``: world clips -> offline latents (+ reward);
* ``trl-video bench fcrm.lightness [STEPS|-] [MODEL|-] [key=value ...] [out=DIR]``: luminance, fully offline.

Each setting is one of the tiny recipes ``recipes/tiny/fcrm_<setting>.yaml`` (same model, reward, steps
unless the recipe says otherwise). For each it reports the reward before/after on held-out prompts (the
trainer's evaluation: base = LoRA disabled vs trained, same seeds), the number of rollouts the sampler
generated, the offline samples consumed, and the training wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

SETTINGS = ("online", "ema", "replay", "offline", "hybrid", "fewstep")
#: offline-latents datasets the tiny recipes name: world:train clips encoded by the recipe model's VAE, with the
#: reward named after the last underscore (of the decoded clip) stored in the ``reward`` column
OFFLINE_PREFIX = "out/fcrm/world_latents_"


def recipes_dir(explicit: str | None = None) -> Path:
    """The tiny recipes: ``explicit`` (``--recipes``), else ``recipes/tiny`` of the working directory, else that of
    the checkout this benchmarks folder belongs to."""
    from trl_video.bench_discovery import benchmarks_root
    from trl_video.errors import TrlVideoError

    root = benchmarks_root()
    candidates = [Path(explicit)] if explicit else [Path("recipes/tiny")] + (
        [root.parent / "recipes" / "tiny"] if root is not None else [])
    for c in candidates:
        if c.is_dir():
            return c
    raise TrlVideoError(f"no recipes folder at {', '.join(map(str, candidates))}: pass --recipes DIR (the "
                        f"repository's recipes/tiny)")


# ------------------------------------------------------------------------------------------------ data
@torch.no_grad()
def build_world_offline(out: str, n: int = 256, split: str = "train", seed: int = 7, reward: str | None = None,
                        model: str = "tiny-cogvideox", batch: int = 16) -> dict[str, Any]:
    """Offline-latents dataset from the synthetic world: render ``n`` clips of ``split``, encode them with the
    model's VAE; with ``reward`` also store that reward of the DECODED clip (what the policy's latents mean)."""
    from trl_video import world
    from trl_video.data import save_offline_latents
    from trl_video.models.policy import load_policy
    from trl_video.plan import build_reward
    from trl_video.plugins import get_registry

    policy = load_policy(model)
    recs = world.world_examples(split, n, seed)
    prompts, seeds = [r["prompt"] for r in recs], [r["seed"] for r in recs]
    fn = build_reward(get_registry(), reward, {}) if reward else None
    lats, rews = [], []
    for i in range(0, n, batch):
        pix = world.render_batch(prompts[i:i + batch], seeds[i:i + batch])
        lat = policy.encode_video(pix)
        lats.append(lat.cpu())
        if fn is not None:
            inputs = policy.decode(lat) if fn.space == "pixel" else lat
            rews.append(fn(inputs, prompts[i:i + batch]).float().cpu())
    lat_all = torch.cat(lats)
    r_all = torch.cat(rews) if rews else None
    save_offline_latents(out, prompts, lat_all, r_all, source=f"world:{split}")
    info = {"path": out, "n": n, "split": split, "reward": reward, "latent_shape": list(lat_all.shape[1:])}
    if r_all is not None:
        info.update(reward_mean=float(r_all.mean()), reward_std=float(r_all.std()))
    return info


def ensure_offline(path: str, model: str = "tiny-cogvideox", n: int = 256) -> str:
    """Build ``out/fcrm/world_latents_<reward>`` on first use with ``model``'s VAE (other paths must exist)."""
    if not Path(path).exists():
        if not path.startswith(OFFLINE_PREFIX):
            raise FileNotFoundError(f"offline_latents '{path}' does not exist")
        build_world_offline(path, n=n, reward=path.rsplit("_", 1)[1], model=model)
    return path


# ------------------------------------------------------------------------------------------------ few-step eval
@torch.no_grad()
def fewstep_eval(trainer: Any, prompts: list[str], seeds: list[int], timesteps: list[float]) -> dict[str, float]:
    """Reward of the K-step generator (``fewstep`` sampler) before (reference) and after, same noise per seed."""
    from trl_video.sampling import fewstep_sample
    from trl_video.stats import mean_sem

    policy = trainer.policy
    out = {}
    for tag in ("before", "after"):
        lats = []
        for p, s in zip(prompts, seeds):
            # one generator per seed, drawn in the order the fewstep sampler draws: initial noise, then re-noise
            g = torch.Generator().manual_seed(int(s))
            x = torch.randn(1, *policy.latent_shape, generator=g).to(policy.device)
            emb, _ = policy.encode_prompts([p])
            renoise = lambda k, shape, g=g: torch.randn(*shape, generator=g).to(policy.device)  # noqa: E731
            with policy.reference() if tag == "before" else contextlib.nullcontext(None) as net:
                lats.append(fewstep_sample(policy, x, emb, timesteps, renoise, net=net))
        out[tag] = trainer.ctx.score(torch.cat(lats), prompts).cpu()
    d = mean_sem(out["after"] - out["before"])
    return {"fewstep_reward_before": float(out["before"].mean()), "fewstep_reward_after": float(out["after"].mean()),
            "fewstep_gain": d["mean"], "fewstep_gain_sem": d["sem"]}


# ------------------------------------------------------------------------------------------------ one setting
class RolloutCounter:
    """A trainer callback: counts the samples the sampler generated (the ``on_rollout`` event, once per fresh
    batch)."""

    def __init__(self) -> None:
        self.rollouts = 0

    def on_rollout(self, args: Any, state: Any, control: Any, rollouts: Any = None, **kwargs: Any) -> None:
        self.rollouts += len(rollouts) if rollouts is not None else 0


def run_recipe(recipe: dict[str, Any], output_dir: str, eval_prompts: int | None = None) -> dict[str, Any]:
    """Train one recipe; measure rollouts generated, offline samples consumed and wall-clock; then evaluate."""
    import shutil

    from trl_video.config import config_from_dict
    from trl_video.evaluation import eval_pairs, evaluate_trainer
    from trl_video.trainer import VideoRewardTrainer

    if Path(output_dir).exists():  # a rerun of the same setting starts afresh
        shutil.rmtree(output_dir)
    rec = dict(recipe, output_dir=output_dir, eval_at_end=False, save_model_at_end=False, report_to="none")
    if eval_prompts:
        rec["eval_num_prompts"] = eval_prompts
    if rec.get("offline_latents"):
        ensure_offline(str(rec["offline_latents"]), model=str(rec.get("model", "tiny-cogvideox")))
    cfg = config_from_dict(rec)
    counter = RolloutCounter()
    trainer = VideoRewardTrainer(cfg, recipe=rec, callbacks=[counter])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    counts = {"rollouts": counter.rollouts,
              "offline": trainer.ctx.offline.drawn if trainer.ctx.offline is not None else 0}
    ev = evaluate_trainer(trainer)
    res = {"model": str(rec.get("model")), "steps": trainer.global_step, "rollouts": counts["rollouts"], "offline_samples": counts["offline"],
           "train_seconds": wall, "reward": ev["reward"], "reward_before": ev["reward_before"],
           "reward_after": ev["reward_after"], "gain": ev["gain"], "gain_sem": ev["gain_sem"],
           "per_reward": {k: {"before": v["before"]["mean"], "after": v["after"]["mean"], "gain": v["gain"]["mean"],
                              "gain_sem": v["gain"]["sem"]} for k, v in ev["per_reward"].items()},
           "eval_json": str(Path(output_dir) / "eval" / "eval_results.json")}
    if rec.get("sampler") == "fewstep":
        ts = rec.get("sampler_args", {}).get("timesteps") or [1.0, 0.75, 0.5, 0.25]
        prompts, seeds = eval_pairs(cfg.eval_prompts, cfg.eval_num_prompts)
        res.update(fewstep_eval(trainer, prompts, seeds, ts))
    (Path(output_dir) / "fcrm_result.json").write_text(json.dumps(res, indent=2))
    return res


def load_recipe(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'setting':<9} {'reward':<10} {'before':>8} {'after':>8} {'gain':>8} {'+-sem':>7} {'rollouts':>9} "
            f"{'offline':>8} {'train s':>8} {'gain/1k roll':>12}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        per_k = r["gain"] / r["rollouts"] * 1000 if r["rollouts"] else float("nan")
        lines.append(f"{name:<9} {r['reward']:<10} {r['reward_before']:8.4f} {r['reward_after']:8.4f} "
                     f"{r['gain']:8.4f} {r['gain_sem']:7.4f} {r['rollouts']:9d} {r['offline_samples']:8d} "
                     f"{r['train_seconds']:8.1f} {per_k:12.4f}")
        if "fewstep_gain" in r:
            lines.append(f"{'':<9} {'(K-step)':<10} {r['fewstep_reward_before']:8.4f} {r['fewstep_reward_after']:8.4f} "
                         f"{r['fewstep_gain']:8.4f} {r['fewstep_gain_sem']:7.4f}")
    return "\n".join(lines)


def bench_fcrm(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench fcrm.settings",
                                 description="FCRM behaviour distributions side by side (tiny recipes).")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--steps", type=int, default=None, help="override max_steps of every recipe")
    ap.add_argument("--eval-prompts", type=int, default=None, help="override eval_num_prompts")
    ap.add_argument("--set", action="append", default=[], help="key=value override for every recipe (YAML value)")
    ap.add_argument("--out", default="out/fcrm/bench")
    ap.add_argument("--json", help="write all results here (default: <out>/bench.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--recipes", help="folder of the fcrm_<setting>.yaml recipes (default: the checkout's recipes/tiny)")
    a = ap.parse_args(argv)
    import yaml

    torch.set_num_threads(a.threads)
    rows: dict[str, dict[str, Any]] = {}
    for name in [s.strip() for s in a.settings.split(",") if s.strip()]:
        if name not in SETTINGS:
            ap.error(f"unknown setting '{name}' (choose from {', '.join(SETTINGS)})")
        rec = load_recipe(recipes_dir(a.recipes) / f"fcrm_{name}.yaml")
        if a.steps:
            rec["max_steps"] = a.steps
        for item in a.set:
            k, _, v = item.partition("=")
            rec[k] = yaml.safe_load(v)
        print(f"== {name}: {rec.get('max_steps')} steps", flush=True)
        rows[name] = run_recipe(rec, f"{a.out}/{name}", a.eval_prompts)
        print(table({name: rows[name]}), flush=True)
    models = sorted({str(r.get("model")) for r in rows.values()})
    print(f"\nFCRM behaviour settings ({', '.join(models)}; eval on held-out prompts, same seeds before/after):")
    print(table(rows))
    path = Path(a.json or f"{a.out}/bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(f"results: {path}")
    return 0


def build_offline_main(argv: list[str]) -> int:
    from .experiments import main

    return main(["build-offline", *argv])


def lightness_main(argv: list[str]) -> int:
    from .experiments import main

    return main(["lightness", *argv])


BENCHMARKS = {"settings": bench_fcrm, "build-offline": build_offline_main, "lightness": lightness_main}
BENCHMARK_ALIASES = {"fcrm": "settings"}
# the offline-latents datasets of recipes/tiny/fcrm_offline.yaml and fcrm_hybrid.yaml (build-offline writes both)
BUILDS = {"out/fcrm/world_latents_luminance": "trl-video bench fcrm.build-offline",
          "out/fcrm/world_latents_alignment": "trl-video bench fcrm.build-offline"}
