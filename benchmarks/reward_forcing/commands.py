"""Reward-Forcing's data and demo commands (``benchmarks/reward_forcing``, from a checkout), on the plugin's
library functions (``vidrl_plugin_reward_forcing.ode.build_ode_dataset``, ``.streaming.stream``):

* ``trl-video bench reward_forcing.build-ode``: build the stage-1 teacher ODE-trajectory dataset once.
* ``trl-video bench reward_forcing.stream``: write a video longer than the training length chunk by chunk (GIF
  frames appended as each chunk is decoded), printing the time to the first chunk and chunks/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def cmd_stream(argv: list[str]) -> int:
    import imageio.v2 as imageio
    from vidrl_plugin_reward_forcing.streaming import stream

    ap = argparse.ArgumentParser(prog="trl-video bench reward_forcing.stream",
                                 description="Stream a long video from the causal generator, chunk by chunk.")
    ap.add_argument("--model", required=True, help="a saved causal model folder (or a Wan teacher + --chunk-size)")
    ap.add_argument("--prompt", default="a red circle moving right on a dark background")
    ap.add_argument("--length", type=float, default=3.0, help="video length in multiples of the training length")
    ap.add_argument("--chunk-size", type=int, default=1, help="chunk size when --model is a bidirectional teacher")
    ap.add_argument("--num-steps", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=None, help="latent frames of KV-cache context (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/reward_forcing/stream.gif")
    a = ap.parse_args(argv)
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

    try:
        stats = stream(policy, a.prompt, frames, seed=a.seed, num_steps=a.num_steps, max_context=a.max_context,
                       on_pixels=write)
    finally:
        writer.close()
    res = {"latent_frames": frames, "training_latent_frames": train_frames, "pixel_frames": stats.frames,
           "chunks": len(stats.chunk_seconds), "time_to_first_chunk_s": round(stats.time_to_first_chunk, 4),
           "chunks_per_s": round(stats.chunks_per_second, 3), "out": str(out)}
    print(json.dumps(res))
    return 0
