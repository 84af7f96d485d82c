"""The typed batch that flows through the hook points."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

SOURCES = ("online", "ema", "replay", "offline")


@dataclass
class Rollouts:
    """A batch of generated (or stored) samples and everything learned about them.

    ``latents`` are normalised x0 latents ``[B, C, F, H, W]`` and may carry gradients (reward backprop).
    Optional fields are filled by the component that knows them; estimators write ``advantages``.
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
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _map(self, fn_t, fn_list) -> Rollouts:
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "timesteps" or f.name == "source":
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

    def with_(self, **changes: Any) -> Rollouts:
        return replace(self, **changes)

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        """Concatenate batches (fields missing in any part are dropped; sources must agree or become 'mixed')."""
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
            elif f.name == "extras":
                keys = set.intersection(*(set(v) for v in vals))
                kw[f.name] = {k: torch.cat([v[k] for v in vals]) if isinstance(vals[0][k], Tensor)
                              else sum((list(v[k]) for v in vals), []) for k in keys
                              if isinstance(vals[0][k], (Tensor, list))}
            elif any(v is None for v in vals):
                kw[f.name] = None
            elif isinstance(vals[0], Tensor):
                kw[f.name] = torch.cat(vals)
            else:
                kw[f.name] = sum((list(v) for v in vals), [])
        return Rollouts(**kw)
