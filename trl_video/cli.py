"""``trl-video`` command line: plugins | train | eval | encode | push | plan | bench | pretrain."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from .errors import TrlVideoError


def load_recipe(path: str) -> dict[str, Any]:
    from .recipe_io import load_yaml_file

    p = Path(path)
    data = load_yaml_file(p)
    if data is None:
        raise TrlVideoError(f"recipe {p} is empty (expected a mapping of config keys, e.g. `method: refl`)")
    if not isinstance(data, dict):
        raise TrlVideoError(f"recipe {p} must be a mapping of config keys, got {type(data).__name__}")
    return data


def apply_overrides(recipe: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` (value parsed as YAML); dotted keys reach into mappings: ``method_args.beta=2``."""
    out = json.loads(json.dumps(recipe, default=str))
    for item in sets:
        if "=" not in item:
            raise TrlVideoError(f"--set '{item}': expected key=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrlVideoError(f"--set '{item}': '{part}' is not a mapping")
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------------ commands
def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import KINDS, get_registry

    reg = get_registry()
    for kind in KINDS:
        items = reg.items(kind)
        print({"loss": "losses", "bench": "benchmarks"}.get(kind, f"{kind}s") + ":")
        for info in items:
            print(f"  {info.name:<18} {info.distribution} {info.version}")
        if not items:
            print("  (none)")
    for reason in reg.broken.values():
        print(f"broken: {reason}")
    return 0


def cmd_train(argv: list[str]) -> int:
    from .parsing import parse_train_args
    from .plan import resolve_plan
    from .plugins import get_registry
    from .recipe_io import env_refs, expand_env_config, redact
    from .validation import validate_config

    parsed = parse_train_args(argv)
    recipe = parsed.recipe  # keeps its ${env:NAME} references: it is what checkpoints and the model card record
    config = expand_env_config(parsed.config, where=f"recipe {parsed.recipe_path or '(command line)'}")
    registry = get_registry()
    plan = resolve_plan(config, registry)
    validate_config(config, plan, registry)  # the same checks as the trainer's: a valid dry run starts
    if parsed.dry_run:
        print(f"recipe   {parsed.recipe_path or '(none: defaults and flags)'}: valid")
        print(f"model    {config.model}\noutput   {config.output_dir}")
        print(f"steps    {config.max_steps} x ({config.prompts_per_step} prompts x {config.group_size} samples)")
        print(redact(plan.describe(), env_refs(recipe)))
        return 0
    from .trainer import VideoRewardTrainer

    trainer = VideoRewardTrainer(config, registry=registry, recipe=recipe, resume=parsed.resume,
                                 accept_recipe_changes=parsed.accept_recipe_changes)
    result = trainer.train()
    if result.get("interrupted"):
        import signal

        signum = result["interrupted"]
        if trainer.is_main:
            ck = Path(config.output_dir) / f"checkpoint-{result['global_step']}"
            print(f"error: stopped by {signal.Signals(signum).name} after step {result['global_step']}: checkpoint "
                  f"{ck} written; continue with --resume", file=sys.stderr)
        return 128 + signum
    if trainer.is_main:
        out = Path(config.output_dir)
        saved = f"; model: {out / 'model'}" if config.save_model_at_end else ""
        print(f"done: {result['global_step']} steps{saved}; metrics: {out / 'metrics.jsonl'}")
        if "eval" in result:
            ev = result["eval"]
            print(f"eval: {ev['reward']} {ev['reward_before']:.4f} -> {ev['reward_after']:.4f} "
                  f"(gain {ev['gain']:.4f} +- {ev['gain_sem']:.4f} s.e., n={ev['num_prompts']})")
            print(f"pictures: {out / 'eval' / 'samples_before_after.png'}, {out / 'eval' / 'samples_before.gif'}, "
                  f"{out / 'eval' / 'samples_after.gif'}, {out / 'eval' / 'reward_curve.png'}")
            print(_feature_line(ev))
            if ev.get("monitor"):
                print(monitor_line(ev["monitor"]))
                if ev["monitor"].get("plot"):
                    print(f"monitor:  {out / 'eval' / ev['monitor']['plot']}")
            print(f"results:  {out / 'eval' / 'eval_results.json'}")
    return 0


def _feature_line(res: dict[str, Any]) -> str:
    """Frechet distances and diversity of an evaluation, one line."""
    m = res.get("metrics") or {}
    fd, se = m.get("frechet_distance") or {}, m.get("frechet_distance_se") or {}
    parts = [f"FD {k} {v:.4f} +- {se.get(k) or 0:.4f}" for k, v in fd.items()]
    div = m.get("diversity") or {}
    if div:
        parts.append(f"diversity before {div['before']['diversity']:.4f} after {div['after']['diversity']:.4f}")
    return "features: " + "; ".join(parts)


def monitor_line(mon: dict[str, Any]) -> str:
    """One line of the reward-hacking monitor: distance to the reference, diversity, held-out rewards."""
    parts = []
    fd = mon["frechet_distance_to_reference"]
    if fd["before"] is not None:
        parts.append(f"FD to ground truth {fd['before']:.3f} +- {fd.get('before_se') or 0:.3f} -> "
                     f"{fd['after']:.3f} +- {fd.get('after_se') or 0:.3f}")
    parts.append(f"diversity {mon['diversity']['before']:.3f} -> {mon['diversity']['after']:.3f}")
    parts += [f"{n} {v['before']:.4f} -> {v['after']:.4f}" for n, v in mon["heldout_rewards"].items()]
    return "hacking monitor: " + "; ".join(parts)


def _model_dir(path: str) -> Path:
    p = Path(path)
    if (p / "model_index.json").exists():
        return p
    if (p / "model" / "model_index.json").exists():
        return p / "model"
    raise TrlVideoError(f"--checkpoint '{path}' holds no saved model (model_index.json or model/model_index.json)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import eval_pairs, eval_sampling_for_run, evaluate
    from .models.policy import load_policy
    from .plan import build_reward
    from .plugins import get_registry

    for flag, value in (("--num-steps", args.num_steps), ("--num-prompts", args.num_prompts)):
        if value < 1:
            raise TrlVideoError(f"{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise TrlVideoError(f"--seed must be >= 0, got {args.seed}")
    model_dir = _model_dir(args.checkpoint)
    out = _eval_out(args.out, model_dir)
    meta_file = model_dir / "trl_video.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    baseline = args.baseline or meta.get("base_model")
    if not baseline:
        raise TrlVideoError(f"--baseline is needed: {model_dir} does not record its base model")
    reg = get_registry()
    names = args.reward or [meta.get("reward", "alignment")]
    rewards = {n: build_reward(reg, n, {}) for n in names}
    # sampled as the run's method samples (a causal generator by its self-rollout); the baseline adapted as the
    # method adapted it before training
    sampling = eval_sampling_for_run(meta.get("run") or {"method": meta.get("method")}, args.num_steps, reg)
    after, before = load_policy(str(model_dir)), load_policy(baseline)
    if sampling.prepare is not None:
        sampling.prepare(before)
    prompts, seeds = eval_pairs(args.prompts, args.num_prompts, args.seed)
    metrics = model_dir.parent / "metrics.jsonl"
    res = evaluate(after, prompts, seeds, rewards, out, policy_before=before, num_steps=args.num_steps,
                   metrics_path=metrics if metrics.exists() else None, main_reward=names[0],
                   prompts_source=args.prompts, checkpoints_dir=model_dir.parent, base_model=baseline,
                   sampling=sampling)
    print(f"{res['reward']}: before {res['reward_before']:.4f} after {res['reward_after']:.4f} "
          f"gain {res['gain']:.4f} +- {res['gain_sem']:.4f} (n={res['num_prompts']}); results in {out}")
    print(_feature_line(res))
    print(monitor_line(res["monitor"]))
    return 0


def _eval_out(requested: str | None, model_dir: Path) -> Path:
    """A folder of its own: never the run's ``eval/`` (written by training) nor any folder holding files."""
    if requested:
        out = Path(requested)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TrlVideoError(f"--out '{out}' already exists and is not empty (nothing was overwritten); "
                                f"choose a new folder")
        return out
    import time

    base = model_dir.parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def cmd_encode(args: argparse.Namespace) -> int:
    from .data import encode_videos
    from .models.policy import load_policy

    if Path(args.out).exists():
        raise TrlVideoError(f"--out '{args.out}' already exists (nothing was overwritten)")
    policy = load_policy(args.model)
    n = encode_videos(args.videos, policy, args.out, batch_size=args.batch_size)
    print(f"encoded {n} videos -> {args.out} (latent shape {tuple(policy.latent_shape)})")
    return 0


def cmd_encode_prompts(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .models.policy import encode_prompt_dataset, load_policy
    from .trainer import PRECISION_DTYPES

    if Path(args.out).exists():
        raise TrlVideoError(f"--out '{args.out}' already exists (nothing was overwritten)")
    prompts = load_prompts(args.prompts, args.prompt_column)
    policy = load_policy(args.model, dtype=PRECISION_DTYPES[args.precision])
    n = encode_prompt_dataset(policy, prompts, args.out, batch_size=args.batch_size, dtype=args.dtype)
    print(f"encoded {n} prompts (with the empty prompt) -> {args.out}; train with `prompt_embeds: {args.out}`")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    url = push_folder(_model_dir(args.checkpoint), args.repo_id, private=args.private, endpoint=args.endpoint)
    print(f"pushed to {url}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench_discovery import REPOSITORY_HINT, benchmarks_root
    from .plugins import get_registry

    reg = get_registry()
    if not args.name or args.name in ("-h", "--help"):
        for info in reg.items("bench"):
            print(f"  {info.name:<28} {info.distribution} {info.version}".rstrip())
        root = benchmarks_root()
        print(f"benchmarks folder: {root}" if root else f"note: {REPOSITORY_HINT}")
        return 0
    fn = reg.get("bench", args.name).obj
    return int(fn(rest) or 0)


def cmd_plan(args: argparse.Namespace) -> int:
    from .memory_plan import cmd_plan as run

    return run(args)


def cmd_reward_serve(args: argparse.Namespace) -> int:
    try:
        from vidrl_plugin_rewards.service import serve
    except ImportError:
        raise TrlVideoError("reward-serve needs vidrl-plugin-rewards: pip install 'vidrl-plugin-rewards[serve]'") from None
    try:
        reward_args = yaml.safe_load(args.reward_args) or {}
    except yaml.YAMLError as exc:
        raise TrlVideoError(f"--reward-args is not YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(reward_args, dict):
        raise TrlVideoError(f"--reward-args must be a mapping, got {type(reward_args).__name__}")
    serve(args.reward, reward_args, args.host, args.port, args.max_batch)
    return 0


def cmd_pretrain(args: argparse.Namespace, rest: list[str]) -> int:
    """Asset building lives in the repository (benchmarks/assets), out of the installed package."""
    from .plugins import get_registry

    return int(get_registry().get("bench", "assets.pretrain").obj(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trl-video", description="Reward fine-tuning / RL for video diffusion models.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list installed components by hook point")
    # train's flags are parsed by trl.TrlParser (trl_video.parsing): `trl-video train --help` lists them
    sub.add_parser("train", help="train from a YAML recipe (--recipe R.yaml [--set k=v] [--<field> value] "
                   "[--resume] [--dry-run])", add_help=False)
    e = sub.add_parser("eval", help="before/after rewards, GIFs and JSON for a trained model")
    e.add_argument("--checkpoint", required=True, help="an output dir (with model/) or a saved model folder")
    e.add_argument("--baseline", help="model to compare with (default: the recorded base model)")
    e.add_argument("--prompts", default="world:heldout")
    e.add_argument("--num-prompts", type=int, default=32)
    e.add_argument("--num-steps", type=int, default=20)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--reward", action="append", help="reward(s) to report (default: the training reward)")
    e.add_argument("--out")
    c = sub.add_parser("encode", help="encode video files into an offline-latents dataset")
    c.add_argument("--videos", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--batch-size", type=int, default=4)
    ep = sub.add_parser("encode-prompts", help="pre-encode a prompt set once into an HF dataset of text embeddings")
    ep.add_argument("--model", required=True)
    ep.add_argument("--prompts", required=True, help="world:<split>, a json/jsonl/csv/parquet/txt file, a dataset "
                                                     "folder or a hub dataset id")
    ep.add_argument("--prompt-column", default="prompt")
    ep.add_argument("--out", required=True)
    ep.add_argument("--batch-size", type=int, default=32)
    ep.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored dtype")
    ep.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                    help="dtype the text encoder runs in (as the recipe's mixed_precision)")
    p = sub.add_parser("push", help="push a saved model folder to the Hub")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT"))
    pl = sub.add_parser("plan", help="memory plan of a recipe: bytes per GPU, fits / does not fit")
    from .memory_plan import add_plan_arguments

    add_plan_arguments(pl)
    rs = sub.add_parser("reward-serve", help="serve a registered reward over HTTP (vidrl-plugin-rewards[serve])")
    rs.add_argument("--reward", required=True, help="registered reward name (or a+b, or a dotted path)")
    rs.add_argument("--reward-args", default="{}", help="constructor arguments as YAML/JSON, e.g. '{frames: all}'")
    rs.add_argument("--host", default="127.0.0.1")
    rs.add_argument("--port", type=int, default=8765)
    rs.add_argument("--max-batch", type=int, default=16, help="largest batch one request may carry")
    # no -h of its own: `trl-video bench NAME --help` reaches the benchmark's parser; `trl-video bench` lists them
    b = sub.add_parser("bench", add_help=False, help="benchmarks (trl-video bench overhead, ...; no name: list them)")
    b.add_argument("name", nargs="?", help="a benchmark (no name: list them)")
    sub.add_parser("pretrain", add_help=False,
                   help="reproduce the embedded tiny base models (from a checkout: benchmarks/assets)")
    return ap


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Deprecation notes of recipe keys as one stderr line (not file:line + source)."""
    print(f"{category.__name__}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("bench", "train", "pretrain"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        if args.command == "train":
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return cmd_train(argv[argv.index("train") + 1:])
        if args.command == "pretrain":
            return cmd_pretrain(args, rest)
        return {"plugins": cmd_plugins, "eval": cmd_eval, "encode": cmd_encode,
                "encode-prompts": cmd_encode_prompts,
                "push": cmd_push, "plan": cmd_plan,
                "reward-serve": cmd_reward_serve}[args.command](args)
    except TrlVideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `trl-video plugins | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
