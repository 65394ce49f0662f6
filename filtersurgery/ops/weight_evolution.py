"""Weight Evolution (WE; Lin et al., ACM MM 2021) as the kernel-reactivation paper describes it.

docs/method.md §5/§9 baseline: "WE selects an invalid filter based on the L1 norm, and then
conducts reactivation by replacing only one weight in all kernels of the invalid filter
with the largest weight value in all kernels in the most valid filter."

Made concrete here (the paper gives no more detail), so that WE differs from kernel
reactivation only in the *unit* that is reactivated:

- invalid filters are selected exactly as for kernel reactivation: C1 ∩ C2 on the mean
  |w| of the filters (:func:`filtersurgery.ops.reactivation.invalid_filters`, ``alpha``,
  ``beta``), over the same candidate convs (kernels with more than one element);
- the *most valid filter* of a conv is its filter with the largest mean |w|;
- in every kernel ``weight[c, i]`` of an invalid filter ``c``, the single weight with the
  smallest |w| (the "inferior" weight; ties: first in row-major order) is replaced by the
  signed weight of largest |w| in kernel ``weight[best, i]`` of the most valid filter.

The most valid filter itself is never changed (it can only be invalid when ``alpha`` and
``beta`` are both close to 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn

from filtersurgery.ops.checks import check_fraction
from filtersurgery.ops.reactivation import candidate_convs, filter_importance, invalid_filters
from filtersurgery.ops.checks import check_finite
from filtersurgery.tracing.scaling_map import ScalingMap


@dataclass
class LayerEvolution:
    """Per-conv counts: filters, invalid (C1∩C2) filters evolved, weights replaced, donor filter."""

    filters: int
    invalid_filters: int = 0
    weights: int = 0
    best_filter: int = -1


@dataclass
class EvolutionReport:
    """What :func:`evolve_weights` did; ``layers`` maps conv name -> :class:`LayerEvolution`."""

    alpha: float
    beta: float
    layers: Dict[str, LayerEvolution] = field(default_factory=dict)

    @property
    def invalid_filters(self) -> int:
        return sum(r.invalid_filters for r in self.layers.values())

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers.values())

    def __bool__(self) -> bool:  # True when some weight was replaced
        return self.weights > 0

    def __repr__(self) -> str:
        return (f"EvolutionReport(alpha={self.alpha}, beta={self.beta}, {self.invalid_filters} invalid filters, "
                f"{self.weights} weights in {len(self.layers)} convs)")


def donor_weights(weight: torch.Tensor, best: int) -> torch.Tensor:
    """For every input channel ``i``: the signed weight of largest |w| in kernel ``weight[best, i]``."""
    k = weight.detach()[best].reshape(weight.shape[1], -1)
    idx = k.abs().argmax(dim=1, keepdim=True)
    return k.gather(1, idx).squeeze(1)


@torch.no_grad()
def evolve_weights(model, alpha: float = 0.2, beta: float = 0.3) -> EvolutionReport:
    """Weight Evolution: one weight per kernel of each invalid filter replaced (module docstring).

    Args:
        model: any module with ``nn.Conv2d`` layers (or a ScalingMap: its module is used).
        alpha: C1 fraction (lowest mean-|w| filters model-wide), in [0, 1].
        beta: C2 fraction (lowest within the filter's layer), in [0, 1].

    Returns an :class:`EvolutionReport` (falsy when no weight was replaced). 1x1 convs are
    never touched; dtype, device, memory format and train mode are kept.
    """
    alpha, beta = (check_fraction(n, v) for n, v in (("alpha", alpha), ("beta", beta)))
    if isinstance(model, ScalingMap):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_finite(model)  # NaN/Inf weights: one-line error instead of copying them around
    convs = candidate_convs(model)
    masks = invalid_filters(convs, alpha, beta)
    report = EvolutionReport(alpha, beta)
    for name, conv in convs.items():
        w = conv.weight
        lay = LayerEvolution(filters=w.shape[0])
        report.layers[name] = lay
        inv = masks[name]["invalid"].clone()
        best = int(filter_importance(w).argmax())
        lay.best_filter = best
        inv[best] = False
        rows = torch.nonzero(inv).flatten()
        lay.invalid_filters = int(rows.numel())
        if lay.invalid_filters == 0:
            continue
        flat = w.detach().reshape(w.shape[0], w.shape[1], -1).clone()  # (out, in, k*k)
        sub = flat[rows]
        worst = sub.abs().argmin(dim=2, keepdim=True)  # the inferior weight of each kernel
        donor = donor_weights(w, best).to(sub.dtype)
        sub.scatter_(2, worst, donor[None, :, None].expand(rows.numel(), -1, 1))
        flat[rows] = sub
        lay.weights = int(rows.numel() * w.shape[1])
        w.copy_(flat.view(w.shape))  # copy_ keeps w's memory format
    return report


__all__ = ["evolve_weights", "donor_weights", "EvolutionReport", "LayerEvolution"]
