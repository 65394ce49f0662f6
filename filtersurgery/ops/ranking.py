"""Ranking of scaling factors: the paper's global |gamma|, or per-norm units (docs/method.md).

Every operation of SST and Dri works on the same flat list of scaling factors: the
:class:`~filtersurgery.tracing.scaling_map.FactorView` of a ScalingMap. A factor is one
``(norm, channel)``; a filter that reaches several norms (DenseNet concatenation) has
one factor per norm, and a norm channel reached by several paths is counted once.

How factors of different norms are compared is the ``ranking`` option:

- ``"global"`` (the paper's rule): the score of factor ``k`` is ``|gamma_k|``; every norm is
  assumed to share one scale.
- ``"per-norm"``: the score is ``|gamma_k| / s_n(k)`` with ``s_n`` the mean |gamma| of the
  factors of the factor's own norm ``n(k)`` (torch-pruning's "mean" group normalizer).
  Arbitrary CNNs do not share one scale: timm zero-initialises the last BN of every
  residual branch, and pretrained, SE and layer-scale models differ per layer.

``gamma_k = score_k * s_n(k)``: an operation that picks a new *score* (Dri) maps it back
to the factor's own norm with its scale, so a filter is never lifted far above its layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from filtersurgery.ops.checks import ModelOrMap, check_target_r, nonfinite_message, smallest_mask
from filtersurgery.tracing.scaling_map import FactorView, ScalingMap, unwrap

RANKINGS = ("global", "per-norm")
# the default of every operation and of the trainer: safe on any CNN (docs/operations.md, "Ranking")
DEFAULT_RANKING = "per-norm"
# a norm whose mean |gamma| is below this is treated as all-zero: its scores are 0
_SCALE_FLOOR = 1e-12


def as_scaling_map(model: ModelOrMap, example_inputs=None) -> ScalingMap:
    """Return ``model`` if it is a ScalingMap, else ``filtersurgery.trace(model)``."""
    if isinstance(model, ScalingMap):
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module or a ScalingMap, got {type(model).__name__}")
    net = unwrap(model)
    if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        raise ValueError(
            f"model: {type(net).__name__} has no nn.Conv2d layer; scaling factors are the norm weights "
            "that scale conv filters, so there is nothing to rank, sparsify or rescale"
        )
    from filtersurgery.tracing.tracer import trace  # imported lazily: tracing is only needed for raw models

    return trace(net, example_inputs)


def factor_view(model: ModelOrMap) -> FactorView:
    """The non-empty FactorView of ``model``; one-line ValueError when it has no factors."""
    sm = as_scaling_map(model)
    fv = sm.factors
    if fv.numel == 0:
        raise ValueError(
            "model: has no scaling factors (no conv output channel is normalized by an affine "
            f"BatchNorm/GroupNorm/LayerNorm); unscaled convs: {len(sm.unscaled)}"
        )
    return fv


def checked_gammas(fv: FactorView, arg: str = "model") -> torch.Tensor:
    """``fv.gammas()`` (float32); a one-line ValueError naming the first NaN/Inf factor.

    One host-device sync (the ``isfinite`` test). The message reads
    ``model: 3 scaling factors are NaN/Inf (first: layer1.0.bn1.weight[5]); ...``.
    """
    g = fv.gammas()
    ok = torch.isfinite(g)
    if not bool(ok.all()):
        bad = ~ok
        norm, ch = fv.locate(int(torch.nonzero(bad)[0]))
        raise ValueError(nonfinite_message(arg, int(bad.sum()), "scaling factor", f"{norm}.weight[{ch}]"))
    return g


def check_ranking(ranking: str) -> str:
    """One-line ValueError unless ``ranking`` is one of :data:`RANKINGS`."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking: must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    return ranking


