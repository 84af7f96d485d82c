"""The stage-2 experiment driver refuses bad input with one line before loading or training anything."""

from __future__ import annotations

import pytest

from trl_video.bench_discovery import import_benchmark
from trl_video.errors import TrlVideoError


@pytest.mark.parametrize("args, msg", [(["--reward-args", "{bad"], "--reward-args is not JSON"),
                                       (["--reward-args", "[1]"], "--reward-args must be a JSON object, got list"),
                                       (["--reward", "nope"], "unknown reward 'nope'"),
                                       (["--reward", "imagereward", "--reward-args", '{"model": "/no/such/folder"}'],
                                        "cannot fetch 'med_config.json' from '/no/such/folder'")])
def test_reward_experiment_bad_input_is_a_one_line_error(args, msg):
    experiments = import_benchmark("reward_forcing", "experiments")
    with pytest.raises(TrlVideoError, match=msg) as err:
        experiments.main(["reward", "--seeds", "1", "--steps", "1", *args])
    assert "\n" not in str(err.value)


def test_plot_reward_names_the_missing_results_file():
    experiments = import_benchmark("reward_forcing", "experiments")
    with pytest.raises(TrlVideoError, match="no results file .*no_such_run.json"):
        experiments.main(["plot-reward", "no_such_run"])


def test_reward_table_lists_seeds_and_the_frame_difference_profile():
    """The stage-2 markdown: one row per mode with mean +- s.e. over seeds (computed here by hand), per-run seeds as
    run (not their position), and the per-pair frame difference profile."""
    experiments = import_benchmark("reward_forcing", "experiments")
    keys = experiments.REWARD_KEYS
    before = {k: 0.1 for k in keys} | {"frame_diff_profile": [0.03, 0.02]}
    def run(seed, motion):
        return {**{k: 0.2 for k in keys}, "motion": motion, "seed": seed, "frame_diff_profile": [motion, motion],
                "last_frame_gain_over_pairs": {"mean": 0.1, "se": 0.01, "n": 4}}
    runs = {"last": [run(3, 0.05), run(4, 0.07)], "random": [run(3, 0.04), run(4, 0.04)]}
    res = {"start": "x", "steps": 1, "lr": 1e-4, "batch": 8, "heldout_pairs": 4, "command": "c", "reward": "imagereward",
           "before": before, "runs": runs,
           "after": {m: {k: experiments._mean_se([r[k] for r in rs]) for k in keys} for m, rs in runs.items()},
           "gain_vs_before": {m: {k: experiments._mean_se([r[k] - before[k] for r in rs]) for k in keys}
                              for m, rs in runs.items()},
           "frame_diff_profile": {"last": [0.06, 0.06], "random": [0.04, 0.04]}}
    md = experiments.reward_table(res)
    assert "| 0.0600 +- 0.0100 |" in md  # last: 0.05, 0.07 -> mean 0.06, s.d. 0.0141 / sqrt(2)
    assert "seed 3: +0.1000 +- 0.0100, seed 4:" in md
    assert "* before: 0.0300, 0.0200" in md and "* last: 0.0600, 0.0600" in md
