"""Interfaces of the five hook points and the context every component receives.

Each hook point has a ``typing.Protocol`` (what the trainer relies on, flags included) and a small base class
with the default flag values (subclassing is optional but saves declaring every flag):

=========  ======================  ==============  =====================================================
hook       protocol                base class      flags (default)
=========  ======================  ==============  =====================================================
sampler    :class:`Sampler`        ``BaseSampler`` --
reward     :class:`Reward`         ``rewards.Reward``  ``space`` ("pixel"), ``differentiable``
estimator  :class:`Estimator`      ``BaseEstimator`` --
replay     :class:`Replay`         ``BaseReplay``  ``needs_rollouts`` (True): False = no sampling at all
loss       :class:`Loss`           ``BaseLoss``    ``sample_grad`` (False): sample with autograd on;
                                                   ``reward_grad`` (False): score with autograd on
=========  ======================  ==============  =====================================================

* Sampler:   ``sample(ctx, prompts, embeds, group_ids) -> Rollouts``
             optional ``evaluation_sampler() -> EvalSampler | None``: how evaluation samples the policy it
             trains (None: the deterministic ODE sampler; see ``trl_video.evaluation.EvalSampling``).
* Reward:    ``__call__(inputs, prompts) -> Tensor[B]``; the trainer decodes latents only for pixel rewards.
* Replay:    ``update(ctx, fresh) -> None``; ``sample(ctx, fresh) -> Rollouts`` (what the loss sees);
             ``state_dict()`` / ``load_state_dict()`` (saved in checkpoints).
* Estimator: ``__call__(ctx, batch) -> Rollouts`` (writes ``advantages``; gathers across processes).
* Loss:      ``setup(ctx) -> dict[str, Trainable]`` (auxiliary modules it trains, besides "policy");
             ``phases(step) -> list[Phase]`` (which optimiser groups step, how often, in what order);
             ``compute(ctx, phase, batch) -> (loss, metrics)``; optional ``state_dict``/``load_state_dict``.

A component that does not declare a flag gets the default from :func:`ensure_interface` (with a
``DeprecationWarning``); a component without a required method is reported as a plugin error.
See docs/plugin-authors.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import VideoRewardConfig
    from ..evaluation import EvalSampler
    from ..models.policy import VideoPolicy
    from ..rollouts import Rollouts


@dataclass
class Trainable:
    """An auxiliary module a loss trains with its own optimiser / LR schedule (e.g. b_phi, a fake score
    model, a reward-model ensemble). ``lr``/``weight_decay``/``betas`` default to the trainer config."""

    module: nn.Module
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    max_grad_norm: float | None = None
    ema_decay: float | None = None  # keep an EMA copy of this module's trainable parameters


@dataclass
class Phase:
    """One optimisation phase of a training step.

    ``groups``: optimiser groups whose parameters this phase's loss updates ("policy" or a Trainable's name).
    ``repeats``: how many optimiser steps the phase takes this step (DMD's 5 fake-score updates).
    ``needs_rollouts``: whether ``compute`` uses this step's batch (phases can bring their own data).
    ``uses_graph``: whether this phase backpropagates through the batch's sampling graph (``sample_grad``
    losses). The graph is handed to the first phase that uses it; other phases get the detached batch.
    """

    name: str
    groups: tuple[str, ...] = ("policy",)
    repeats: int = 1
    needs_rollouts: bool = True
    uses_graph: bool = True


# ---------------------------------------------------------------------------------------------- interfaces
@runtime_checkable
class Reward(Protocol):
    """A reward: ``space`` "pixel" (decoded videos ``[B, 3, F, H, W]`` in [-1, 1]) or "latent" (normalised
    latents ``[B, C, F, H, W]``); ``differentiable``: gradients flow through it (reward backprop)."""

    space: str
    differentiable: bool

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor: ...


RewardFn = Reward  # the former name


@runtime_checkable
class Sampler(Protocol):
    """Generates this step's rollouts. Runs under ``torch.no_grad`` unless the loss sets ``sample_grad``."""

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts: ...


@runtime_checkable
class Estimator(Protocol):
    """Turns rewards into the learning signal (writes ``Rollouts.advantages``)."""

    def __call__(self, ctx: TrainContext, batch: Rollouts) -> Rollouts: ...


