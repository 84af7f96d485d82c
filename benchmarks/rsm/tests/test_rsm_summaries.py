"""The RSM benches' summaries: the estimator study's claim checks and the CPU-world tables (hand-made rows)."""

from __future__ import annotations

import math

from trl_video.bench_discovery import import_benchmark


def row(t, est, depth, width, centre, rmse, nfe, loc=False):
    return {"t": t, "estimator": est, "depth": depth, "width": width, "centre": centre, "localise": loc,
            "rmse": rmse, "nfe": nfe}


def test_estimator_claims_count_cells():
    claims = import_benchmark("rsm", "estimators").claims
    rows = [row(0.5, "zo-look", 1, 2, True, 1.0, 3), row(0.5, "zo-look", 1, 2, False, 2.0, 3),
            row(0.5, "zo-look", "full", 2, True, 0.9, 9), row(0.5, "zo-look", "full", 2, False, 0.8, 9),
            row(0.5, "zo-look", 1, 8, True, 0.5, 9), row(0.5, "zo-look", 1, 8, False, 0.6, 9),
            row(0.5, "zo-look", "full", 8, True, 0.7, 33), row(0.5, "zo-look", "full", 8, False, 0.9, 33)]
    text = claims(rows)
    assert "centring lowers RMSE in 3 of 4" in text  # full rollout, B=2: 0.9 vs 0.8 uncentred
    assert "zo-look k=1 vs full rollout at equal samples (same B): k=1 lower in 1 of 2 cells (not at t=0.50 B=2)" \
        in text
    # equal compute: k=1 B=2 (3 NFE, 1.0) meets full B=2 (9 NFE, 0.9): higher; k=1 B=8 (9 NFE, 0.5) meets it too: lower
    assert "at equal compute (full rollout with at least the NFE): k=1 lower in 1 of 2 cells (not at t=0.50 B=2)" \
        in text


def run(method, seed, rewards, nfe, secs, gain):
    curve = [{"step": 4 * k, "heldout_reward": r, "sampler_nfe": n, "seconds": s}
             for k, (r, n, s) in enumerate(zip(rewards, nfe, secs))]
    return {"method": method, "seed": seed, "curve": curve, "seconds": secs[-1], "sampler_nfe": nfe[-1],
            "loss_nfe": 0, "final": {"reward_before": 0.4, "reward_after": 0.4 + gain, "gain": gain, "gain_sem": 0.01}}


def test_grpo_summary_gain_sem_and_compute_to_reach():
    g = import_benchmark("rsm", "grpo_cpu")
    runs = [run("tempflow-grpo", 0, [0.3, 0.35, 0.40], [0, 100, 200], [0, 10, 20], 0.05),
            run("tempflow-grpo", 1, [0.3, 0.32, 0.36], [0, 100, 200], [0, 10, 20], 0.03),
            run("rsm-zo", 0, [0.3, 0.41, 0.42], [0, 50, 100], [0, 8, 16], 0.10),
            run("rsm-zo", 1, [0.3, 0.31, 0.33], [0, 50, 100], [0, 8, 16], 0.00)]
    assert g.mean_sem([0.05, 0.03]) == (0.04, math.sqrt(2e-4) / math.sqrt(2))
    text = g.summarise(runs, ["tempflow-grpo", "rsm-zo"])
    assert "**+0.0400 +- 0.0100**" in text and "**+0.0500 +- 0.0500**" in text
    # seed 0: rsm-zo reaches 0.40 at its first eval (50 NFE, 8 s: 0.25x, 0.40x); seed 1 never reaches 0.36
    assert "| `rsm-zo` | 1 of 2 | 50 (50-50) | 0.25 (0.25-0.25) | 8 (8-8) | 0.40 (0.40-0.40) |" in text
    assert "| `tempflow-grpo` | 2 of 2 | 200 (200-200) | 1.00 (1.00-1.00) |" in text


def test_importing_the_estimator_study_leaves_torch_defaults_alone():
    import torch

    import_benchmark("rsm", "estimators")
    assert torch.get_default_dtype() == torch.float32


