"""How the gradients of R data-parallel replicas are combined: one
definition that both engines compute, so they can agree bit for bit.

The replicas' gradient is their mean, summed in replica order and then
divided: (g_0 + g_1 + ... + g_{R-1}) / R. Float32 addition is not
associative, so "the mean" is only one number when the order is fixed.

- The sequential engine replays the R shards one after another and combines
  their gradients with ``ordered_mean``.
- On the distributed engine, DistributedDataParallel's own all-reduce
  multiplies each gradient by 1/R and sums in the order its algorithm picks
  (gloo's and NCCL's rings start each chunk at a different rank). For R = 2
  that is the same number (x * 0.5 is exact and a + b = b + a), for R > 2 it
  differs in the last bits, which training amplifies. With ``--deterministic``
  the run registers ``ordered_mean_hook`` instead: every rank gathers all R
  gradients and sums them in replica order, exactly as the sequential engine
  does. It moves R/2 times the bytes of a ring all-reduce, so it is not the
  default for timing runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def ordered_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(t_0 + t_1 + ... + t_{n-1}) / n, added left to right (a new tensor)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors))


def ordered_mean_hook(group, bucket):
    """A DDP communication hook computing ``ordered_mean`` of the replicas'
    gradient buckets (register with ``model.register_comm_hook(None, ...)``;
    ``group`` None is the default group). Unannotated: DDP checks a hook's
    annotations against its own classes, and this module's are strings."""
    flat = bucket.buffer()
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(parts, flat, group=group, async_op=True)

    def combine(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        return ordered_mean(parts)

    return work.get_future().then(combine)
