"""bench compare's accounting on hand-built logs: time / NFE to a target (linear interpolation between eval points,
"never reached"), and the paired ratio / spread arithmetic."""

from __future__ import annotations

import statistics

import pytest

from trl_video.bench_discovery import import_benchmark

A = import_benchmark("compare", "analysis")


def run(method: str, seed: int, rewards: list[float], seconds: list[float], nfe_per_step: int, peak: float,
        samples_per_step: int = 8, steps: tuple[int, ...] = (0, 2, 4, 6)) -> dict:
    evals = [{"step": s, "reward": r, "seconds": t, "nfe_sampler": s * nfe_per_step, "nfe": s * nfe_per_step * 2,
              "samples_generated": s * samples_per_step, "frechet_distance": 1.0 + r, "diversity": 0.5}
             for s, r, t in zip(steps, rewards, seconds)]
    return {"method": method, "seed": seed, "evals": evals, "peak_train_memory_mb": peak}


def base_and_fast() -> list[dict]:
    """Two seeds of a baseline and of a faster method (target 0.15 in the tests below)."""
    return [
        # baseline: crosses 0.15 between step 2 (0.12, 20 s) and step 4 (0.18, 40 s): at step 3, 30 s
        run("base", 0, [0.10, 0.12, 0.18, 0.20], [0, 20, 40, 60], nfe_per_step=48, peak=100.0),
        # seed 1: crosses between step 0 (0.10) and step 2 (0.20): at step 1, 5 s
        run("base", 1, [0.10, 0.20, 0.22, 0.24], [0, 10, 20, 30], nfe_per_step=48, peak=120.0),
        # fast: seed 0 at step 1 (0.10 -> 0.20 between step 0 and 2), 6 s; seed 1 at step 2 exactly, 8 s
        run("fast", 0, [0.10, 0.20, 0.25, 0.30], [0, 12, 24, 36], nfe_per_step=24, peak=50.0),
        run("fast", 1, [0.10, 0.15, 0.25, 0.30], [0, 8, 16, 24], nfe_per_step=24, peak=90.0),
    ]


