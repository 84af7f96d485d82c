"""Gradient all-reduce across data-parallel ranks without a second full copy of the gradients.

The trainer reduces gradients itself instead of through DDP hooks because methods call one network several
times per backward (policy, reference, fake score; two noising batches). Gradients are averaged in place:
each one at least ``bucket_bytes`` large is all-reduced as it is; smaller ones are packed into buckets of at
most ``bucket_bytes`` (fewer collectives for the many small LoRA tensors), reduced, and copied back. The extra
memory is therefore bounded by one bucket, whatever the model size.

Parameters sharded by FSDP2 (``DTensor``) are skipped: ``fully_shard`` already reduce-scatters their
gradients in its backward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def is_sharded(param: torch.Tensor) -> bool:
    """Whether FSDP2 owns (and reduces) this parameter's gradient."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(param, DTensor)


def all_reduce_gradients(params: Iterable[nn.Parameter], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                         group: Any = None, skip: Callable[[torch.Tensor], bool] = is_sharded) -> int:
    """Average ``p.grad`` over the ranks of ``group`` in place; returns the number of collectives issued.

    Every rank must pass the same parameters in the same order (the trainer passes a group's parameters).
    A parameter without a gradient gets a zero one, since another rank may have one.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    bucket: list[torch.Tensor] = []
    size = 0
    calls = 0

    def flush() -> None:
        nonlocal bucket, size, calls
        if not bucket:
            return
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], group=group)
            bucket[0].div_(world)
        else:
            flat = torch.cat([g.reshape(-1) for g in bucket])  # at most bucket_bytes
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
        calls += 1
        bucket, size = [], 0

    for p in params:
        if skip(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        nbytes = g.numel() * g.element_size()
        if nbytes >= bucket_bytes and g.is_contiguous():
            dist.all_reduce(g, group=group)  # large: in place, no copy at all
            g.div_(world)
            calls += 1
            continue
        if bucket and (size + nbytes > bucket_bytes or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            flush()
        bucket.append(g)
        size += nbytes
    flush()
    return calls
