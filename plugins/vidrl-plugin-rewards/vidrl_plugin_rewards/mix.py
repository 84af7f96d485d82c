"""``reward: mix``: a weighted sum of registered rewards, each normalised by its own running statistics.

    r_mix = sum_i w_i * (r_i - mu_i) / (sigma_i + eps)

``mu_i``, ``sigma_i`` are running mean / std of reward i over every sample scored so far (Welford's
algorithm, updated with the batch before normalising it), so rewards on different scales (PickScore ~20,
aesthetic ~5, alignment ~0.5) contribute by their weights. ``normalize: false`` sums raw values. Each
component's batch mean (raw) is logged as ``reward/<name>`` (the trainer reads :meth:`pop_metrics`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from trl_video.errors import TrlVideoError


class RunningMoments:
    """Running mean / variance over all values seen (Welford / Chan's parallel update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = int(s["count"]), float(s["mean"]), float(s["m2"])


class MixReward:
    """``reward: mix`` with ``reward_args: {components: {pickscore: {weight: 1.0, args: {...}}, alignment: {}},
    normalize: true}``."""

    name = "mix"

    def __init__(self, components: dict[str, dict[str, Any]] | None = None, normalize: bool = True,
                 eps: float = 1e-6, registry: Any = None):
        if not components:
            raise TrlVideoError("reward 'mix' needs reward_args.components, e.g. {pickscore: {weight: 1.0}}")
        from trl_video.plan import build_reward
        from trl_video.plugins import get_registry

        reg = registry or get_registry()
        self.parts: dict[str, tuple[Any, float]] = {}
        for name, spec in components.items():
            spec = dict(spec or {})
            unknown = set(spec) - {"weight", "args"}
            if unknown:
                raise TrlVideoError(f"reward 'mix': component '{name}' has unknown keys {sorted(unknown)} "
                                    f"(expected weight, args)")
            self.parts[name] = (build_reward(reg, name, dict(spec.get("args") or {})), float(spec.get("weight", 1.0)))
        spaces = {r.space for r, _ in self.parts.values()}
        if len(spaces) > 1:
            raise TrlVideoError(f"reward 'mix' combines pixel and latent rewards ({list(self.parts)}); use one space")
        self.space = spaces.pop()
        self.differentiable = all(r.differentiable for r, _ in self.parts.values())
        self.normalize = normalize
        self.eps = eps
        self.moments = {n: RunningMoments() for n in self.parts}
        self._sums: dict[str, list[float]] = {}

    def components(self, inputs: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return {n: r(inputs, prompts).float() for n, (r, _) in self.parts.items()}

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        total: Tensor | None = None
        for name, r in self.components(inputs, prompts).items():
            weight = self.parts[name][1]
            acc = self._sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(r.detach().sum())
            acc[1] += r.numel()
            if self.normalize:
                m = self.moments[name]
                m.update(r)
                r = (r - m.mean) / (m.std + self.eps)
            total = weight * r if total is None else total + weight * r
        assert total is not None
        return total

    def pop_metrics(self) -> dict[str, float]:
        """Mean raw value of each component since the last call (what the trainer logs per step)."""
        out = {n: s / c for n, (s, c) in self._sums.items() if c}
        self._sums = {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {n: m.state_dict() for n, m in self.moments.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in state.items():
            if n in self.moments:
                self.moments[n].load_state_dict(s)