def factor_scales(fv: FactorView, ranking: str = DEFAULT_RANKING, abs_gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-factor scale ``s_n(k)`` (global factor order, float32, on the gammas' device).

    ``"global"``: all 1. ``"per-norm"``: the mean |gamma| of the factors of the factor's own
    norm (a norm whose mean is ~0, e.g. a zero-initialised BN that was never trained, gets
    a tiny floor, so its scores are 0). ``abs_gamma``: the |gamma| vector to use (default:
    the current gammas, checked for NaN/Inf).
    """
    check_ranking(ranking)
    a = checked_gammas(fv).abs() if abs_gamma is None else abs_gamma
    if ranking == "global":
        return torch.ones_like(a)
    sizes = torch.tensor([int(c.numel()) for c in fv.channels], device=a.device)
    norm_of = torch.repeat_interleave(torch.arange(len(sizes), device=a.device), sizes)
    sums = torch.zeros(len(sizes), device=a.device, dtype=a.dtype).index_add_(0, norm_of, a)
    means = (sums / sizes.to(a.dtype)).clamp_min(_SCALE_FLOOR)
    return means[norm_of]


def factor_scores(fv: FactorView, ranking: str = DEFAULT_RANKING, scales: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scores, scales)``: ``|gamma_k| / s_n(k)`` in the units of ``ranking`` and the scales used.

    ``scales`` fixes the per-factor scales (e.g. those at the start of SST) instead of
    computing them from the current gammas.
    """
    a = checked_gammas(fv).abs()
    s = factor_scales(fv, ranking, a) if scales is None else scales.to(a.device, a.dtype)
    return a / s, s


@dataclass
class FilterRanking:
    """Scaling factors ordered by ascending score (``ranking``: ``"global"`` |gamma| or ``"per-norm"``).

    ``order[j]`` is the global factor index of rank ``j`` (0 = smallest score),
    ``abs_gamma[j]`` its |gamma| and ``score[j]`` its score (= ``abs_gamma`` for the
    global ranking); ``scale[j]`` the factor's norm scale (``abs_gamma = score * scale``).
    ``factors`` is the FactorView the indices refer to and ``scaling_map`` the map, to go
    from a factor to the conv filters it scales.
    """

    order: torch.Tensor
    abs_gamma: torch.Tensor
    factors: FactorView
    scaling_map: ScalingMap
    score: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    ranking: str = "global"  # what ``score`` means; without ``score`` it is |gamma| (the global units)

    def __post_init__(self) -> None:
        if self.score is None:
            self.score = self.abs_gamma
        if self.scale is None:
            self.scale = torch.ones_like(self.abs_gamma)

    def __repr__(self) -> str:
        n = len(self)
        lo = f"{float(self.score[0]):.4g}" if n else "-"
        hi = f"{float(self.score[-1]):.4g}" if n else "-"
        return (f"FilterRanking({n} factors in {len(self.factors.norms)} norms, ranking={self.ranking!r}, "
                f"score {lo}..{hi})")

    def __len__(self) -> int:
        return int(self.order.numel())

    def location(self, j: int) -> Tuple[str, int]:
        """``(norm_name, channel)`` of the factor of rank ``j``."""
        return self.factors.locate(int(self.order[j]))

    def filters(self, j: int) -> List[Tuple[str, int]]:
        """``[(conv_name, filter)]`` scaled by the factor of rank ``j``."""
        norm, ch = self.location(j)
        out = []
        for e in self.scaling_map:
            for r in e.scaled_by:
                if r.norm == norm and r.covers(ch - r.offset, e.out_channels):
                    out.append((e.name, ch - r.offset))
        return out

    def quantile(self) -> torch.Tensor:
        """Mid-rank quantile ``(j + 1/2) / n`` of every rank ``j`` (used by eq. 4)."""
        n = len(self)
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def rank_filters(model: ModelOrMap, ranking: str = DEFAULT_RANKING, scales: Optional[torch.Tensor] = None) -> FilterRanking:
    """Rank all scaling factors of ``model`` by score (multistep paper III-B; docs/method.md).

    ``ranking="per-norm"`` (default) ranks by |gamma| over the mean |gamma| of the factor's own
    norm; ``"global"`` (the paper's rule) by |gamma| across all norms. ``scales`` fixes the per-factor
    norm scales (global factor order), e.g. ``Sparsifier.scales`` from the start of SST, so
    that a norm SST drove towards 0 still ranks as small; default: the current gammas'.
    Accepts a model (traced) or a ScalingMap. Ties are broken by factor index. The returned
    tensors are on the CPU.
    """
    check_ranking(ranking)
    sm = as_scaling_map(model)
    fv = factor_view(sm)
    a = checked_gammas(fv).abs()
    if scales is not None and scales.numel() != a.numel():
        raise ValueError(f"scales: one per scaling factor ({a.numel()}), got {scales.numel()}")
    scale = factor_scales(fv, ranking, a) if scales is None else scales.to(a.device, a.dtype).clamp_min(_SCALE_FLOOR)
    a, scale = a.cpu(), scale.cpu()
    srt = torch.sort(a / scale, stable=True)
    return FilterRanking(order=srt.indices, abs_gamma=a[srt.indices], factors=fv, scaling_map=sm,
                         score=srt.values, scale=scale[srt.indices], ranking=ranking)


def useless_mask(model: ModelOrMap, target_r: float = 0.3, ranking: str = DEFAULT_RANKING) -> torch.Tensor:
    """Per-factor mask of the *useless* factors: the ``target_r`` fraction with the smallest score."""
    check_target_r(target_r)
    return smallest_mask(factor_scores(factor_view(model), ranking)[0], target_r)


def remaining_mean(model: ModelOrMap, target_r: float = 0.3, ranking: str = DEFAULT_RANKING) -> float:
    """Mean |gamma| of the factors that are not useless (Fig. 3 (c) of the multistep paper)."""
    fv = factor_view(model)
    g = checked_gammas(fv).abs()
    keep = ~smallest_mask(factor_scores(fv, ranking)[0], target_r)
    return float(g[keep].mean()) if bool(keep.any()) else 0.0


def gamma_values(obj: Union[ModelOrMap, torch.Tensor]) -> torch.Tensor:
    """|gamma| of every factor of a model / ScalingMap, or ``obj.abs()`` for a tensor (CPU float32)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().abs().flatten().cpu()
    return checked_gammas(factor_view(obj)).abs().cpu()


__all__ = [
    "RANKINGS",
    "factor_scores",
    "factor_scales",
    "FilterRanking",
    "rank_filters",
    "useless_mask",
    "remaining_mean",
    "as_scaling_map",
    "check_ranking",
    "gamma_values",
]
