"""The split protocol (docs/method.md §8): random, seeded, non-overlapping, class-balanced data parts, each
with its held-out validation images."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["split_parts"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


def _shuffled_by_class(y: torch.Tensor, g: torch.Generator) -> List[torch.Tensor]:
    """For each class id 0..max(y): its indices in a random order drawn from ``g``."""
    y = y.reshape(-1).to(torch.int64).cpu()
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if len(y) else 0).tolist()
    out, start = [], 0
    for n in counts:
        idx = order[start:start + n]
        out.append(idx[torch.randperm(n, generator=g)])
        start += n
    return out


def _quotas(available: Sequence[int], n: int, g: torch.Generator) -> List[int]:
    """Split ``n`` over classes as evenly as their ``available`` counts allow (±1).

    Water-filling; the classes that get the +1 remainders are chosen at random from ``g``.
    """
    q = [0] * len(available)
    left = n
    while left > 0:
        active = [c for c, a in enumerate(available) if q[c] < a]
        if not active:
            raise ValueError(f"cannot take {n} samples from {sum(available)}")
        share = left // len(active)
        if share == 0:
            pick = torch.randperm(len(active), generator=g)[:left].tolist()
            for i in pick:
                q[active[i]] += 1
            break
        for c in active:
            add = min(share, available[c] - q[c])
            q[c] += add
            left -= add
    return q


def split_parts(y: torch.Tensor, parts: int, seed: int, val_fraction: float = 0.1,
                subset: Optional[int] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """docs/method.md §8: a random, seeded, non-overlapping, class-balanced partition into ``parts``.

    Every class's samples are shuffled (generator seeded with ``seed``) and dealt to the
    parts in turn, the starting part rotating from class to class, so each part holds
    each class within ±1 and the part sizes differ by at most 1 (1:1 for ``parts=2``,
    1:1:1:1 for ``parts=4``). Within each part ``round(val_fraction * len(part))``
    samples, class-balanced, are held out for validation. ``subset=N`` keeps N training
    images per part (class-balanced) and ``round(N * val_fraction / (1 - val_fraction))``
    of its validation images, for quick runs.

    Returns one ``(train_idx, val_idx)`` pair of sorted int64 index tensors per part.
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer label tensor, got {y.dtype} {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"y must hold labels >= 0, got min {int(y.min())}")
    if not isinstance(parts, int) or parts < 1 or parts > max(1, len(y)):
        raise ValueError(f"parts must be an int in [1, {len(y)}], got {parts}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    by_class = _shuffled_by_class(y, g)
    members: List[List[List[torch.Tensor]]] = [[[] for _ in by_class] for _ in range(parts)]
    start = 0
    for c, idx in enumerate(by_class):
        for p in range(parts):
            members[(start + p) % parts][c].append(idx[p::parts])
        start = (start + len(idx)) % parts
    result = []
    for p in range(parts):
        cls_idx = [torch.cat(m) if m else torch.empty(0, dtype=torch.int64) for m in members[p]]
        cls_idx = [v[torch.randperm(len(v), generator=g)] for v in cls_idx]
        n_part = sum(len(v) for v in cls_idx)
        n_val = int(round(val_fraction * n_part))
        vq = _quotas([len(v) for v in cls_idx], n_val, g)
        val = [v[:q] for v, q in zip(cls_idx, vq)]
        train = [v[q:] for v, q in zip(cls_idx, vq)]
        if subset is not None:  # own RNG stream: the subset parts are subsets of the full parts
            gs = torch.Generator().manual_seed(_epoch_seed(seed, 1_000_003 + p))
            n_train = sum(len(v) for v in train)
            if not isinstance(subset, int) or not 1 <= subset <= n_train:
                raise ValueError(f"subset must be an int in [1, {n_train}] (training images per part), got {subset}")
            tq = _quotas([len(v) for v in train], subset, gs)
            train = [v[:q] for v, q in zip(train, tq)]
            n_val_sub = min(int(round(subset * val_fraction / (1.0 - val_fraction))), sum(len(v) for v in val))
            vq = _quotas([len(v) for v in val], n_val_sub, gs)
            val = [v[:q] for v, q in zip(val, vq)]
        result.append((torch.cat(train).sort().values, torch.cat(val).sort().values))
    return result
