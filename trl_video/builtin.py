"""Built-in components, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from . import hookimpl
from .components.estimators import BUILTIN_ESTIMATORS
from .components.replay import BUILTIN_REPLAYS
from .components.rewards import BUILTIN_REWARDS
from .components.samplers import BUILTIN_SAMPLERS
from .methods.refl import REFL, ReFLLoss


@hookimpl
def trl_video_register_samplers(register):
    for name, cls in BUILTIN_SAMPLERS.items():
        register(name, cls)


@hookimpl
def trl_video_register_estimators(register):
    for name, cls in BUILTIN_ESTIMATORS.items():
        register(name, cls)


@hookimpl
def trl_video_register_losses(register):
    register("refl", ReFLLoss)


@hookimpl
def trl_video_register_rewards(register):
    for name, cls in BUILTIN_REWARDS.items():
        register(name, cls)


@hookimpl
def trl_video_register_replay_buffers(register):
    for name, cls in BUILTIN_REPLAYS.items():
        register(name, cls)


@hookimpl
def trl_video_register_methods(register):
    register("refl", REFL)


@hookimpl
def trl_video_register_benchmarks(register):
    from .bench import bench_memory_plan, bench_overhead, bench_scaling

    register("overhead", bench_overhead)
    register("scaling", bench_scaling)
    register("memory-plan", bench_memory_plan)
