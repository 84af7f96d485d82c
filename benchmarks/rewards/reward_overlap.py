"""``trl-video bench rewards.reward-overlap``: one training step with a slow remote reward, serial vs overlapped.

Both trainers are FCRM on tiny-wan (same seed, same prompts), scoring through ``reward: http://...`` against
a loopback ``reward-serve`` whose reward is the luminance reward plus a fixed delay per sample (a
stand-in for a reward model on another GPU). Serial: ``score_async: false`` (sample the batch, then score it).
Overlapped: ``score_async: true`` (the batch is scored in a worker while the next batch is sampled). Steps are
interleaved so machine-load drift hits both sides alike; medians and the min-max spread are printed.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import tempfile
import time
from typing import Any

from torch import Tensor

from trl_video.bench import interleaved_timings, timed_comparison_parser


class DelayedReward:
    """A reward that sleeps ``delay * batch`` seconds before scoring (GPU-bound reward model stand-in)."""

    differentiable = False

    def __init__(self, inner: Any, delay: float):
        self.inner, self.delay = inner, delay
        self.space = inner.space
        self.name = f"{getattr(inner, 'name', 'reward')}+{delay}s/sample"

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        time.sleep(self.delay * len(prompts))
        return self.inner(inputs, prompts)


def bench_reward_overlap(argv: list[str]) -> int:
    ap = timed_comparison_parser("trl-video bench rewards.reward-overlap", "Training step with a slow HTTP reward: "
                                 "serial vs overlapped scoring.", steps=6, warmup=1)
    ap.add_argument("--delay", type=float, default=0.05, help="seconds of reward delay per sample")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=2)
    a = ap.parse_args(argv)

    from vidrl_plugin_rewards.service import BackgroundServer, build_app

    from trl_video.components.rewards import LuminanceReward
    from trl_video.config import config_from_dict
    from trl_video.models.policy import load_policy
    from trl_video.trainer import VideoRewardTrainer

    server = BackgroundServer(build_app(DelayedReward(LuminanceReward(), a.delay), max_batch=64)).start()
    base = load_policy(a.model)
    trainers = {}
    try:
        for side, overlap in (("serial", False), ("overlapped", True)):
            cfg = config_from_dict(dict(
                model=a.model, method="fcrm", reward=server.url, prompts_per_step=a.prompts_per_step,
                group_size=a.group_size, score_async=overlap, sampler_args={"num_steps": a.num_steps},
                max_steps=10**6, output_dir=tempfile.mkdtemp(prefix=f"trl-video-bench-{side}-"), report_to="none",
                logging_steps=10**6, seed=0))
            trainers[side] = VideoRewardTrainer(cfg, policy=copy.deepcopy(base))

        def step(side: str) -> float:
            tr = trainers[side]
            t0 = time.perf_counter()
            tr.training_step()
            tr.global_step += 1
            return time.perf_counter() - t0

        times = interleaved_timings({side: functools.partial(step, side) for side in trainers}, a.steps, a.warmup)
    finally:
        for tr in trainers.values():
            if tr._score_worker is not None:
                tr._score_worker.shutdown(wait=True)
        server.stop()
    batch = a.prompts_per_step * a.group_size
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": a.model, "batch": batch, "sampling_steps": a.num_steps, "delay_per_sample_s": a.delay,
           "reward_delay_per_step_s": a.delay * batch, "timed_steps": a.steps,
           "serial_step_s": med["serial"], "overlapped_step_s": med["overlapped"],
           "speedup": med["serial"] / med["overlapped"],
           "serial_range_s": [min(times["serial"]), max(times["serial"])],
           "overlapped_range_s": [min(times["overlapped"]), max(times["overlapped"])]}
    print(f"FCRM step on {a.model}, batch {batch}, {a.num_steps} sampling steps, HTTP reward with "
          f"{a.delay * batch:.2f} s delay per step ({a.delay} s/sample); median of {a.steps} interleaved steps:")
    print(f"  serial      (score_async off)   {med['serial']:7.3f} s   [min {res['serial_range_s'][0]:.3f}, "
          f"max {res['serial_range_s'][1]:.3f}]")
    print(f"  overlapped  (score_async on)    {med['overlapped']:7.3f} s   "
          f"[min {res['overlapped_range_s'][0]:.3f}, max {res['overlapped_range_s'][1]:.3f}]")
    print(f"  speed-up    serial / overlapped  {res['speedup']:7.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
