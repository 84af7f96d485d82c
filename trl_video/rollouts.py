"""The typed batch that flows through the hook points."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

SOURCES = ("online", "ema", "replay", "offline")

#: fields that describe the whole batch rather than one value per sample (copied, never indexed)
BATCH_FIELDS = ("timesteps", "source", "eta")
#: former ``extras`` keys that are typed fields now; ``extras[key]`` still reads / writes them (deprecated)
LEGACY_EXTRAS = ("eta", "branch_step", "window_start", "t_mid", "x_last", "t_last", "offline_index")


class _Extras(dict):
    """``Rollouts.extras``: free-form per-component data. Keys that became typed fields are redirected to
    them (with a ``DeprecationWarning``), so components written against the old keys keep working."""

    def __init__(self, owner: Rollouts, data: dict[str, Any] | None = None):
        super().__init__()
        self._owner = owner
        for k, v in (data or {}).items():
            self[k] = v

    def _warn(self, key: str) -> None:
        warnings.warn(f"Rollouts.extras['{key}'] is the typed field Rollouts.{key} now", DeprecationWarning,
                      stacklevel=3)

    def __getitem__(self, key: str) -> Any:
        if key in LEGACY_EXTRAS:
            self._warn(key)
            value = getattr(self._owner, key)
            if value is None:
                raise KeyError(key)
            return torch.tensor(value) if key == "eta" else value  # was a 0-d tensor
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in LEGACY_EXTRAS:
            self._warn(key)
            if key == "eta" and isinstance(value, Tensor):
                value = float(value)
            setattr(self._owner, key, value)
        else:
            super().__setitem__(key, value)

    def __contains__(self, key: object) -> bool:
        if key in LEGACY_EXTRAS:
            return getattr(self._owner, str(key)) is not None
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[key] if key in self else default

    def __reduce__(self) -> Any:  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self.items()),))


@dataclass
class Rollouts:
    """A batch of generated (or stored) samples and everything learned about them.

    ``latents`` are normalised x0 latents ``[B, C, F, H, W]`` and may carry gradients (reward backprop).
    Optional fields are filled by the component that knows them; estimators write ``advantages``.
    Per-sample tensors have the batch as dim 0 and follow ``select`` / ``cat``; ``timesteps``, ``source`` and
    ``eta`` describe the whole batch. ``extras`` holds what only one component understands.
    """

    latents: Tensor
    prompts: list[str]
    prompt_embeds: Tensor | None = None
    group_ids: Tensor | None = None  # [B] long: samples of one prompt share an id (global across ranks)
    trajectory: Tensor | None = None  # [B, S+1, C, F, H, W] detached states x_{t_0..t_S}
    timesteps: Tensor | None = None  # [S+1] the t grid (1 -> 0)
    log_probs: Tensor | None = None  # [B, S] per-step log-probs (SDE steps; NaN where deterministic)
    noise: Tensor | None = None  # initial noise
    rewards: Tensor | None = None  # [B]
    advantages: Tensor | None = None  # [B]
    source: str = "online"
    eta: float | None = None  # noise level of the sampler's stochastic steps (0: ODE); recomputing log-probs
    branch_step: Tensor | None = None  # [B] long: the step index where a branch sampler took its SDE step
    window_start: Tensor | None = None  # [B] long: the first sampling step run with gradients (window samplers)
    t_mid: Tensor | None = None  # [B]: t at window_start
    x_last: Tensor | None = None  # [B, C, F, H, W] detached input of the last network evaluation with grad
    t_last: Tensor | None = None  # [B]: its t
    offline_index: Tensor | None = None  # [B] long: row of each sample in the offline-latents dataset
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # also moves legacy keys given at construction (extras={"t_mid": ...}) into their typed fields
        self.extras = _Extras(self, dict(self.extras.items()) if isinstance(self.extras, _Extras) else self.extras)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _map(self, fn_t: Callable[[Tensor], Tensor], fn_list: Callable[[list[Any]], list[Any]]) -> Rollouts:
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in BATCH_FIELDS:
                kw[f.name] = v
            elif isinstance(v, Tensor):
                kw[f.name] = fn_t(v)
            elif isinstance(v, list):
                kw[f.name] = fn_list(v)
            elif f.name == "extras":
                kw[f.name] = {k: (fn_t(x) if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == len(self)
                                  else fn_list(x) if isinstance(x, list) and len(x) == len(self) else x)
                              for k, x in v.items()}
            else:
                kw[f.name] = v
        return Rollouts(**kw)

    def select(self, idx: Tensor | list[int]) -> Rollouts:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return self._map(lambda t: t[idx_t.to(t.device)], lambda xs: [xs[i] for i in idx_t.tolist()])

    def detach(self) -> Rollouts:
        return self._map(lambda t: t.detach(), lambda xs: list(xs))

    def to(self, device: torch.device | str) -> Rollouts:
        out = self._map(lambda t: t.to(device), lambda xs: list(xs))
        if out.timesteps is not None:
            out.timesteps = out.timesteps.to(device)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain fields (tensors, lists, str): what ``torch.save`` / ``torch.load(weights_only=True)`` keep."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extras"] = dict(out["extras"])  # a plain dict: the typed view is not a weights_only-loadable type
        return out

    def with_(self, **changes: Any) -> Rollouts:
        return replace(self, **changes)

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        """Concatenate batches (fields missing in any part are dropped; sources must agree or become 'mixed';
        batch-level fields that differ are dropped)."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        kw: dict[str, Any] = {}
        for f in fields(Rollouts):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "source":
                kw[f.name] = vals[0] if len(set(vals)) == 1 else "mixed"
            elif f.name == "timesteps":
                kw[f.name] = vals[0]
            elif f.name == "eta":
                kw[f.name] = vals[0] if len(set(vals)) == 1 else None
            elif f.name == "extras":
                keys = set.intersection(*(set(v) for v in vals))
                kw[f.name] = {k: (vals[0][k] if vals[0][k].ndim == 0 else torch.cat([v[k] for v in vals]))
                              if isinstance(vals[0][k], Tensor)  # 0-dim: a batch-wide setting (eta), kept
                              else sum((list(v[k]) for v in vals), []) for k in keys
                              if isinstance(vals[0][k], (Tensor, list))}
            elif any(v is None for v in vals):
                kw[f.name] = None
            elif isinstance(vals[0], Tensor):
                kw[f.name] = torch.cat(vals)
            else:
                kw[f.name] = sum((list(v) for v in vals), [])
        return Rollouts(**kw)