def test_crossing_interpolates_linearly_between_eval_points():
    xs, ys = [0, 10, 20, 30], [0.10, 0.12, 0.20, 0.30]
    assert A.crossing(xs, ys, 0.16) == pytest.approx(15.0)  # halfway from 0.12 (x=10) to 0.20 (x=20)
    assert A.crossing(xs, ys, 0.20) == pytest.approx(20.0)  # exactly on a point
    assert A.crossing(xs, ys, 0.10) == 0.0  # already reached at the first point
    assert A.crossing(xs, ys, 0.31) is None  # never reached: not the run's length
    # the FIRST crossing counts, a later dip and rise does not move it
    assert A.crossing([0, 1, 2, 3], [0.0, 1.0, 0.0, 1.0], 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        A.crossing([0, 1], [0.0], 0.5)


def test_time_and_nfe_to_target_and_ratios_on_a_synthetic_log():
    target = 0.15
    runs = [*base_and_fast(), run("never", 0, [0.10, 0.11, 0.12, 0.13], [0, 5, 10, 15], nfe_per_step=10, peak=10.0),
            {"method": "never", "seed": 1, "error": "error: boom", "evals": []}]  # seed 1 fails to run
    t0 = A.to_target(runs[0], target)
    assert t0 == {"seconds": pytest.approx(30.0), "nfe_sampler": pytest.approx(3 * 48), "nfe": pytest.approx(3 * 96),
                  "samples_generated": pytest.approx(24.0), "step": pytest.approx(3.0)}
    assert A.to_target(runs[1], target)["seconds"] == pytest.approx(5.0)
    assert A.to_target(runs[4], target) == dict.fromkeys(A.AXES)

    s = A.summarise(runs, "base", target)["methods"]
    base, fast, never = s["base"], s["fast"], s["never"]
    assert base["seconds_to_target"]["mean"] == pytest.approx(17.5)
    assert base["seconds_to_target"]["sd"] == pytest.approx(statistics.stdev([30.0, 5.0]))
    # paired ratios per seed: seconds 6/30 and 8/5; sampler NFE (1*24)/(3*48) and (2*24)/(1*48)
    r = fast["seconds_to_target"]["ratio_to_baseline"]
    assert r["per_seed"] == {0: pytest.approx(0.2), 1: pytest.approx(1.6)}
    assert r["mean"] == pytest.approx(0.9) and r["sd"] == pytest.approx(statistics.stdev([0.2, 1.6]))
    assert fast["nfe_sampler_to_target"]["ratio_to_baseline"]["per_seed"] == {0: pytest.approx(24 / 144),
                                                                              1: pytest.approx(1.0)}
    assert fast["peak_train_memory_mb"]["ratio_to_baseline"]["per_seed"] == {0: 0.5, 1: 0.75}
    assert fast["final_gain"]["mean"] == pytest.approx(0.2)  # 0.30 - 0.10 on both seeds
    # never reached: counted, no ratio, the failed seed reported
    assert never["seconds_to_target"] == {"mean": None, "sd": None, "n": 0, "reached": 0, "of": 1,
                                          "ratio_to_baseline": {"mean": None, "sd": None, "n": 0, "per_seed": {},
                                                                "seeds_left_out": [0, 1]}}
    assert never["errors"] == {1: "error: boom"} and never["seeds"] == [0]
    md = A.markdown(A.summarise(runs, "base", target))
    assert all(line.count("|") == 14 for line in md.splitlines() if line.startswith("|"))  # 11 + method, seeds
    assert "| `fast` | 2 |" in md and "[0.90x ± 0.99]" in md and "never" in md and "failed: s1: error: boom" in md


def test_claims_speedups_on_a_synthetic_log():
    """Seed-claim speedups by hand: baseline cost / method cost, to the common target and to the baseline's own
    final reward of the same seed, one-off set-up seconds added to the method's wall-clock."""
    target = 0.15
    runs = [*base_and_fast(), run("slow", 0, [0.10, 0.11, 0.12, 0.13], [0, 5, 10, 15], nfe_per_step=10, peak=10.0)]
    for r in runs:
        r["name"] = r["method"]
    specs = [{"claim": "fast vs base", "row": "fast", "baseline": "base", "paper": "x", "paper_speedup": 3.0},
             {"claim": "slow vs base", "row": "slow", "baseline": "base", "paper": "y", "paper_speedup": None},
             {"claim": "absent", "row": "nope", "baseline": "base", "paper": "z", "paper_speedup": None}]
    got = A.claims(runs, specs, target, setup_seconds={"fast": 2.0, "base": float("nan")})
    assert [c["claim"] for c in got] == ["fast vs base", "slow vs base"]  # a claim whose row never ran is left out
    fast, slow = got
    # (a) common target: base 30 s / 5 s; fast 6 s / 8 s, +2 s set-up each -> 30/8, 5/10
    assert fast["speedup_common_target_seconds"]["per_seed"] == {0: pytest.approx(30 / 8), 1: pytest.approx(0.5)}
    # sampler NFE (no set-up): base 144 / 48, fast 24 / 48
    assert fast["speedup_common_target_nfe_sampler"]["per_seed"] == {0: pytest.approx(6.0), 1: pytest.approx(1.0)}
    # (b) base's own final reward: seed 0 0.20 at base's 60 s / 288 NFE; fast reaches 0.20 at step 2 (12 s, 48 NFE)
    #     seed 1: 0.24 at 30 s / 288 NFE; fast: 0.15 (step 2, 8 s) -> 0.25 (step 4, 16 s): 0.24 at 15.2 s, step 3.8
    assert fast["speedup_baseline_final_seconds"]["per_seed"] == {0: pytest.approx(60 / 14), 1: pytest.approx(30 / 17.2)}
    assert fast["speedup_baseline_final_nfe_sampler"]["per_seed"] == {0: pytest.approx(288 / 48),
                                                                      1: pytest.approx(288 / (3.8 * 24))}
    assert fast["gain_row"]["mean"] == pytest.approx(0.2) and fast["gain_baseline"]["mean"] == pytest.approx(0.12)
    assert fast["memory_ratio"]["mean"] == pytest.approx((0.5 + 0.75) / 2)
    # slow never gets there: counted as not reached, no number
    assert slow["seeds"] == [0]
    assert slow["speedup_baseline_final_seconds"] == {"mean": None, "sd": None, "n": 0, "reached": 0, "of": 1,
                                                      "per_seed": {0: None}, "baseline_did_not_gain": []}
    # a baseline that ends no higher than it started leaves nothing to reach: n/a, not "reached at step 0"
    flat = [run("flat", 0, [0.10, 0.12, 0.11, 0.09], [0, 5, 10, 15], nfe_per_step=10, peak=10.0), runs[2]]
    for r in flat:
        r["name"] = r["method"]
    (na,) = A.claims(flat, [{**specs[0], "baseline": "flat"}], target)
    assert na["speedup_baseline_final_seconds"]["of"] == 0 and na["speedup_baseline_final_seconds"]["per_seed"] == {}
    assert "n/a (baseline did not gain)" in A.claims_markdown([na])
    md = A.claims_markdown(got)
    assert "not reached (0/1)" in md and "| fast vs base (`fast` / `base`) | x | 2 |" in md
    assert all(line.count("|") == 11 for line in md.splitlines() if line.startswith("|"))