@runtime_checkable
class Replay(Protocol):
    """Decides what the loss sees. ``needs_rollouts=False``: the trainer samples nothing and calls
    ``sample(ctx, None)`` (an offline stream)."""

    needs_rollouts: bool

    def update(self, ctx: TrainContext, fresh: Rollouts) -> None: ...

    def sample(self, ctx: TrainContext, fresh: Rollouts | None) -> Rollouts: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Loss(Protocol):
    """The method's objective. ``sample_grad``: the sampler runs with autograd on (reward backprop through the
    sampling chain); ``reward_grad``: the reward is scored with autograd on (only used with ``sample_grad``)."""

    sample_grad: bool
    reward_grad: bool

    def setup(self, ctx: TrainContext) -> dict[str, Trainable]: ...

    def phases(self, step: int) -> list[Phase]:
        """A pure function of ``step``: the trainer also calls it for every step at start-up to size each
        group's LR schedule and warm-up to the optimiser steps the group takes."""
        ...

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[Tensor, dict[str, float]]: ...

    def ema_schedule(self, group: str) -> Callable[[int], float] | None:
        """The EMA decay of ``group`` after n optimiser steps, for losses that use the EMA as a second policy
        (DiffusionNFT's old policy); the trainer then keeps that group's EMA on this schedule (it replaces the
        recipe's ``ema_decay``). None: the recipe's ``ema_decay`` / ``Trainable.ema_decay`` decides."""
        ...


class BaseSampler:
    """Optional base of samplers (the built-in grid samplers derive from ``samplers.GridSampler``)."""

    name = "sampler"

    def sample(self, ctx: TrainContext, prompts: list[str], embeds: Tensor, group_ids: Tensor) -> Rollouts:
        raise NotImplementedError

    def evaluation_sampler(self) -> EvalSampler | None:
        """How evaluation (training's ``eval_at_end``, ``trl-video eval``, the checkpoint curve) samples the policy
        this sampler trains. None: the deterministic ODE sampler with ``eval_num_steps``; a generator that is only
        valid under its own loop (a causal self-rollout) returns that loop."""
        return None


class BaseEstimator:
    name = "estimator"

    def __call__(self, ctx: TrainContext, batch: Rollouts) -> Rollouts:
        raise NotImplementedError


class BaseReplay:
    """Optional base of replay components: stateless, needs this step's rollouts."""

    name = "replay"
    needs_rollouts: bool = True

    def update(self, ctx: TrainContext, fresh: Rollouts) -> None:
        pass

    def sample(self, ctx: TrainContext, fresh: Rollouts | None) -> Rollouts:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BaseLoss:
    """Optional base of losses: no gradient through sampling or reward, one ``policy`` phase, no auxiliary
    modules."""

    name = "loss"
    sample_grad: bool = False
    reward_grad: bool = False

    def setup(self, ctx: TrainContext) -> dict[str, Trainable]:
        return {}

    def phases(self, step: int) -> list[Phase]:
        return [Phase("policy")]

    def compute(self, ctx: TrainContext, phase: Phase, batch: Rollouts | None) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def ema_schedule(self, group: str) -> Callable[[int], float] | None:
        return None


#: per hook point: (protocol, required methods, flag defaults)
INTERFACES: dict[str, tuple[type, tuple[str, ...], dict[str, Any]]] = {
    "sampler": (Sampler, ("sample",), {}),
    "estimator": (Estimator, ("__call__",), {}),
    "replay": (Replay, ("update", "sample"), {"needs_rollouts": True}),
    "loss": (Loss, ("setup", "phases", "compute"), {"sample_grad": False, "reward_grad": False}),
    "reward": (Reward, ("__call__",), {"space": "pixel", "differentiable": False}),
}


#: per hook point: optional methods and what a component without them behaves like (no warning: they are optional)
OPTIONAL_METHODS: dict[str, dict[str, Callable[..., Any]]] = {
    "loss": {"ema_schedule": lambda group: None},
}


