"""Global ranking of scaling factors by |gamma| (SPEC §1 candidates).

Every operation of SPEC §1/§2 works on the same flat list of scaling factors: the
:class:`~filtersurgery.scaling_map.FactorView` of a ScalingMap. A factor is one
``(norm, channel)``; a filter that reaches several norms (DenseNet concatenation) has
one factor per norm, and a norm channel reached by several paths is counted once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .scaling_map import FactorView, ScalingMap, unwrap

ModelOrMap = Union[nn.Module, ScalingMap]


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
    from .tracer import trace  # imported lazily: tracing is only needed for raw models

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


_DIVERGED = "the model has diverged: reload the last good checkpoint"


def _nonfinite_message(arg: str, count: int, what: str, first: str) -> str:
    verb = "is" if count == 1 else "are"
    noun = what if count == 1 else what + "s"
    return f"{arg}: {count} {noun} {verb} NaN/Inf (first: {first}); {_DIVERGED}"


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
        raise ValueError(_nonfinite_message(arg, int(bad.sum()), "scaling factor", f"{norm}.weight[{ch}]"))
    return g


def _is_norm(m: nn.Module) -> bool:
    from .tracer import norm_kind  # lazily: the tracer imports torch-pruning

    return norm_kind(m) is not None


def check_finite(model: ModelOrMap, arg: str = "model") -> None:
    """One-line ValueError when a scaling factor or a conv weight of ``model`` is NaN/Inf.

    Checks the affine weight of every normalization layer (the scaling factors, SPEC §0)
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
        elif _is_norm(m):
            groups["scaling factor"].append((f"{name}.weight", w.detach()))
    for what, named in groups.items():
        first = _first_nonfinite(named)
        if first is not None:
            count = sum(int((~torch.isfinite(t)).sum()) for _, t in named)
            raise ValueError(_nonfinite_message(arg, count, what, first))


def _first_nonfinite(named: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
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


def smallest_mask(values: torch.Tensor, frac: float) -> torch.Tensor:
    """Boolean mask of the ``fraction_count(frac, n)`` smallest entries of ``values``.

    Ties are broken by index (stable sort), so the selection is deterministic.
    """
    n = values.numel()
    k = fraction_count(frac, n)
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(values, stable=True).indices
        mask[order[:k]] = True
    return mask


@dataclass
class FilterRanking:
    """Scaling factors ordered by ascending |gamma| (global ranking, SPEC §1).

    ``order[j]`` is the global factor index of rank ``j`` (0 = smallest |gamma|),
    ``abs_gamma[j]`` its |gamma|; ``factors`` is the FactorView the indices refer to and
    ``scaling_map`` the map, to go from a factor to the conv filters it scales.
    """

    order: torch.Tensor
    abs_gamma: torch.Tensor
    factors: FactorView
    scaling_map: ScalingMap

    def __len__(self) -> int:
        return int(self.order.numel())

    def __repr__(self) -> str:
        n = len(self)
        if not n:
            return "FilterRanking(0 factors)"
        lo, med, hi = (float(self.abs_gamma[i]) for i in (0, n // 2, n - 1))
        return (f"FilterRanking({n} factors in {len(self.factors.norms)} norms, "
                f"|gamma| min {lo:.4g} / median {med:.4g} / max {hi:.4g})")

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


def rank_filters(model: ModelOrMap) -> FilterRanking:
    """Rank all scaling factors of ``model`` globally by |gamma| (SPEC §1, multistep III-B).

    Accepts a model (traced) or a ScalingMap. Ties are broken by factor index. The
    returned tensors are on the CPU.
    """
    sm = as_scaling_map(model)
    fv = factor_view(sm)
    a = checked_gammas(fv).abs().cpu()
    srt = torch.sort(a, stable=True)
    return FilterRanking(order=srt.indices, abs_gamma=srt.values, factors=fv, scaling_map=sm)


def useless_mask(model: ModelOrMap, target_r: float = 0.3) -> torch.Tensor:
    """Per-factor mask of the *useless* factors: the ``target_r`` fraction of smallest |gamma| (SPEC §1)."""
    check_target_r(target_r)
    return smallest_mask(checked_gammas(factor_view(model)).abs(), target_r)


def remaining_mean(model: ModelOrMap, target_r: float = 0.3) -> float:
    """Mean |gamma| of the factors that are not useless (Fig. 3 (c) of the multistep paper)."""
    g = checked_gammas(factor_view(model)).abs()
    keep = ~smallest_mask(g, target_r)
    return float(g[keep].mean()) if bool(keep.any()) else 0.0


def check_target_r(target_r: float, name: str = "target_r") -> float:
    """One-line ValueError unless ``0 < target_r < 1``."""
    try:
        t = float(target_r)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number in the open interval (0, 1), got {target_r!r}") from None
    if not 0.0 < t < 1.0:
        raise ValueError(f"{name}: must be in the open interval (0, 1), got {target_r!r}")
    return t


def gamma_values(obj: Union[ModelOrMap, torch.Tensor]) -> torch.Tensor:
    """|gamma| of every factor of a model / ScalingMap, or ``obj.abs()`` for a tensor (CPU float32)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().abs().flatten().cpu()
    return checked_gammas(factor_view(obj)).abs().cpu()


__all__ = [
    "FilterRanking",
    "rank_filters",
    "useless_mask",
    "remaining_mean",
    "as_scaling_map",
    "smallest_mask",
    "fraction_count",
    "check_finite",
]
