"""Benchmarks (not timed tests): each prints both sides of a ratio measured in one run."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------ shared
def timed_comparison_parser(prog: str, description: str, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every two-sided timing bench takes: --model, --num-steps, --steps, --warmup, --json."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--model", default="tiny-wan")
    ap.add_argument("--num-steps", type=int, default=8, help="sampling steps")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps per side first")
    ap.add_argument("--json", help="also write the results here")
    return ap


def interleaved_timings(sides: dict[str, Callable[[], float]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of ``steps`` runs of each side (each callable times itself), after ``warmup`` untimed ones. Round
    ``i`` runs the sides back to back, in reverse order every other round, so machine-load drift hits them alike
    and ``times[a][i] / times[b][i]`` is a ratio under one load."""
    for _ in range(warmup):
        for run in sides.values():
            run()
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        for n in names if i % 2 == 0 else names[::-1]:
            times[n].append(sides[n]())
    return times


def quartiles(xs: list[float]) -> tuple[float, float]:
    """First and third quartile (the interquartile range a bench prints as its spread)."""
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def _manual_refl_step(policy, opt, reward, prompts, gen, num_steps: int, grad_steps: int, max_norm: float) -> float:
    """A minimal hand-written ReFL step: no trainer, no hooks, no logging."""
    sch = policy.schedule
    grid = sch.timesteps(num_steps)
    emb, _ = policy.encode_prompts(prompts)
    x = torch.randn(len(prompts), *policy.latent_shape, generator=gen)
    for i in range(num_steps):
        with torch.set_grad_enabled(i >= num_steps - grad_steps):
            t = grid[i].expand(len(prompts))
            v = policy.predict(x, t, emb)
            x, _ = sch.ddim_step(sch.to_x0(v, x, t), sch.to_eps(v, x, t), grid[i], grid[i + 1])
    loss = -reward(policy.decode(x), prompts).mean()
    loss.backward()
    params = policy.trainable_parameters()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def bench_overhead(argv: list[str]) -> int:
    ap = timed_comparison_parser("trl-video bench overhead", "Trainer step vs a hand-written PyTorch ReFL step "
                                 "(same work).", steps=20, warmup=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-steps", type=int, default=1)
    a = ap.parse_args(argv)

    import tempfile

    from .components.rewards import AlignmentReward
    from .config import VideoRewardConfig
    from .models.policy import load_policy
    from .trainer import VideoRewardTrainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_policy(a.model)
    out = tempfile.mkdtemp(prefix="trl-video-bench-")
    cfg = VideoRewardConfig(model=a.model, method="refl", reward="alignment", prompts="world:train",
                            prompts_per_step=a.batch, group_size=1, max_steps=10**6, output_dir=out,
                            report_to="none", sampler_args={"num_steps": a.num_steps, "grad_steps": a.grad_steps},
                            logging_steps=10**6)
    trainer = VideoRewardTrainer(cfg, policy=copy.deepcopy(base))
    manual = copy.deepcopy(base)
    torch.manual_seed(0)
    manual.add_adapter(cfg.peft_config())
    opt = torch.optim.AdamW(manual.trainable_parameters(), lr=cfg.learning_rate)
    reward = AlignmentReward()
    prompts_all = trainer.prompt_sampler.prompts
    gen = torch.Generator().manual_seed(0)

    def run_trainer() -> float:
        t0 = time.perf_counter()
        trainer.training_step()
        trainer.global_step += 1
        return time.perf_counter() - t0

    def run_manual() -> float:
        idx = torch.randint(len(prompts_all), (a.batch,), generator=gen).tolist()
        t0 = time.perf_counter()
        _manual_refl_step(manual, opt, reward, [prompts_all[i] for i in idx], gen, a.num_steps, a.grad_steps,
                          cfg.max_grad_norm)
        return time.perf_counter() - t0

    times = interleaved_timings({"manual": run_manual, "trainer": run_trainer}, a.steps, a.warmup)
    t_tr, t_man = times["trainer"], times["manual"]
    med_tr, med_man = statistics.median(t_tr), statistics.median(t_man)
    pair_ratios = [tr / man for tr, man in zip(t_tr, t_man)]  # each pair ran back to back: same load

    res = {"model": a.model, "batch": a.batch, "sampling_steps": a.num_steps, "grad_steps": a.grad_steps,
           "timed_steps": a.steps, "trainer_step_s": med_tr, "manual_step_s": med_man, "ratio": med_tr / med_man,
           "trainer_step_iqr_s": quartiles(t_tr), "manual_step_iqr_s": quartiles(t_man),
           "paired_ratio_median": statistics.median(pair_ratios), "paired_ratio_iqr": quartiles(pair_ratios),
           "target": 1.03}
    print(f"ReFL step ({a.model}, batch {a.batch}, {a.num_steps} sampling steps, {a.grad_steps} with grad), "
          f"median of {a.steps}, interleaved [interquartile range]:")
    for name, med, (lo, hi) in (("trainer", med_tr, res["trainer_step_iqr_s"]),
                                ("hand-written", med_man, res["manual_step_iqr_s"])):
        print(f"  {name:<12} {med * 1000:8.1f} ms  [{lo * 1000:.1f}, {hi * 1000:.1f}]")
    lo, hi = res["paired_ratio_iqr"]
    print(f"  ratio        {res['ratio']:8.3f}  (target <= 1.03); per-pair ratio median "
          f"{res['paired_ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


# ------------------------------------------------------------------------------------------------ scaling
SCALING_VARIANTS = {  # name: (ranks, threads per rank, share of the global batch one rank computes)
    "1x1": (1, 1, 1.0),
    "1x2": (1, 2, 1.0),
    "2x1": (2, 1, 0.5),
    "1x1-half": (1, 1, 0.5),  # one rank's share of the 2-rank run, alone: separates fixed costs from sync
}


def _scaling_config(a: argparse.Namespace, batch: int, out: str):
    from .config import VideoRewardConfig

    return VideoRewardConfig(model=a.model, method="refl", reward="alignment", prompts="world:train",
                             sampler_args={"num_steps": a.num_steps, "grad_steps": a.grad_steps},
                             method_args={"kl_weight": 0.0}, prompts_per_step=batch, group_size=1,
                             max_steps=10**6, learning_rate=2e-3, lora_r=8, seed=0, output_dir=out,
                             report_to="none", save_model_at_end=False, logging_steps=10**6,
                             num_frames=a.frames, height=a.size, width=a.size)


def scaling_worker(argv: list[str]) -> int:
    """One variant of ``bench scaling`` (one process per rank): time each step and where it goes."""
    a = json.loads(argv[0])
    torch.set_num_threads(a["threads"])
    import tempfile

    from .trainer import VideoRewardTrainer

    trainer = VideoRewardTrainer(_scaling_config(argparse.Namespace(**a), a["batch"], tempfile.mkdtemp()))
    acc = trainer.accelerator
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # sample + reward + estimator (per rank: its own slice of the prompts), backward, grad sync, metric reduction
    for obj, attr, part in ((trainer, "_fresh_rollouts", "rollouts"), (trainer, "_backward", "backward"),
                            (trainer, "_sync_gradients", "grad_sync"), (trainer, "_reduce_metrics", "metrics"),
                            (trainer.loss, "compute", "loss")):
        setattr(obj, attr, timed(part, getattr(obj, attr)))
    ready = time.time() - a["launched"]
    steps, parts = [], []
    for i in range(a["warmup"] + a["steps"]):
        acc.wait_for_everyone()
        spent.clear()
        t0 = time.perf_counter()
        trainer.training_step()
        trainer.global_step += 1
        if i >= a["warmup"]:
            steps.append(time.perf_counter() - t0)
            parts.append(dict(spent))
    res = {"rank": acc.process_index, "ranks": acc.num_processes, "startup_s": ready, "step_s": steps,
           "parts": parts, "text_encoder_calls": trainer.policy.text_encoder_calls}
    Path(a["out"]).with_suffix(f".rank{acc.process_index}.json").write_text(json.dumps(res))
    acc.wait_for_everyone()
    return 0


def _run_variant(a: argparse.Namespace, name: str, out: Path) -> list[dict]:
    import os
    import socket
    import subprocess
    import sys

    ranks, threads, share = SCALING_VARIANTS[name]
    args = {"model": a.model, "num_steps": a.num_steps, "grad_steps": a.grad_steps, "threads": threads,
            "frames": a.frames, "size": a.size,
            "batch": int(a.batch * share) if ranks == 1 else a.batch, "steps": a.steps, "warmup": a.warmup,
            "out": str(out), "launched": time.time()}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    worker = ["-m", "trl_video.bench", "scaling-worker", json.dumps(args)]
    if ranks == 1:
        cmd = [sys.executable, *worker]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), *worker]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]


