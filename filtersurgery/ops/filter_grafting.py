"""Filter grafting (FG; Meng et al., CVPR 2020), layer level, two networks (docs/method.md §5/§9 baseline).

Two networks of the same architecture train in parallel. At a grafting point every
layer ``l`` of each network takes a convex mix of itself and the other network's layer
``l`` (Meng et al., eq. 5-6 with the arctan weighting)::

    W_l(M1) <- alpha_l * W_l(M1) + (1 - alpha_l) * W_l(M2)
    alpha_l  = a / pi * atan(c * (H(W_l(M1)) - H(W_l(M2)))) + 0.5,   a = 0.4, c = 500

``H`` is the entropy ``-sum_k p_k log p_k`` (natural log) of the 10-bin histogram of the
layer's weights over their ``[min, max]`` range: the layer with more information keeps
more of itself. Both networks are updated from the weights they had *before* grafting
(the two-network case of Meng et al.'s cyclic scheme). Note that, with two networks,
``alpha_l(M2) = 1 - alpha_l(M1)``, so the grafted layers of the two networks are equal
right after grafting; the networks keep their own normalization layers and optimizer
state and drift apart again until the next grafting point.

Layers are matched by module type and order (``nn.Conv2d`` and ``nn.Linear`` by default,
1x1 convs included), not by parameter names. A layer's bias, where present, is mixed
with the same coefficient. Normalization layers are not grafted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Type

import torch
from torch import nn

from filtersurgery.tracing.scaling_map import ScalingMap, unwrap
from filtersurgery.ops.checks import check_finite

DEFAULT_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass
class GraftedLayer:
    """One grafted layer pair: names, entropies, and each network's own-weight coefficient."""

    name_a: str
    name_b: str
    h_a: float
    h_b: float
    coef_a: float
    coef_b: float


@dataclass
class GraftReport:
    """What :func:`graft` did, one :class:`GraftedLayer` per matched layer pair."""

    a: float
    c: float
    layers: List[GraftedLayer] = field(default_factory=list)

    @property
    def mean_coef_a(self) -> float:
        return sum(l.coef_a for l in self.layers) / max(1, len(self.layers))

    def __repr__(self) -> str:
        return f"GraftReport(a={self.a}, c={self.c}, {len(self.layers)} layers, mean coef_a {self.mean_coef_a:.4f})"


def layer_entropy(weight: torch.Tensor, bins: int = 10) -> float:
    """Entropy (nats) of the ``bins``-bin histogram of ``weight`` over its [min, max] (Meng et al. §3.2)."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins: must be an integer >= 1, got {bins!r}")
    w = weight.detach().float().flatten()
    if w.numel() == 0:
        return 0.0
    lo, hi = float(w.min()), float(w.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("weight: holds NaN/Inf values; entropy is undefined")
    if hi <= lo:
        return 0.0
    p = torch.histc(w, bins=int(bins), min=lo, max=hi) / w.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def graft_coefficient(h_self: float, h_other: float, a: float = 0.4, c: float = 500.0) -> float:
    """``a / pi * atan(c * (h_self - h_other)) + 0.5``: the share a layer keeps of itself (docs/method.md §9)."""
    return a / math.pi * math.atan(c * (h_self - h_other)) + 0.5


def paired_layers(model_a: nn.Module, model_b: nn.Module,
                  types: Sequence[Type[nn.Module]] = DEFAULT_TYPES) -> List[Tuple[str, nn.Module, str, nn.Module]]:
    """Layers of ``types`` in both models, matched by module type and order: ``(name_a, a, name_b, b)``."""
    types = tuple(types)
    la = [(n, m) for n, m in unwrap(model_a).named_modules() if isinstance(m, types) and getattr(m, "weight", None) is not None]
    lb = [(n, m) for n, m in unwrap(model_b).named_modules() if isinstance(m, types) and getattr(m, "weight", None) is not None]
    if len(la) != len(lb):
        raise ValueError(f"model_b: has {len(lb)} layers of the grafted types, model_a has {len(la)}; "
                         "grafting needs two networks of the same architecture")
    out = []
    for (na, ma), (nb, mb) in zip(la, lb):
        if type(ma) is not type(mb) or ma.weight.shape != mb.weight.shape:
            raise ValueError(f"model_b: layer {nb!r} ({type(mb).__name__} {tuple(mb.weight.shape)}) does not match "
                             f"model_a's {na!r} ({type(ma).__name__} {tuple(ma.weight.shape)})")
        if (getattr(ma, "bias", None) is None) != (getattr(mb, "bias", None) is None):
            raise ValueError(f"model_b: layer {nb!r} and model_a's {na!r} differ in having a bias")
        out.append((na, ma, nb, mb))
    return out


def _mix(own: torch.Tensor, other: torch.Tensor, coef: float) -> torch.Tensor:
    return (coef * own.float() + (1.0 - coef) * other.to(own.device).float()).to(own.dtype)


@torch.no_grad()
def graft(model_a, model_b, a: float = 0.4, c: float = 500.0, bins: int = 10,
          types: Sequence[Type[nn.Module]] = DEFAULT_TYPES) -> GraftReport:
    """Graft ``model_a`` and ``model_b`` into each other, layer by layer (module docstring).

    Args:
        model_a, model_b: two distinct networks of the same architecture (or ScalingMaps).
        a: amplitude of the arctan weighting, in [0, 1] (coefficients lie in 0.5 ± a/2).
        c: slope of the arctan weighting, > 0.
        bins: histogram bins of the entropy.
        types: module types that are grafted (default ``nn.Conv2d``, ``nn.Linear``).

    Both models are changed in place; dtype, device, memory format and modes are kept.
    """
    model_a = model_a.module if isinstance(model_a, ScalingMap) else model_a
    model_b = model_b.module if isinstance(model_b, ScalingMap) else model_b
    for nm, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise ValueError(f"{nm}: expected an nn.Module, got {type(m).__name__}")
    if unwrap(model_a) is unwrap(model_b):
        raise ValueError("model_b: must be a different network from model_a")
    if not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"a: must be in [0, 1], got {a!r}")
    if not float(c) > 0:
        raise ValueError(f"c: must be > 0, got {c!r}")
    check_finite(model_a, "model_a")  # NaN/Inf weights would be mixed into both networks
    check_finite(model_b, "model_b")
    report = GraftReport(float(a), float(c))
    for na, ma, nb, mb in paired_layers(model_a, model_b, types):
        ha, hb = layer_entropy(ma.weight, bins), layer_entropy(mb.weight, bins)
        ca, cb = graft_coefficient(ha, hb, a, c), graft_coefficient(hb, ha, a, c)
        for pname in ("weight", "bias"):
            pa, pb = getattr(ma, pname, None), getattr(mb, pname, None)
            if pa is None:
                continue
            new_a, new_b = _mix(pa, pb, ca), _mix(pb, pa, cb)  # both from the pre-grafting weights
            pa.copy_(new_a)
            pb.copy_(new_b)
        report.layers.append(GraftedLayer(na, nb, ha, hb, ca, cb))
    return report


__all__ = ["graft", "layer_entropy", "graft_coefficient", "paired_layers", "GraftReport", "GraftedLayer"]
