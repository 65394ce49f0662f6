"""The device-resident batch loader of the trainer: shuffled epochs, its share under torchrun, ``uint8``
batches on the target device from in-memory or lazy images."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch

from filtersurgery.data.images import Images, LazyImages
from filtersurgery.data.splits import _epoch_seed

__all__ = ["BatchLoader"]


class _Gather(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class BatchLoader:
    """Iterates ``(x uint8 [B, C, H, W], y int64 [B])`` batches already on ``device``.

    In-memory images (a uint8 tensor) are copied to ``device`` once, at construction;
    each batch is an ``index_select`` on the device with an index tensor made once per
    epoch, so iterating causes no host synchronisation. :class:`LazyImages` are decoded
    by a ``torch.utils.data.DataLoader`` (``num_workers`` processes, pinned memory on
    CUDA) over the same index order and copied with ``non_blocking=True``.

    Order: with ``shuffle`` a permutation drawn from a CPU generator seeded by
    ``(seed, epoch)`` (call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``; resuming at epoch e gives epoch e's order again); without,
    the original order. Sharding: the order is padded by wrapping around to a multiple
    of ``world_size`` and rank ``r`` takes every ``world_size``-th element from ``r``, so
    every rank has the same number of samples (a few samples repeat when the size is not
    divisible; evaluate on one rank when exact counts matter). ``rank``/``world_size``
    default to ``torch.distributed``'s when it is initialised, else 0/1.
    """

    def __init__(self, x_uint8: Images, y: torch.Tensor, batch_size: int, shuffle: bool,
                 device: Union[str, torch.device] = "cpu", seed: int = 0, drop_last: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None, num_workers: int = 0):
        if not isinstance(x_uint8, (torch.Tensor, LazyImages)):
            raise ValueError(f"x_uint8 must be a uint8 tensor or LazyImages, got {type(x_uint8).__name__}")
        if isinstance(x_uint8, torch.Tensor) and (x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4):
            raise ValueError(f"x_uint8 must be uint8 [N, C, H, W], got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x_uint8):
            raise ValueError(f"y must be 1-D with one label per image ({len(x_uint8)}), got shape {tuple(y.shape)}")
        if len(y) == 0:
            raise ValueError("x_uint8 is empty: a loader needs at least one sample")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size}")
        if world_size is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.n = len(y)
        self.epoch = 0
        self.lazy = isinstance(x_uint8, LazyImages)
        self.y = y.to(self.device, torch.int64)
        self.x = x_uint8 if self.lazy else x_uint8.to(self.device)
        self.per_rank = -(-self.n // self.world_size)
        if self.drop_last and self.per_rank < self.batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.per_rank} samples per rank with drop_last=True")

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (deterministic in ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order (CPU)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = self.per_rank * self.world_size
        if total > self.n:
            order = torch.cat([order, order.repeat(-(-(total - self.n) // self.n))[: total - self.n]])
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def _to_device(self, idx: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned + non_blocking: no host synchronisation
            return idx.pin_memory().to(self.device, non_blocking=True)
        return idx.to(self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        nb = len(self)
        if not self.lazy:
            idx_dev = self._to_device(idx)
            for b in range(nb):
                sl = idx_dev[b * self.batch_size:(b + 1) * self.batch_size]
                yield self.x.index_select(0, sl), self.y.index_select(0, sl)
            return
        batches = [idx[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(nb)]
        loader = torch.utils.data.DataLoader(_Gather(self.x), batch_sampler=batches, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        idx_dev = self._to_device(idx)
        for b, xb in enumerate(loader):
            sl = idx_dev[b * self.batch_size:(b + 1) * self.batch_size]
            yield xb.to(self.device, non_blocking=True), self.y.index_select(0, sl)