def scaling_breakdown(runs: list[list[dict]], one_s: float, half_s: float) -> dict[str, float]:
    """Where a 2-rank step goes beyond the ideal ``T(1x1) / 2``, from the per-step parts of every run of the 2-rank
    variant (``runs[run][rank]``, as ``scaling_worker`` writes them) and the 1-rank step times ``one_s`` (whole
    batch) and ``half_s`` (one rank's share alone). Per step, the rank that reaches the all-reduce last spends in
    it only the communication; the other also waits there for it. So per step: communication = the smaller of
    the two ranks' all-reduce times, imbalance = their difference, each rank's compute = its step minus all-reduce
    and metric gather. Medians over the steps of a run, then over runs."""
    comm, wait, metrics, fast, slow = [], [], [], [], []
    for ranks in runs:
        steps = list(zip(*(zip(r["step_s"], r["parts"]) for r in ranks)))  # steps[i] = ((step_s, parts) per rank)
        sync = [[p.get("grad_sync", 0.0) for _, p in st] for st in steps]
        compute = [[t - p.get("grad_sync", 0.0) - p.get("metrics", 0.0) for t, p in st] for st in steps]
        comm.append(statistics.median(min(s) for s in sync))
        wait.append([max(s) - min(s) for s in sync])
        metrics.append(statistics.median(max(p.get("metrics", 0.0) for _, p in st) for st in steps))
        fast.append(statistics.median(min(c) for c in compute))
        slow.append(statistics.median(max(c) for c in compute))
    two = statistics.median(statistics.median(r[0]["step_s"]) for r in runs)
    return {"ideal_s": one_s / 2, "fixed_cost_s": half_s - one_s / 2, "distributed_s": two - half_s,
            "grad_sync_s": statistics.median(comm), "metrics_s": statistics.median(metrics),
            "contention_s": statistics.median(fast) - half_s,
            "wait_in_sync_s": statistics.median(statistics.median(w) for w in wait),
            "wait_mean_s": statistics.median(statistics.mean(w) for w in wait),
            "slower_rank_compute_s": statistics.median(slow), "faster_rank_compute_s": statistics.median(fast)}


