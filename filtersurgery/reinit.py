"""Diverse re-initialization (Dri) of the useless scaling factors — multistep paper III-C, eq. (4), SPEC §2.

After SST the ``Target_r`` fraction of factors with the smallest |gamma| are *useless*.
Each of them is set to a value drawn uniformly from the |gamma| of the factors whose
rank quantile lies in the open interval ``(Target_r + I, 1 - I)`` (eq. 4). Two students
are made from one SST result with ``I = 0.1`` and ``I = 0.2`` and different generators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .ranking import ModelOrMap, check_target_r, fraction_count, rank_filters


def allowed_range(n: int, target_r: float, I: float) -> torch.Tensor:
    """Eq. (4): ranks ``j`` (0 = smallest |gamma|) with ``Target_r + I < (j + 1/2) / n < 1 - I``."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.nonzero((q > target_r + I) & (q < 1.0 - I)).flatten()


def check_interval(target_r: float, I: float) -> Tuple[float, float]:
    """One-line ValueError unless ``0 < target_r < 1``, ``I >= 0`` and ``target_r + I < 1 - I``."""
    target_r = check_target_r(target_r)
    try:
        I = float(I)
    except (TypeError, ValueError):
        raise ValueError(f"I: must be a number >= 0, got {I!r}") from None
    if not I >= 0.0:
        raise ValueError(f"I: must be >= 0, got {I!r}")
    if not target_r + I < 1.0 - I - 1e-9:  # tolerance: 0.3 + 0.35 < 0.65 in floating point
        raise ValueError(
            f"I: eq. (4) needs target_r + I < 1 - I, i.e. 0 <= I < {(1.0 - target_r) / 2:.4g} for target_r={target_r}; got {I}"
        )
    return target_r, I


@dataclass
class RescaleReport:
    """What :func:`rescale` changed.

    ``factors``: global factor indices re-initialized (ascending |gamma| before Dri);
    ``locations``: their ``(norm_name, channel)``; ``old`` / ``new``: gamma before / after;
    ``range``: ``(min, max)`` |gamma| of the allowed rank interval R (eq. 4);
    ``pool_size``: how many factors lie in R.
    """

    target_r: float
    I: float
    factors: torch.Tensor
    locations: List[Tuple[str, int]]
    old: torch.Tensor
    new: torch.Tensor
    range: Tuple[float, float]
    pool_size: int

    def __len__(self) -> int:
        return int(self.factors.numel())

    def __repr__(self) -> str:
        lo, hi = self.range
        return (f"RescaleReport(target_r={self.target_r}, I={self.I}, re-initialized {len(self)} factors "
                f"from a pool of {self.pool_size}, |gamma| range [{lo:.4g}, {hi:.4g}])")


@torch.no_grad()
def rescale(
    model: ModelOrMap,
    target_r: float = 0.3,
    I: float = 0.1,
    generator: Optional[torch.Generator] = None,
    reset_bias: bool = False,
) -> RescaleReport:
    """Diverse re-initialization (eq. 4): re-draw the gammas of the useless factors.

    The useless factors are the ``fraction_count(target_r, n)`` smallest by |gamma| (global
    ranking). Each gets ``|gamma_j|`` for a rank ``j`` drawn uniformly from the allowed
    interval R = ``(target_r + I, 1 - I)`` (mid-rank quantiles), so the new value is
    positive and lies within R's gammas. Betas are kept unless ``reset_bias=True`` (then 0).
    Conv weights are not touched. ``generator`` (a CPU ``torch.Generator``) makes the
    draw reproducible; two students use two generators.
    """
    target_r, I = check_interval(target_r, I)
    rk = rank_filters(model)
    n = len(rk)
    pool = allowed_range(n, target_r, I)
    if pool.numel() == 0:
        raise ValueError(f"model: {n} scaling factors leave no rank in (target_r + I, 1 - I) = ({target_r + I}, {1 - I})")
    k = fraction_count(target_r, n)
    useless = rk.order[:k]
    draw = torch.randint(0, pool.numel(), (k,), generator=generator)
    new = rk.abs_gamma[pool[draw]]
    fv = rk.factors
    old = fv.gammas().cpu()[useless]
    offs = torch.tensor(fv.offsets, dtype=torch.long)
    norm_idx = torch.searchsorted(offs, useless, right=True) - 1
    mods = dict(rk.scaling_map.module.named_modules())
    locations: List[Tuple[str, int]] = [("", -1)] * k
    for i in torch.unique(norm_idx).tolist():
        sel = norm_idx == i
        chans = fv.channels[i][useless[sel] - offs[i]]
        p, idx = fv.params[i], chans.to(fv.params[i].device)
        p.data[idx] = new[sel].to(device=p.device, dtype=p.dtype)
        if reset_bias:
            bias = getattr(mods[fv.norms[i]], "bias", None)
            if bias is not None:
                bias.data[idx] = 0
        for pos, c in zip(torch.nonzero(sel).flatten().tolist(), chans.tolist()):
            locations[pos] = (fv.norms[i], c)
    return RescaleReport(
        target_r=target_r,
        I=I,
        factors=useless.clone(),
        locations=locations,
        old=old,
        new=new.clone(),
        range=(float(rk.abs_gamma[pool[0]]), float(rk.abs_gamma[pool[-1]])),
        pool_size=int(pool.numel()),
    )


__all__ = ["rescale", "RescaleReport", "allowed_range", "check_interval"]
