"""Probes on a live trainer, shared by the in-process tests and the distributed workers (which run as scripts
from this folder, so it is importable from both)."""

from __future__ import annotations

from typing import Any


def record_losses(trainer: Any) -> list[float]:
    """Wrap ``trainer.loss.compute``: every loss value it returns (one per phase and micro-batch) is appended to
    the returned list."""
    seen: list[float] = []
    compute = trainer.loss.compute

    def recording(ctx: Any, phase: Any, batch: Any) -> Any:
        loss, metrics = compute(ctx, phase, batch)
        seen.append(float(loss.detach()))
        return loss, metrics

    trainer.loss.compute = recording
    return seen
