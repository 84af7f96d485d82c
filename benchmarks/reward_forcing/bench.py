"""Reward-Forcing benchmarks and commands (``benchmarks/reward_forcing``, from a checkout):

* ``trl-video bench reward_forcing.experiments ode|reward|stream`` (= ``python benchmarks/reward_forcing/experiments.py``);
* ``trl-video bench reward_forcing.build-ode``: the stage-1 teacher ODE-trajectory dataset;
* ``trl-video bench reward_forcing.stream``: a long video from the causal generator, chunk by chunk.
"""

from __future__ import annotations


def experiments_main(argv: list[str]) -> int:
    from .experiments import main

    return int(main(argv) or 0)


def build_ode_main(argv: list[str]) -> int:
    from .commands import cmd_build_ode

    return cmd_build_ode(argv)


def stream_main(argv: list[str]) -> int:
    from .commands import cmd_stream

    return cmd_stream(argv)


BENCHMARKS = {"experiments": experiments_main, "build-ode": build_ode_main, "stream": stream_main}
# what the reward-forcing recipes read: the stage-1 trajectories, and the stage-1 model stage 2 starts from
BUILDS = {
    "out/tiny/reward_forcing_ode_data": "trl-video bench reward_forcing.build-ode --teacher tiny-wan "
                                        "--out out/tiny/reward_forcing_ode_data --num 512",
    "data/rf_ode_wan": "trl-video bench reward_forcing.build-ode --teacher Wan-AI/Wan2.1-T2V-1.3B-Diffusers --out "
                       "data/rf_ode_wan --prompts recipes/prompts/general_video_prompts.txt --num 1400 "
                       "--teacher-steps 48 --guidance 5.0",
    "out/tiny/reward_forcing_ode/model": "trl-video train --recipe recipes/tiny/reward_forcing_ode.yaml",
}
