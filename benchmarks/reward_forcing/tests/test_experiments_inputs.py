"""The stage-2 experiment driver refuses bad input with one line before loading or training anything."""

from __future__ import annotations

import pytest

from trl_video.bench_discovery import import_benchmark
from trl_video.errors import TrlVideoError


@pytest.mark.parametrize("args, msg", [(["--reward-args", "{bad"], "--reward-args is not JSON"),
                                       (["--reward-args", "[1]"], "--reward-args must be a JSON object, got list"),
                                       (["--reward", "nope"], "unknown reward 'nope'")])
def test_reward_experiment_bad_input_is_a_one_line_error(args, msg):
    experiments = import_benchmark("reward_forcing", "experiments")
    with pytest.raises(TrlVideoError, match=msg) as err:
        experiments.main(["reward", "--seeds", "1", "--steps", "1", *args])
    assert "\n" not in str(err.value)
