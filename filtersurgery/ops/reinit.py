"""Diverse re-initialization (Dri) of the useless scaling factors — multistep paper III-C, eq. (4).

After SST the ``Target_r`` fraction of factors with the smallest score are *useless*.
Each of them is set to a score drawn uniformly from the scores of the factors whose
rank quantile lies in the open interval ``(Target_r + I, 1 - I)`` (eq. 4), mapped back to
the factor's own norm: ``gamma = score * s_n`` (``ranking="global"``, the paper: ``s_n = 1``,
the drawn |gamma| itself; ``"per-norm"``: ``s_n`` = the mean |gamma| of its norm, so a
filter is never lifted far above its layer). Two students are made from one SST result
with ``I = 0.1`` and ``I = 0.2`` and different generators.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from filtersurgery.ops.checks import check_target_r, fraction_count
from filtersurgery.ops.ranking import DEFAULT_RANKING, ModelOrMap, rank_filters

# an allowed range narrower than this (relative to its upper end) gives (nearly) identical students
_DEGENERATE_WIDTH = 1e-3


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
    ``range``: ``(min, max)`` score of the allowed rank interval R (eq. 4; |gamma| for the
    global ranking); ``pool_size``: how many factors lie in R; ``ranking``: the units.
    """

    target_r: float
    I: float
    factors: torch.Tensor
    locations: List[Tuple[str, int]]
    old: torch.Tensor
    new: torch.Tensor
    range: Tuple[float, float]
    pool_size: int
    ranking: str = DEFAULT_RANKING

    def __len__(self) -> int:
        return int(self.factors.numel())

    def __repr__(self) -> str:
        return (f"RescaleReport({len(self)} factors re-drawn, target_r={self.target_r}, I={self.I}, "
                f"ranking={self.ranking!r}, range=({self.range[0]:.4g}, {self.range[1]:.4g}), pool={self.pool_size})")


@torch.no_grad()
def rescale(
    model: ModelOrMap,
    target_r: float = 0.3,
    I: float = 0.1,
    generator: Optional[torch.Generator] = None,
    reset_bias: bool = False,
    ranking: str = DEFAULT_RANKING,
    scales: Optional[torch.Tensor] = None,
) -> RescaleReport:
    """Diverse re-initialization (eq. 4): re-draw the gammas of the useless factors.

    The useless factors are the ``fraction_count(target_r, n)`` smallest by score
    (``ranking``: ``"per-norm"``, the default, |gamma| over its norm's mean, or ``"global"``
    |gamma|, the paper's rule). Each gets the score of a rank ``j`` drawn uniformly from the allowed
    interval R = ``(target_r + I, 1 - I)`` (mid-rank quantiles), times its own norm's scale,
    so the new gamma is positive and, in its norm's units, lies within R. Betas are kept
    unless ``reset_bias=True`` (then 0). Conv weights are not touched. ``generator`` (a CPU
    ``torch.Generator``) makes the draw reproducible; two students use two generators.
    A range of (nearly) zero width, as on an untrained model, makes every draw the same
    value: a warning says so. ``scales`` (per factor, global factor order): the norm scales
    to rank and map back with; after SST pass ``Sparsifier.scales`` (the norms' means at the
    start of SST), so the useless set is SST's and a norm SST emptied is re-drawn at its
    former scale. Default: the current gammas' (``ranking`` decides).
    """
    target_r, I = check_interval(target_r, I)
    rk = rank_filters(model, ranking, scales)
    n = len(rk)
    pool = allowed_range(n, target_r, I)
    if pool.numel() == 0:
        raise ValueError(f"model: {n} scaling factors leave no rank in (target_r + I, 1 - I) = ({target_r + I}, {1 - I})")
    lo, hi = float(rk.score[pool[0]]), float(rk.score[pool[-1]])
    if hi - lo <= _DEGENERATE_WIDTH * max(abs(hi), 1e-12):
        warnings.warn(f"rescale: the allowed range R of I={I} is degenerate ({lo:.6g}, {hi:.6g}): every re-drawn "
                      "factor gets the same value and students made with different I or generators are (nearly) "
                      "identical; is the model trained?", stacklevel=2)
    k = fraction_count(target_r, n)
    useless = rk.order[:k]
    draw = torch.randint(0, pool.numel(), (k,), generator=generator)
    new = rk.score[pool[draw]] * rk.scale[:k]  # drawn score, mapped back to each factor's own norm
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
        range=(lo, hi),
        pool_size=int(pool.numel()),
        ranking=ranking,
    )


__all__ = ["rescale", "RescaleReport", "allowed_range", "check_interval"]
