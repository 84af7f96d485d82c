"""pluggy hook specifications.

Every hook is a *registration* hook: it receives a ``register`` callback and calls it once per
component it provides, e.g. ``register("luminance", LuminanceReward)``. Built-in components use
the same hooks (``trl_video.builtin``). Per-step events are TRL/transformers-style callbacks,
not hooks (see ``trl_video.callbacks``).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from . import PROJECT_NAME

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

Register = Callable[..., None]


@hookspec
def trl_video_register_samplers(register: Register) -> None:
    """Register samplers: ``register(name, factory)``; ``factory(**sampler_args)`` returns a Sampler."""


@hookspec
def trl_video_register_estimators(register: Register) -> None:
    """Register estimators (learning-signal builders such as group advantages)."""


@hookspec
def trl_video_register_losses(register: Register) -> None:
    """Register losses (objects with ``setup``, ``phases`` and ``compute``)."""


@hookspec
def trl_video_register_rewards(register: Register) -> None:
    """Register rewards (callables with ``space`` and ``differentiable`` attributes)."""


@hookspec
def trl_video_register_replay_buffers(register: Register) -> None:
    """Register replay components (what the loss sees this step: fresh, FIFO, offline stream...)."""


@hookspec
def trl_video_register_methods(register: Register) -> None:
    """Register methods: ``register(name, MethodSpec(...))`` bundles default components + config."""


@hookspec
def trl_video_register_benchmarks(register: Register) -> None:
    """Register ``trl-video bench <name>`` commands: ``register(name, fn)`` with ``fn(argv: list[str]) -> int``."""
