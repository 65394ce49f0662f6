"""Distributed training helpers (``torchrun``): the process group's rank and size, the one rank that
writes, DDP wrapping of the trained models and the BN statistics every rank shares after an epoch."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

__all__ = ["dist_info", "is_main_process", "barrier", "sync_buffers", "ddp_wrap"]


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (or without distributed training): the only rank that writes files."""
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


@torch.no_grad()
def sync_buffers(models: List[nn.Module]) -> None:
    """Average floating-point buffers (BN running mean/var) over ranks; integer buffers
    (``num_batches_tracked``) come from rank 0. Afterwards every rank holds the same model.
    No-op without a process group."""
    import torch.distributed as dist

    world = dist_info()[1]
    if world == 1:
        return
    for m in models:
        for b in m.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, op=dist.ReduceOp.SUM)
                b.div_(world)
            else:
                dist.broadcast(b, src=0)


def ddp_wrap(students: List[nn.Module], device: torch.device) -> List[nn.Module]:
    """Wrap each trained model in DistributedDataParallel under torchrun (gradients are
    averaged over ranks during backward, so the SST subgradient added afterwards is the
    same on every rank); without a process group the models are returned as they are."""
    if dist_info()[1] == 1:
        return list(students)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return [DDP(s, device_ids=ids) for s in students]