def ensure_interface(kind: str, obj: Any, name: str = "") -> Any:
    """Check a freshly built component against its hook point's interface. A missing method raises
    ``PluginError``; a missing flag is set to its default with a ``DeprecationWarning`` (components written
    before the flags were part of the interface keep working). Returns ``obj``."""
    if kind not in INTERFACES:
        return obj
    _, methods, flags = INTERFACES[kind]
    label = f"{kind} '{name or getattr(obj, 'name', type(obj).__name__)}'"
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        from ..errors import PluginError

        raise PluginError(f"{label} ({type(obj).__module__}.{type(obj).__qualname__}) lacks {', '.join(missing)} "
                          f"of the {kind} interface (trl_video.components.base.{INTERFACES[kind][0].__name__})")
    for flag, default in flags.items():
        if not hasattr(obj, flag):
            warnings.warn(f"{label} does not declare '{flag}'; assuming {default!r} (declare it, or derive from "
                          f"trl_video.components.base.Base{kind.capitalize()})", DeprecationWarning, stacklevel=2)
            setattr(obj, flag, default)
    for method, fallback in OPTIONAL_METHODS.get(kind, {}).items():
        if not callable(getattr(obj, method, None)):
            setattr(obj, method, fallback)
    return obj


@dataclass
class TrainContext:
    """What components see during training: the policy, config, accelerator, the reward, RNG and shared state.

    Components get everything they need from here, not from the registry or the plan: ``sampler`` is the
    step's sampler (e.g. its timesteps), ``make_reward(name, args)`` builds another registered reward (e.g. a
    true pixel reward next to a latent one).
    """

    policy: VideoPolicy
    config: VideoRewardConfig
    accelerator: Any
    reward: Any
    method_config: Any
    generator: torch.Generator  # per-rank generator for sampling noise (seeded from config.seed + rank)
    step: int = 0
    modules: dict[str, nn.Module] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)
    offline: Any = None  # an OfflineLatents stream when the recipe names offline latents
    registry: Any = None  # deprecated: use ``sampler`` / ``make_reward`` (kept while plugins migrate)
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by components within a step
    sampler: Any = None  # the recipe's Sampler instance
    make_reward: Callable[[str, dict[str, Any]], Any] | None = None  # name ("a+b" sums too), args -> Reward

    def build_reward(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Another registered reward by name (``make_reward``), e.g. VELR's true pixel reward."""
        if self.make_reward is None:
            from ..errors import TrlVideoError

            raise TrlVideoError(f"this context cannot build rewards (reward '{name}' requested); "
                                f"the trainer sets TrainContext.make_reward")
        return self.make_reward(name, dict(args or {}))

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def gather(self, t: Tensor) -> Tensor:
        """All-gather along dim 0 across processes (no-op for one process)."""
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.contiguous())

    def score(self, latents: Tensor, prompts: list[str], reward: Any = None, grad: bool = False) -> Tensor:
        """Reward of latents: decodes to pixels only when the reward is a pixel reward."""
        reward = reward or self.reward
        ctx = torch.enable_grad() if grad else torch.no_grad()
        from ..errors import TrlVideoError

        name = getattr(reward, "name", type(reward).__name__)
        with ctx:
            inputs = self.policy.decode(latents) if reward.space == "pixel" else latents
            try:
                r = reward(inputs, prompts)
            except TrlVideoError:
                raise
            except Exception as exc:  # a reward's own failure, reported as the reward's (one line)
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise TrlVideoError(f"reward '{name}' failed: {type(exc).__name__}: {first}") from exc
        if not isinstance(r, Tensor):
            raise TrlVideoError(f"reward '{name}' returned a {type(r).__name__}; a reward returns a floating-point "
                                f"tensor of shape ({len(prompts)},)")
        if not torch.is_floating_point(r):
            raise TrlVideoError(f"reward '{name}' returned {r.dtype} values; a reward returns a floating-point tensor "
                                f"(integers carry no gradient)")
        if not torch.isfinite(r).all():
            bad = list(range(len(prompts))) if r.ndim == 0 else (~torch.isfinite(r)).flatten().nonzero().flatten().tolist()
            raise TrlVideoError(f"reward '{name}' returned NaN/inf for samples {bad[:8]} "
                                f"(prompts: {[prompts[i] for i in bad if i < len(prompts)][:3]})")
        if tuple(r.shape) != (len(prompts),):
            raise TrlVideoError(f"reward '{name}' returned shape {tuple(r.shape)}; expected one value per sample "
                                f"({len(prompts)},)")
        return r.float()


def unwrap(module: Any) -> Any:
    return getattr(module, "module", module)
