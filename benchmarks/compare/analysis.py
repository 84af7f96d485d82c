"""Arithmetic of ``bench compare``: crossing points of a reward curve, paired ratios to the baseline, their spread.

Kept free of torch and of the trainer so that ``tests/test_analysis.py`` checks it on hand-built logs.

Interpolation rule (time / NFE / samples / steps to a target): a run's held-out reward is measured at eval points
(x_0, y_0), (x_1, y_1), ... with x cumulative (seconds, NFE, samples or steps at that eval). The run reaches the
target at the first crossing of the piecewise-linear curve through those points:

* ``y_0 >= target``: at x_0 (already there before training);
* else the first k with ``y_k >= target``: ``x = x_{k-1} + (target - y_{k-1}) / (y_k - y_{k-1}) * (x_k - x_{k-1})``;
* no such k: never reached (``None``), never replaced by the run's length.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

#: the x axes a time-to-target is computed on (keys of an eval point)
AXES = ("seconds", "nfe_sampler", "nfe", "samples_generated", "step")


def crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """First x where the piecewise-linear curve through (xs, ys) reaches ``target`` (module docstring's rule)."""
    if len(xs) != len(ys):
        raise ValueError(f"crossing: {len(xs)} x values but {len(ys)} y values")
    for k, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if k == 0:
                return float(x)
            x0, y0 = xs[k - 1], ys[k - 1]
            return float(x0 + (target - y0) / (y - y0) * (x - x0))  # y0 < target <= y, so y > y0
    return None


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) over seeds; sd is None for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def paired_ratios(method: dict[int, float | None], baseline: dict[int, float | None]) -> dict[str, Any]:
    """Per-seed ratios method / baseline over the seeds both have a finite, non-zero-denominator value for (a seed
    where either never reached the target is left out and counted), with their mean and sd across seeds."""
    ratios = {s: float(method[s]) / float(b) for s, b in baseline.items()  # type: ignore[arg-type]
              if s in method and method[s] is not None and b is not None and b != 0 and math.isfinite(float(b))}
    missing = sorted(s for s in set(method) | set(baseline) if s not in ratios)
    return {**mean_sd(list(ratios.values())), "per_seed": ratios, "seeds_left_out": missing}


def row_name(run: dict[str, Any]) -> str:
    """A run's row: its recipe's file stem (several rows may share a method, e.g. fcrm_online and fcrm_replay)."""
    return str(run.get("name", run["method"]))


def to_target(run: dict[str, Any], target: float) -> dict[str, float | None]:
    """A run's x at which its held-out reward first reaches ``target``, on every axis of :data:`AXES`."""
    evals = run["evals"]
    ys = [e["reward"] for e in evals]
    return {ax: crossing([e[ax] for e in evals], ys, target) for ax in AXES}


def summarise(runs: list[dict[str, Any]], baseline: str, target: float) -> dict[str, Any]:
    """Per-method table: final gain, x to target on each axis, peak memory, distance, diversity; each with its
    spread over seeds and its paired per-seed ratio to ``baseline``."""
    ok = [r for r in runs if not r.get("error")]
    methods = list(dict.fromkeys(row_name(r) for r in runs))

    def per_seed(m: str, fn: Any) -> dict[int, float | None]:
        return {r["seed"]: fn(r) for r in ok if row_name(r) == m}

    def last(key: str) -> Any:
        return lambda r: r["evals"][-1].get(key)

    quantities = {
        "final_gain": lambda r: r["evals"][-1]["reward"] - r["evals"][0]["reward"],
        "final_reward": last("reward"),
        **{f"{ax}_to_target": (lambda r, ax=ax: to_target(r, target)[ax]) for ax in AXES},
        "peak_train_memory_mb": lambda r: r["peak_train_memory_mb"],
        "wall_seconds": last("seconds"),
        "nfe_sampler_total": last("nfe_sampler"),
        "nfe_total": last("nfe"),
        "samples_generated": last("samples_generated"),
        "frechet_distance": last("frechet_distance"),
        "diversity": last("diversity"),
    }
    table: dict[str, Any] = {}
    for m in methods:
        row: dict[str, Any] = {"method": next(r["method"] for r in runs if row_name(r) == m),
                               "seeds": sorted(r["seed"] for r in ok if row_name(r) == m),
                               "errors": {r["seed"]: r["error"] for r in runs if row_name(r) == m and r.get("error")}}
        for q, fn in quantities.items():
            vals = per_seed(m, fn)
            finite = [v for v in vals.values() if v is not None]
            row[q] = {**mean_sd(finite), "reached": len(finite), "of": len(vals)}
            if m != baseline and baseline in methods:
                row[q]["ratio_to_baseline"] = paired_ratios(vals, per_seed(baseline, fn))
        table[m] = row
    return {"baseline": baseline, "target": target, "methods": table}