def bench_scaling(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench scaling",
                                 description="Data-parallel scaling on CPU at a fixed global batch: 2 ranks x 1 thread "
                                             "vs 1 rank x 1 thread (efficiency) and vs 1 rank x 2 threads; fresh "
                                             "processes, variants interleaved round by round.")
    ap.add_argument("--model", default="tiny-wan")
    ap.add_argument("--batch", type=int, default=8, help="global batch (the quickstart's)")
    ap.add_argument("--num-steps", type=int, default=8, help="sampling steps (the quickstart's)")
    ap.add_argument("--grad-steps", type=int, default=2)
    ap.add_argument("--frames", type=int, default=None,
                    help="video frames (default: the model's, 9); more frames/pixels = more compute per call")
    ap.add_argument("--size", type=int, default=None, help="video height = width in pixels (default: the model's, 32)")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant (the spread is across them)")
    ap.add_argument("--variants", default="1x1,1x2,2x1,1x1-half")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    import os
    import tempfile

    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in SCALING_VARIANTS]
    if unknown:
        from .errors import TrlVideoError

        raise TrlVideoError(f"bench scaling: unknown variants {unknown}; known: {', '.join(SCALING_VARIANTS)}")
    from .validation import check_model_geometry

    check_model_geometry(_scaling_config(a, a.batch, "unused"))  # a bad --frames/--size: one line here, not per worker
    tmp = Path(tempfile.mkdtemp(prefix="trl-video-scaling-"))
    load = [os.getloadavg()[0]]
    runs: dict[str, list[list[dict]]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so drift hits every variant alike
        for n in order:
            runs[n].append(_run_variant(a, n, tmp / f"{n}-{r}"))
            load.append(os.getloadavg()[0])
            print(f"  round {r + 1}/{a.rounds} {n:<9} median step "
                  f"{statistics.median(runs[n][-1][0]['step_s']) * 1000:7.1f} ms", flush=True)

    def per_run(n: str) -> list[float]:  # median step time of each run (rank 0: steps are synchronous)
        return [statistics.median(rk[0]["step_s"]) for rk in runs[n]]

    def part(n: str, key: str, rank: int = 0) -> float:
        return statistics.median(statistics.median(p.get(key, 0.0) for p in rk[rank]["parts"]) for rk in runs[n])

    res: dict[str, Any] = {"model": a.model, "frames": a.frames, "size": a.size, "global_batch": a.batch,
                           "sampling_steps": a.num_steps, "grad_steps": a.grad_steps, "timed_steps": a.steps,
                           "rounds": a.rounds, "load_average": {"min": min(load), "max": max(load)}, "variants": {}}
    for n in names:
        ts = per_run(n)
        res["variants"][n] = {"step_s": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": ts,
                              "samples_per_s": a.batch * SCALING_VARIANTS[n][2] / statistics.median(ts),
                              "startup_s": statistics.median(rk[0]["startup_s"] for rk in runs[n]),
                              "parts": {k: part(n, k) for k in ("rollouts", "loss", "backward", "grad_sync",
                                                                 "metrics")}}
    video = f"{a.frames or 'default'} frames x {a.size or 'default'} px"
    print(f"Data-parallel scaling ({a.model}, {video}, ReFL, global batch {a.batch}, {a.num_steps} sampling steps, "
          f"{a.grad_steps} with grad); median of {a.steps} steps per run, {a.rounds} runs per variant, interleaved; "
          f"load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    for n, v in res["variants"].items():
        print(f"  {n:<9} {v['step_s'] * 1000:8.1f} ms/step  (runs {v['min'] * 1000:.0f}-{v['max'] * 1000:.0f})  "
              f"start-up {v['startup_s']:.1f} s")
    V = res["variants"]
    if "1x1" in V and "2x1" in V:
        ts1, ts2 = per_run("1x1"), per_run("2x1")
        eff = [t1 / (2 * t2) for t1, t2 in zip(ts1, ts2)]  # per round: both measured close in time
        res["efficiency"] = {"median": statistics.median(eff), "min": min(eff), "max": max(eff), "target": 0.9}
        print(f"  scaling efficiency  T(1x1) / (2 T(2x1)) = {statistics.median(eff):.3f} "
              f"(rounds {min(eff):.3f}-{max(eff):.3f}; target >= 0.9)")
    if "1x2" in V and "2x1" in V:
        sp = [t12 / t21 for t12, t21 in zip(per_run("1x2"), per_run("2x1"))]
        res["speedup_vs_1x2"] = {"median": statistics.median(sp), "min": min(sp), "max": max(sp)}
        print(f"  2 ranks x 1 thread vs 1 rank x 2 threads: {statistics.median(sp):.3f}x "
              f"(rounds {min(sp):.3f}-{max(sp):.3f})")
    if {"1x1", "2x1", "1x1-half"} <= set(V):
        res["where"] = w = scaling_breakdown(runs["2x1"], V["1x1"]["step_s"], V["1x1-half"]["step_s"])
        print(f"  where the 2-rank step goes beyond the ideal T(1x1)/2 = {w['ideal_s'] * 1000:.1f} ms:")
        print(f"    half the batch on one rank alone costs {V['1x1-half']['step_s'] * 1000:.1f} ms: "
              f"{w['fixed_cost_s'] * 1000:+.1f} ms of per-step cost that does not shrink with the batch")
        print(f"    2 ranks vs that: {w['distributed_s'] * 1000:+.1f} ms: gradient all-reduce {w['grad_sync_s'] * 1000:.1f} ms "
              f"and metric gather {w['metrics_s'] * 1000:.1f} ms (per step, on the rank that arrived last); the faster "
              f"rank computing {w['contention_s'] * 1000:+.1f} ms longer than one rank alone (both cores busy: shared "
              f"caches / memory bandwidth, and other load takes a core from a rank); the slower rank {w['wait_in_sync_s'] * 1000:.1f} ms behind it (median per "
              f"step; mean {w['wait_mean_s'] * 1000:.1f} ms), which the other waits for in the all-reduce")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "scaling-worker":
        sys.exit(scaling_worker(sys.argv[2:]))
MEMORY_PLAN_CASES: dict[str, dict[str, Any]] = {
    # name: recipe overrides on top of a ReFL step on the tiny model (alignment reward, 8 sampling steps)
    "wan-lora": dict(model="tiny-wan", use_peft=True, sampler_args={"num_steps": 8, "grad_steps": 2}),
    "wan-full-ema": dict(model="tiny-wan", use_peft=False, ema_decay=0.9,
                         sampler_args={"num_steps": 8, "grad_steps": 1}),
    "cogvideox-lora-ckpt": dict(model="tiny-cogvideox", use_peft=True, gradient_checkpointing=True,
                                sampler_args={"num_steps": 8, "grad_steps": 2}),
}


class LiveTensorPeak:
    """Peak bytes of live CPU tensor storages: those that exist on entry (``track``) plus every storage an op
    creates inside (a ``TorchDispatchMode``; forward, backward and the optimiser step run through it), each
    counted until Python frees it (a weak reference on the storage)."""

    def __init__(self) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self.live: dict[int, tuple[int, Any]] = {}
        self.current = self.peak = 0
        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                from torch.utils._pytree import tree_flatten

                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        outer.track(t)
                return out

        self.mode = _Mode()
        self._weakref = weakref

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return

        def free(_ref: Any, key: int = key) -> None:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]

        self.live[key] = (n, self._weakref.ref(st, free))
        self.current += n
        self.peak = max(self.peak, self.current)

    def __enter__(self) -> LiveTensorPeak:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def measured_step_peak(trainer) -> dict[str, int]:
    """Peak bytes of live CPU tensors during one training step: model weights, optimiser and EMA states present
    on entry, plus everything the step allocates."""
    meter = LiveTensorPeak()
    base = [*trainer.policy.parameters(), *trainer.policy.buffers()]
    for name, g in trainer.groups.items():
        if name != "policy":
            base += [*g.module.parameters(), *g.module.buffers()]
    for opt in trainer.optimizers.values():
        base += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for ema in trainer.ctx.ema.values():
        base += list(ema.shadow_params)
    for t in base:
        meter.track(t)
    start = meter.current
    with meter:
        trainer.training_step()
    return {"Total": meter.peak, "on entry": start, "step": meter.peak - start}


def bench_memory_plan(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="trl-video bench memory-plan",
                                 description="Planned peak (trl-video plan) vs the measured CPU peak of a real "
                                             "training step on the tiny models.")
    ap.add_argument("--cases", default=",".join(MEMORY_PLAN_CASES), help="comma-separated: "
                                                                         + ", ".join(MEMORY_PLAN_CASES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)

    import tempfile

    from .config import VideoRewardConfig
    from .memory_plan import plan_memory
    from .trainer import VideoRewardTrainer

    results = []
    for name in a.cases.split(","):
        over = MEMORY_PLAN_CASES[name]
        cfg = VideoRewardConfig(method="refl", reward="alignment", prompts="world:train", prompts_per_step=a.batch,
                                group_size=1, max_steps=10, output_dir=tempfile.mkdtemp(prefix="trl-video-mem-"),
                                report_to="none", **over)
        planned = plan_memory(cfg, gpus=1, gpu_mem_gib=1.0, reserve_gib=0.0)
        trainer = VideoRewardTrainer(cfg)
        trainer.training_step()  # optimiser states exist from here on, as in every later step
        trainer.global_step += 1
        peak = measured_step_peak(trainer)
        ratio = planned.total / peak["Total"]
        results.append({"case": name, "planned_bytes": planned.total, "measured_peak_bytes": peak["Total"],
                        "ratio": ratio, "measured": peak, "planned": [r.__dict__ for r in planned.rows]})
        print(f"{name}: planned {planned.total / 2**20:8.2f} MiB   measured peak {peak['Total'] / 2**20:8.2f} MiB   "
              f"planned/measured {ratio:5.2f}  (target within 1.5x)")
        print("   measured by category: " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in peak.items() if k != "Total"))
        print("   planned: " + ", ".join(f"{r.name} {r.bytes / 2**20:.2f}" for r in planned.rows if r.bytes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
