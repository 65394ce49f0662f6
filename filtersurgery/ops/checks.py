"""Checks and small helpers every operation shares: NaN/Inf guards with one-line errors, the
"smallest fraction" selection, and the ``target_r`` range check.

Operations call :func:`check_finite` before they change anything, so a diverged model raises
instead of spreading NaN/Inf; :func:`smallest_mask` is the one rule for "the smallest ``frac``
of ``n``" (``floor(frac * n + 1/2)`` items, ties broken by index).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from filtersurgery.tracing.norm_kinds import is_norm
from filtersurgery.tracing.scaling_map import ScalingMap, unwrap

ModelOrMap = Union[nn.Module, ScalingMap]

_DIVERGED = "the model has diverged: reload the last good checkpoint"


def nonfinite_message(arg: str, count: int, what: str, first: str) -> str:
    """``ARG: N things are NaN/Inf (first: NAME[i]); the model has diverged: ...`` (one line)."""
    verb = "is" if count == 1 else "are"
    noun = what if count == 1 else what + "s"
    return f"{arg}: {count} {noun} {verb} NaN/Inf (first: {first}); {_DIVERGED}"


def check_finite(model: ModelOrMap, arg: str = "model") -> None:
    """One-line ValueError when a scaling factor or a conv weight of ``model`` is NaN/Inf.

    Checks the affine weight of every normalization layer (the scaling factors, docs/method.md §0)
    and the weight of every ``nn.Conv2d``, without tracing. Operations call it before they
    change anything, so a diverged model raises (``model: 2 scaling factors are NaN/Inf
    (first: layer1.0.bn1.weight[5]); ...``) instead of spreading NaN/Inf into the copies,
    re-drawn gammas or rescaled kernels. Cost: one ``isfinite`` pass and one host-device
    sync per device.
    """
    net = model.module if isinstance(model, ScalingMap) else model
    if not isinstance(net, nn.Module):
        raise ValueError(f"{arg}: expected an nn.Module or a ScalingMap, got {type(model).__name__}")
    net = unwrap(net)
    groups = {"scaling factor": [], "conv weight": []}
    for name, m in net.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, nn.Conv2d):
            groups["conv weight"].append((f"{name}.weight", w.detach()))
        elif is_norm(m):
            groups["scaling factor"].append((f"{name}.weight", w.detach()))
    for what, named in groups.items():
        first = first_nonfinite(named)
        if first is not None:
            count = sum(int((~torch.isfinite(t)).sum()) for _, t in named)
            raise ValueError(nonfinite_message(arg, count, what, first))


def first_nonfinite(named: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """``"name[i, j]"`` of the first NaN/Inf entry of ``named`` tensors, None when all are finite.

    One host-device sync per device when everything is finite.
    """
    by_dev: Dict[torch.device, List[torch.Tensor]] = {}
    for _, t in named:
        by_dev.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(flags).all()) for flags in by_dev.values()):
        return None
    for name, t in named:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = torch.nonzero(bad)[0].tolist()
            return f"{name}[{', '.join(map(str, idx))}]"
    return None  # pragma: no cover - a flag said otherwise


def fraction_count(frac: float, n: int) -> int:
    """Number of items in "the smallest ``frac`` fraction" of ``n``: ``floor(frac * n + 1/2)``."""
    return int(math.floor(frac * n + 0.5))


def smallest_mask(values: torch.Tensor, frac: float, k: Optional[int] = None) -> torch.Tensor:
    """Boolean mask of the ``fraction_count(frac, n)`` smallest entries of ``values`` (``k``: that many instead).

    Ties are broken by index (stable sort), so the selection is deterministic.
    """
    n = values.numel()
    k = fraction_count(frac, n) if k is None else min(int(k), n)
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(values, stable=True).indices
        mask[order[:k]] = True
    return mask


def check_target_r(target_r: float, name: str = "target_r") -> float:
    """One-line ValueError unless ``0 < target_r < 1``."""
    try:
        t = float(target_r)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number in the open interval (0, 1), got {target_r!r}") from None
    if not 0.0 < t < 1.0:
        raise ValueError(f"{name}: must be in the open interval (0, 1), got {target_r!r}")
    return t


def check_fraction(name: str, v: float) -> float:
    """``v`` as a float in [0, 1] (a fraction of filters or kernels); one-line ValueError naming ``name``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number in [0, 1], got {v!r}") from None
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {v!r}")
    return f


__all__ = ["check_finite", "check_fraction", "check_target_r", "fraction_count", "smallest_mask"]
