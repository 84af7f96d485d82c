"""Reward-Forcing's data and demo commands (``benchmarks/reward_forcing``, from a checkout), on the plugin's
library functions (``vidrl_plugin_reward_forcing.ode.build_ode_dataset``, ``.streaming.stream``):

* ``trl-video bench reward_forcing.build-ode``: build the stage-1 teacher ODE-trajectory dataset once.
* ``trl-video bench reward_forcing.stream``: write a video longer than the training length chunk by chunk (GIF
  frames appended as each chunk is decoded), then time streaming against the bidirectional teacher generating the
  whole clip at once, interleaved: time to first chunk and chunks/s, median [min, max] and mean +- s.e.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from trl_video.errors import TrlVideoError


def _load_causal(model: str, chunk_size: int):
    from vidrl_plugin_reward_forcing import RewardForcingConfig, make_causal

    from trl_video.models.policy import load_policy

    policy = load_policy(model)
    make_causal(policy, RewardForcingConfig(chunk_size=chunk_size))
    policy.transformer.eval()
    return policy


def cmd_build_ode(argv: list[str]) -> int:
    from vidrl_plugin_reward_forcing.ode import build_ode_dataset

    from trl_video.data import load_prompts
    from trl_video.models.policy import load_policy

    ap = argparse.ArgumentParser(prog="trl-video bench reward_forcing.build-ode",
                                 description="Teacher ODE trajectories at the student's K levels -> HF dataset.")
    ap.add_argument("--teacher", default="tiny-wan", help="bidirectional teacher (preset, folder or hub id)")
    ap.add_argument("--out", required=True, help="output folder (HF dataset + ode_meta.json)")
    ap.add_argument("--prompts", default="world:train", help="prompt source (world:train, a .jsonl/.txt file, ...)")
    ap.add_argument("--num", type=int, default=512, help="trajectories (paper: 1.4K on Wan2.1)")
    ap.add_argument("--num-steps", type=int, default=4, help="student denoising steps K")
    ap.add_argument("--teacher-steps", type=int, default=20, help="teacher Euler steps (a multiple of K)")
    ap.add_argument("--guidance", type=float, default=1.0, help="teacher CFG scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)
    if Path(a.out).exists():
        raise TrlVideoError(f"--out '{a.out}' exists (nothing was changed); choose another folder")
    teacher = load_policy(a.teacher)
    pool = load_prompts(a.prompts)
    prompts = [pool[i % len(pool)] for i in range(a.num)]
    seeds = [a.seed * 1_000_003 + i for i in range(a.num)]
    out = build_ode_dataset(teacher, prompts, seeds, a.out, num_steps=a.num_steps, teacher_steps=a.teacher_steps,
                            guidance_scale=a.guidance, batch_size=a.batch_size, teacher_name=a.teacher)
    print(f"wrote {a.num} trajectories to {out}")
    return 0


def _spread(xs: list[float], digits: int) -> dict[str, Any]:
    from trl_video.stats import mean_sem

    ms = mean_sem(torch.tensor(xs, dtype=torch.float64))
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "mean": round(ms["mean"], digits), "se": round(ms["sem"], digits),
            "values": [round(x, digits) for x in xs]}


def cmd_stream(argv: list[str]) -> int:
    """Stream a video ``--length`` x the training length from the causal generator (GIF written chunk by chunk),
    then time streaming against the bidirectional teacher generating the whole clip at once, interleaved."""
    import imageio.v2 as imageio
    from vidrl_plugin_reward_forcing.streaming import stream

    from trl_video.models.policy import load_policy
    from trl_video.sampling import ode_sample, seeded_noise

    ap = argparse.ArgumentParser(prog="trl-video bench reward_forcing.stream",
                                 description="Stream a long video from the causal generator, chunk by chunk, and "
                                             "time it against generating the whole clip bidirectionally.")
    ap.add_argument("--model", required=True, help="a saved causal model folder (or a Wan teacher + --chunk-size)")
    ap.add_argument("--teacher", default=None, help="bidirectional model generating the whole clip at once "
                                                    "(default: the base model the causal folder records)")
    ap.add_argument("--prompt", default="a red circle moving right on a dark background")
    ap.add_argument("--length", type=float, default=3.0, help="video length in multiples of the training length")
    ap.add_argument("--chunk-size", type=int, default=1, help="chunk size when --model is a bidirectional teacher")
    ap.add_argument("--num-steps", type=int, default=4, help="denoising steps per chunk")
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[20, 4],
                    help="ODE steps of the bidirectional whole-clip runs (one timed row each)")
    ap.add_argument("--max-context", type=int, default=None, help="latent frames of KV-cache context (default all)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, interleaved (0: only the GIF)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/reward_forcing/stream.gif")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    for flag, v in (("--length", a.length), ("--num-steps", a.num_steps), ("--reps", a.reps + 1)):
        if v <= 0:
            raise TrlVideoError(f"{flag} must be > 0, got {v}")
    policy = _load_causal(a.model, a.chunk_size)
    cs = policy.transformer.config.chunk_size
    train_frames = policy.latent_shape[1]
    frames = max(cs, int(round(train_frames * a.length / cs)) * cs)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(out, mode="I", duration=1000 / 8, loop=0)

    def write(i: int, px) -> None:
        from trl_video.evaluation import to_uint8_frames

        for frame in to_uint8_frames(px[None])[0]:
            writer.append_data(frame)
        print(f"chunk {i}: {px.shape[1]} frames written", flush=True)

    try:  # the GIF pass (also the warm-up): not timed
        first = stream(policy, a.prompt, frames, seed=a.seed, num_steps=a.num_steps, max_context=a.max_context,
                       on_pixels=write)
    finally:
        writer.close()
    meta_file = Path(a.model) / "trl_video.json"
    teacher_name = a.teacher or (json.loads(meta_file.read_text()).get("base_model") if meta_file.exists() else None)
    if not teacher_name:
        raise TrlVideoError(f"--teacher is needed: '{a.model}' records no base model")
    temporal = policy.vae.config.scale_factor_temporal
    teacher = load_policy(teacher_name, num_frames=(frames - 1) * temporal + 1)
    teacher.transformer.eval()
    if teacher.latent_shape[1] != frames:
        raise TrlVideoError(f"--teacher '{teacher_name}': {teacher.latent_shape[1]} latent frames, need {frames}")
    emb, _ = teacher.encode_prompts([a.prompt])  # outside the timing, as stream() encodes before its clock starts

    def whole_clip(steps: int, seed: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            lat = ode_sample(teacher, seeded_noise(teacher.latent_shape, [seed]), emb, teacher.schedule.timesteps(steps))
            teacher.decode(lat)
        return time.perf_counter() - t0

    n_chunks = frames // cs
    rows: dict[str, list[dict[str, float]]] = {"stream": [], **{f"bidirectional_{s}": [] for s in a.teacher_steps}}
    load_before = os.getloadavg()
    for rep in range(a.reps):  # interleaved, the order rotated each repetition
        names = list(rows)
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            if name == "stream":
                st = stream(policy, a.prompt, frames, seed=a.seed + 1 + rep, num_steps=a.num_steps,
                            max_context=a.max_context)
                rows[name].append({"ttfc": st.time_to_first_chunk, "total": st.chunk_seconds[-1]})
            else:
                total = whole_clip(int(name.rsplit("_", 1)[1]), a.seed + 1 + rep)
                rows[name].append({"ttfc": total, "total": total})  # its first frame exists when the clip is done
    res: dict[str, Any] = {
        "command": "trl-video bench reward_forcing.stream " + " ".join(argv), "model": a.model,
        "teacher": teacher_name, "prompt": a.prompt, "latent_frames": frames, "training_latent_frames": train_frames,
        "pixel_frames": first.frames, "chunk_size": cs, "chunks": n_chunks, "steps_per_chunk": a.num_steps,
        "reps_interleaved": a.reps, "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "gif": str(out),
        "note": "bidirectional = the teacher generating the whole clip at once: its first chunk exists only when "
                "the clip is done (time to first chunk = total time); chunks/s counts the same chunks for both; "
                "prompt encoding is outside every clock",
    }
    for name, rs in rows.items():
        if rs:
            res[name] = {"time_to_first_chunk_s": _spread([r["ttfc"] for r in rs], 4),
                         "chunks_per_s": _spread([n_chunks / r["total"] for r in rs], 3)}
    print(f"{frames} latent frames ({first.frames} pixel frames, {a.length:g}x the training length {train_frames}), "
          f"{n_chunks} chunks of {cs}; {a.reps} interleaved reps, load {res['load_average_1min']}")
    if a.reps:
        print(f"{'':<30}{'time to first chunk (s)':>28}{'chunks/s':>30}")
        for name in rows:
            t, c = res[name]["time_to_first_chunk_s"], res[name]["chunks_per_s"]
            label = f"stream ({a.num_steps}/chunk, KV cache)" if name == "stream" else \
                f"whole clip, {name.rsplit('_', 1)[1]} ODE steps"
            print(f"{label:<30}{t['median']:>10.4f} [{t['min']:.4f}, {t['max']:.4f}]{'':>5}"
                  f"{c['median']:>10.3f} [{c['min']:.3f}, {c['max']:.3f}]")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
        print(f"results: {a.json}")
    print(f"video: {out}")
    return 0