def _fmt(cell: dict[str, Any], digits: int = 3, ratio: bool = True) -> str:
    if cell["mean"] is None:
        return "never" if cell.get("of") else "-"
    s = f"{cell['mean']:.{digits}g}" + (f" ± {cell['sd']:.2g}" if cell["sd"] is not None else "")
    if cell["reached"] < cell["of"]:
        s += f" ({cell['reached']}/{cell['of']} reached)"
    r = cell.get("ratio_to_baseline")
    if ratio and r is not None:
        s += " [" + (f"{r['mean']:.2f}x" + (f" ± {r['sd']:.2f}" if r["sd"] is not None else "") if r["mean"] is not None
                     else "no ratio") + "]"
    return s


def markdown(summary: dict[str, Any]) -> str:
    """The table: each cell is mean ± sd over seeds, then | the per-seed ratio to the baseline, mean ± sd."""
    cols = [("final_gain", "held-out gain"), ("seconds_to_target", "s to target"),
            ("nfe_sampler_to_target", "sampler NFE to target"), ("nfe_to_target", "all NFE to target"),
            ("samples_generated_to_target", "samples to target"), ("step_to_target", "steps to target"),
            ("peak_train_memory_mb", "peak train MiB"), ("frechet_distance", "Frechet dist."),
            ("diversity", "diversity"), ("wall_seconds", "train s"), ("nfe_sampler_total", "sampler NFE")]
    lines = [f"Target: held-out reward >= {summary['target']:.4f} (chosen before the runs). Cells: mean ± sd over "
             f"training seeds [paired per-seed ratio to `{summary['baseline']}`, mean ± sd over seeds; 'no ratio': a side "
             "never reached the target].", "",
             "| method | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for m, row in summary["methods"].items():
        cells = [_fmt(row[k]) for k, _ in cols]
        err = f" (failed: {'; '.join(f's{s}: {e}' for s, e in row['errors'].items())})" if row["errors"] else ""
        label = m if row.get("method", m) == m else f"{m} ({row['method']})"
        lines.append(f"| `{label}`{err} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ seed claims
#: each seed paper's headline efficiency claim: the row that stands for the method, the row of its baseline, the
#: paper's figure. ``paper_speedup`` is the baseline's cost / the method's (None: the paper gives no number).
SEED_CLAIMS: list[dict[str, Any]] = [
    {"claim": "FCRM (online) vs Flow-GRPO", "row": "fcrm_online", "baseline": "flow_grpo", "paper_speedup": 3.0,
     "paper": "19.2 vs 57.0 GPU-hours (3.0x) at a higher reward (FCRM seed)"},
    {"claim": "FCRM (replay) vs Flow-GRPO", "row": "fcrm_replay", "baseline": "flow_grpo", "paper_speedup": 3.0,
     "paper": "as above (the paper's headline run)"},
    {"claim": "FCRM (few-step) vs Flow-GRPO", "row": "fcrm_fewstep", "baseline": "flow_grpo", "paper_speedup": 3.0,
     "paper": "as above"},
    {"claim": "DM-Align (group) vs DanceGRPO", "row": "dmalign_group", "baseline": "dance_grpo", "paper_speedup": 6.0,
     "paper": "about 6x less training time (DM-Align seed)"},
    {"claim": "RSM zeroth-order redesign vs TempFlow-GRPO", "row": "rsm_zo", "baseline": "tempflow_grpo",
     "paper_speedup": None, "paper": "a wall-clock speedup to the same GenEval (RSM Fig. 16a; no number in the text)"},
    {"claim": "RSM first-order redesign (RSD) vs TempFlow-GRPO", "row": "rsm_rsd", "baseline": "tempflow_grpo",
     "paper_speedup": None, "paper": "substantially faster reward improvement than first-order baselines (Fig. 5)"},
    {"claim": "VELR vs pixel ReFL (equal steps)", "row": "velr", "baseline": "refl", "paper_speedup": None,
     "paper": "comparable performance at 12-21% of ReFL's memory (VELR seed)", "paper_memory_ratio": (0.12, 0.21)},
    {"claim": "DiffusionNFT vs Flow-GRPO", "row": "nft", "baseline": "flow_grpo", "paper_speedup": 25.0,
     "paper": "up to 25x more efficient (DiffusionNFT paper)"},
]


def claims(runs: list[dict[str, Any]], specs: list[dict[str, Any]], target: float,
           setup_seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """For each claim, paired by training seed: both rows' gains; the baseline's cost / the row's cost to reach
    (a) the common target and (b) the baseline's own final held-out reward of that seed (wall-clock, sampler NFE,
    all NFE); the row's peak memory / the baseline's. A row's one-off set-up seconds (``setup_seconds``, e.g.
    VELR's reward-model build) are added to its wall-clock. Claims whose rows did not run are left out."""
    ok = [r for r in runs if not r.get("error") and r["evals"]]
    setup = {k: v for k, v in (setup_seconds or {}).items() if v == v}  # NaN: built earlier, not measured
    out = []
    for spec in specs:
        rows = {s: {r["seed"]: r for r in ok if row_name(r) == spec[s]} for s in ("row", "baseline")}
        seeds = sorted(set(rows["row"]) & set(rows["baseline"]))
        if not seeds:
            continue
        res: dict[str, Any] = {**spec, "seeds": seeds}
        extra = {"row": setup.get(spec["row"], 0.0), "baseline": setup.get(spec["baseline"], 0.0)}
        for side in ("row", "baseline"):
            res[f"gain_{side}"] = mean_sd([rows[side][s]["evals"][-1]["reward"] - rows[side][s]["evals"][0]["reward"]
                                           for s in seeds])
        res["memory_ratio"] = mean_sd([rows["row"][s]["peak_train_memory_mb"] / rows["baseline"][s]["peak_train_memory_mb"]
                                       for s in seeds])
        for goal in ("common_target", "baseline_final"):
            for ax in ("seconds", "nfe_sampler", "nfe"):
                speedups: dict[int, float | None] = {}
                undefined = []  # (b) on a seed where the baseline ended no higher than it started: nothing to reach
                for s in seeds:
                    m, b = rows["row"][s], rows["baseline"][s]
                    y = target if goal == "common_target" else b["evals"][-1]["reward"]
                    if goal == "baseline_final" and y <= b["evals"][0]["reward"]:
                        undefined.append(s)
                        continue
                    xm = crossing([e[ax] for e in m["evals"]], [e["reward"] for e in m["evals"]], y)
                    xb = (crossing([e[ax] for e in b["evals"]], [e["reward"] for e in b["evals"]], y)
                          if goal == "common_target" else b["evals"][-1][ax])
                    if ax == "seconds":
                        xm = None if xm is None else xm + extra["row"]
                        xb = None if xb is None else xb + extra["baseline"]
                    speedups[s] = (None if xm is None or xb is None or xm <= 0 else float(xb) / float(xm))
                finite = [v for v in speedups.values() if v is not None]
                res[f"speedup_{goal}_{ax}"] = {**mean_sd(finite), "reached": len(finite),
                                               "of": len(seeds) - len(undefined), "per_seed": speedups,
                                               "baseline_did_not_gain": undefined}
        out.append(res)
    return out


def claims_markdown(rows: list[dict[str, Any]]) -> str:
    """The claims table: measured speedups (baseline cost / method cost, mean ± sd over the seeds where both
    reached) next to the paper's figure."""
    def cell(c: dict[str, Any]) -> str:
        if c["of"] == 0:
            return "n/a (baseline did not gain)"
        if c["mean"] is None:
            return f"not reached (0/{c['of']})"
        s = f"{c['mean']:.2f}x" + (f" ± {c['sd']:.2f}" if c["sd"] is not None else "")
        s += f" ({c['reached']}/{c['of']} seeds)" if c["reached"] < c["of"] else ""
        return s + (f" (n/a on {len(c['baseline_did_not_gain'])}: baseline did not gain)"
                    if c.get("baseline_did_not_gain") else "")

    def gain(c: dict[str, Any]) -> str:
        return f"{c['mean']:+.3f}" + (f" ± {c['sd']:.3f}" if c["sd"] is not None else "")

    lines = ["Seed claims. Speedup = baseline's cost / method's cost to reach (a) the common target or (b) the "
             "baseline's own final held-out reward of the same seed (its whole run), paired by seed, mean ± sd over "
             "seeds where the method got there. Wall-clock includes a row's one-off set-up (VELR's reward-model "
             "build) when this run built it.", "",
             "| claim | paper | seeds | gain (method / baseline) | wall-clock speedup (a) | sampler-NFE speedup (a) "
             "| wall-clock speedup (b) | sampler-NFE speedup (b) | all-NFE speedup (b) | peak memory ratio |",
             "|---" * 10 + "|"]
    for r in rows:
        mem = r["memory_ratio"]
        lines.append(f"| {r['claim']} (`{r['row']}` / `{r['baseline']}`) | {r['paper']} | {len(r['seeds'])} | "
                     f"{gain(r['gain_row'])} / {gain(r['gain_baseline'])} | "
                     f"{cell(r['speedup_common_target_seconds'])} | {cell(r['speedup_common_target_nfe_sampler'])} | "
                     f"{cell(r['speedup_baseline_final_seconds'])} | {cell(r['speedup_baseline_final_nfe_sampler'])} | "
                     f"{cell(r['speedup_baseline_final_nfe'])} | "
                     f"{mem['mean']:.2f}" + (f" ± {mem['sd']:.2f}" if mem["sd"] is not None else "") + " |")
    return "\n".join(lines)
