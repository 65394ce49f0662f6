"""Kernel reactivation — "Versatile kernel reactivation for deep CNNs", docs/method.md §5.

Filter importance is the mean |w| of a filter (``weight[c]``). A filter is *invalid* when
it is both in the lowest ``alpha`` fraction of all filters of the model (C1) and in the
lowest ``beta`` fraction of its own layer (C2). Inside an invalid filter the kernels
(``weight[c, i]``, k x k with k > 1) in the lowest ``gamma_t = gamma * lr_t / lr_0``
fraction by L1 are invalid (C3) and are rescaled by ``R = Best_L1 / kernel_L1`` (eq. 2),
which keeps the ratio of the kernel's weights and gives it the L1 of the filter's best
kernel. Only conv weights are used: any model with ``nn.Conv2d`` works.

Candidates are the convs whose kernels have more than one element: 1x1 convs (and
1x1 kernels in general) are never reactivated and take no part in the C1 ranking.
Counts use ``floor(frac * n + 1/2)`` as everywhere in this package; a kernel whose L1
is 0 cannot be rescaled (the ratio is undefined) and is left alone (counted as
``skipped_zero``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from filtersurgery.ops.checks import check_fraction, fraction_count, smallest_mask
from filtersurgery.tracing.scaling_map import ScalingMap, unwrap


@dataclass
class LayerReactivation:
    """Per-conv counts: filters, C1 filters, C1∩C2 (invalid) filters, kernels rescaled (C3),
    selected kernels skipped because their L1 is 0."""

    filters: int
    c1: int = 0
    invalid_filters: int = 0
    kernels: int = 0
    skipped_zero: int = 0


@dataclass
class ReactivationReport:
    """What :func:`reactivate_kernels` did; ``layers`` maps conv name -> :class:`LayerReactivation`."""

    alpha: float
    beta: float
    gamma_t: float
    layers: Dict[str, LayerReactivation] = field(default_factory=dict)

    @property
    def invalid_filters(self) -> int:
        return sum(r.invalid_filters for r in self.layers.values())

    @property
    def kernels(self) -> int:
        return sum(r.kernels for r in self.layers.values())

    def __bool__(self) -> bool:  # True when something was reactivated
        return self.kernels > 0

    def __repr__(self) -> str:
        return (f"ReactivationReport(alpha={self.alpha}, beta={self.beta}, gamma_t={self.gamma_t:.4g}, "
                f"{self.invalid_filters} invalid filters, {self.kernels} kernels in {len(self.layers)} convs)")

    def table(self) -> str:
        """Plain-text table of the per-layer counts."""
        rows = [f"{'conv':40s} {'filters':>7s} {'C1':>5s} {'C1&C2':>6s} {'kernels':>8s}"]
        for n, r in self.layers.items():
            if r.c1:
                rows.append(f"{n:40s} {r.filters:7d} {r.c1:5d} {r.invalid_filters:6d} {r.kernels:8d}")
        rows.append(f"{'total':40s} {'':7s} {'':5s} {self.invalid_filters:6d} {self.kernels:8d}")
        return "\n".join(rows)




def candidate_convs(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """Every ``nn.Conv2d`` whose kernels have more than one element, by module name."""
    return {
        n: m
        for n, m in unwrap(model).named_modules()
        if isinstance(m, nn.Conv2d) and m.weight is not None and m.weight[0, 0].numel() > 1
    }


def filter_importance(weight: torch.Tensor) -> torch.Tensor:
    """Mean |w| of every filter ``weight[c]`` (C1/C2 criterion), float32."""
    return weight.detach().float().abs().flatten(1).mean(1)


def invalid_filters(convs: Dict[str, nn.Conv2d], alpha: float, beta: float) -> Dict[str, Dict[str, torch.Tensor]]:
    """C1 (lowest ``alpha`` model-wide) and C1∩C2 (also lowest ``beta`` in the layer) masks per conv."""
    imps = {n: filter_importance(m.weight) for n, m in convs.items()}
    if not imps:
        return {}
    flat = torch.cat([v.cpu() for v in imps.values()])
    c1_flat = smallest_mask(flat, alpha)
    out, off = {}, 0
    for n, v in imps.items():
        c1 = c1_flat[off : off + v.numel()].to(v.device)
        off += v.numel()
        c2 = smallest_mask(v, beta)
        out[n] = {"c1": c1, "invalid": c1 & c2}
    return out


def kernel_multipliers(weight: torch.Tensor, invalid: torch.Tensor, gamma_t: float):
    """C3 and eq. (2): ``(mult, selected)``, both ``(out, in)``.

    In each invalid filter the ``fraction_count(gamma_t, in)`` kernels with the smallest
    L1 are ``selected``; ``mult`` (float32) is ``Best_L1 / K_L1`` on selected kernels with
    non-zero L1 and 1 elsewhere.
    """
    l1 = weight.detach().float().abs().flatten(2).sum(2)  # (out, in)
    mult = torch.ones_like(l1)
    selected = torch.zeros_like(l1, dtype=torch.bool)
    m = fraction_count(gamma_t, l1.shape[1])
    rows = torch.nonzero(invalid).flatten()
    if m == 0 or rows.numel() == 0:
        return mult, selected
    sub = l1[rows]
    idx = torch.sort(sub, dim=1, stable=True).indices[:, :m]
    best = sub.max(dim=1, keepdim=True).values
    k_l1 = sub.gather(1, idx)
    ratio = torch.where(k_l1 > 0, best / k_l1.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(k_l1))
    mult[rows] = torch.ones_like(sub).scatter_(1, idx, ratio)
    selected[rows] = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, idx, True)
    return mult, selected


@torch.no_grad()
def reactivate_kernels(
    model,
    alpha: float = 0.2,
    beta: float = 0.3,
    gamma: float = 0.1,
    lr_ratio: float = 1.0,
) -> ReactivationReport:
    """Kernel reactivation (docs/method.md §5): C1 ∩ C2 filters, C3 kernels, ``kernel *= Best_L1 / kernel_L1``.

    Args:
        model: any module with ``nn.Conv2d`` layers (or a ScalingMap: its module is used).
        alpha: C1 fraction (lowest mean-|w| filters model-wide), in [0, 1].
        beta: C2 fraction (lowest within the filter's layer), in [0, 1].
        gamma: C3 fraction of kernels at the initial learning rate, in [0, 1].
        lr_ratio: ``lr_t / lr_0``; ``gamma_t = gamma * lr_ratio`` (cosine-annealed with the lr).

    Returns a :class:`ReactivationReport` (per-layer counts; falsy when nothing qualified,
    in which case no weight changed). Dtype, device, memory format and train mode are kept.
    """
    alpha, beta, gamma = (check_fraction(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)))
    try:
        lr_ratio = float(lr_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"lr_ratio: must be a number in [0, 1], got {lr_ratio!r}") from None
    if not 0.0 <= lr_ratio <= 1.0 + 1e-6:
        raise ValueError(f"lr_ratio: must be lr_t / lr_0 in [0, 1], got {lr_ratio!r}")
    if isinstance(model, ScalingMap):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    from filtersurgery.ops.checks import check_finite

    check_finite(model)  # NaN/Inf weights: one-line error instead of spreading them
    gamma_t = gamma * min(lr_ratio, 1.0)
    convs = candidate_convs(model)
    report = ReactivationReport(alpha, beta, gamma_t)
    masks = invalid_filters(convs, alpha, beta)
    for n, conv in convs.items():
        w = conv.weight
        lay = LayerReactivation(filters=w.shape[0])
        report.layers[n] = lay
        c1, inv = masks[n]["c1"], masks[n]["invalid"]
        lay.c1, lay.invalid_filters = int(c1.sum()), int(inv.sum())
        if lay.invalid_filters == 0:
            continue
        mult, selected = kernel_multipliers(w, inv, gamma_t)
        zero = selected & (w.detach().abs().flatten(2).sum(2) == 0)
        lay.kernels, lay.skipped_zero = int((selected & ~zero).sum()), int(zero.sum())
        if lay.kernels:
            w.copy_((w.float() * mult[:, :, None, None]).to(w.dtype))  # fp32 product: no fp16 overflow
    return report


class KernelReactivation:
    """Per-epoch hook for a user's loop: reactivate every ``period`` epochs (docs/method.md §5, E = 10).

    ``on_epoch_end(epoch, lr, lr0)`` (0-based epoch) reactivates after epochs
    ``period - 1, 2 * period - 1, ...`` with ``gamma_t = gamma * lr / lr0`` and returns the
    report, else None. Reports are kept in ``history``.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.2, beta: float = 0.3, gamma: float = 0.1, period: int = 10):
        for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            check_fraction(n, v)
        if int(period) != period or period < 1:
            raise ValueError(f"period: must be an integer >= 1, got {period!r}")
        self.model, self.alpha, self.beta, self.gamma, self.period = model, alpha, beta, gamma, int(period)
        self.history: List[ReactivationReport] = []

    def on_epoch_end(self, epoch: int, lr: float, lr0: float) -> Optional[ReactivationReport]:
        if (epoch + 1) % self.period != 0:
            return None
        if not lr0 > 0:
            raise ValueError(f"lr0: must be > 0, got {lr0!r}")
        rep = reactivate_kernels(self.model, self.alpha, self.beta, self.gamma, lr_ratio=min(max(lr / lr0, 0.0), 1.0))
        self.history.append(rep)
        return rep


__all__ = ["reactivate_kernels", "KernelReactivation", "ReactivationReport", "LayerReactivation", "kernel_multipliers"]