def test_grpo_summary_wall_clock_without_scoring():
    g = import_benchmark("rsm", "grpo_cpu")
    temp = run("tempflow-grpo", 0, [0.3, 0.35, 0.40], [0, 100, 200], [0, 10, 20], 0.05)
    zo = run("rsm-zo", 0, [0.3, 0.41, 0.42], [0, 50, 100], [0, 8, 16], 0.10)
    for r, score, decode in ((temp, [0, 3, 6], [0, 1, 2]), (zo, [0, 4, 8], [0, 1, 2])):
        for c, s, d in zip(r["curve"], score, decode):
            c["score_seconds"], c["decode_seconds"] = s, d
        r["score_seconds"], r["decode_seconds"], r["train_reward"] = score[-1], decode[-1], [0.0] * 8
    text = g.summarise([temp, zo], ["tempflow-grpo", "rsm-zo"])
    # rsm-zo reaches 0.40 at 8 s (score 4, decode 1) vs tempflow's end at 20 s (score 6, decode 2):
    # without the reward model (8-4+1) / (20-6+2) = 5/16; without scoring (8-4) / (20-6) = 4/14
    assert (f"| 8 (8-8) | 0.40 (0.40-0.40) | {5 / 16:.2f} ({5 / 16:.2f}-{5 / 16:.2f}) | "
            f"{4 / 14:.2f} ({4 / 14:.2f}-{4 / 14:.2f}) |") in text
    # per step over 8 steps: tempflow 20/8 s, decode 2/8, reward model (6-2)/8
    assert f"| `tempflow-grpo` | {20 / 8:.2f} | {2 / 8:.2f} | {4 / 8:.2f} |" in text


def test_grpo_summary_reach_on_the_seed_mean_curves():
    g = import_benchmark("rsm", "grpo_cpu")
    runs = [run("tempflow-grpo", 0, [0.3, 0.35, 0.40], [0, 100, 200], [0, 10, 20], 0.05),
            run("tempflow-grpo", 1, [0.3, 0.32, 0.36], [0, 100, 200], [0, 10, 22], 0.03),
            run("rsm-zo", 0, [0.3, 0.41, 0.42], [0, 50, 100], [0, 8, 16], 0.10),
            run("rsm-zo", 1, [0.3, 0.31, 0.33], [0, 50, 100], [0, 9, 18], 0.00),
            run("flat", 0, [0.3, 0.30, 0.31], [0, 50, 100], [0, 8, 16], 0.0),
            run("flat", 1, [0.3, 0.30, 0.30], [0, 50, 100], [0, 8, 16], 0.0)]
    text = g.summarise(runs, ["tempflow-grpo", "rsm-zo", "flat"])
    # target = mean of 0.40 and 0.36 = 0.38; rsm-zo's mean curve 0.36 (step 4), 0.375 (step 8): never reaches it
    assert "mean final quick-eval reward is 0.3800" in text
    assert "| `rsm-zo` | not reached (best 0.3750) |" in text
    assert "| `tempflow-grpo` | 8 | 0.3800 +- 0.0200 | 200 (1.00x) | 21.0 (1.00x) |" in text
    assert "| `flat` | not reached (best 0.3050) |" in text
    runs[3]["curve"][2]["heldout_reward"] = 0.35  # rsm-zo's mean at step 8 now (0.42 + 0.35) / 2 = 0.385
    text = g.summarise(runs, ["tempflow-grpo", "rsm-zo"])
    assert f"| `rsm-zo` | 8 | 0.3850 +- 0.0350 | 100 (0.50x) | 17.0 ({17 / 21:.2f}x) |" in text


def test_grpo_bad_methods_and_set_are_one_error_line(capsys):
    from trl_video.cli import main

    for argv, msg in ((["--set", "bogus"], "error: --set 'bogus': expected METHOD:KEY=VALUE"),
                      (["--methods", "nope"], "error: --methods ['nope']: known presets"),
                      (["--methods", "rsm-zo", "--set", "flow-grpo:seed=1"],
                       "error: --set 'flow-grpo:seed=1': method 'flow-grpo' is not in --methods ['rsm-zo']")):
        assert main(["bench", "rsm.grpo", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(msg), err
