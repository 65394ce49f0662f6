"""The ScalingMap: which normalization weight (gamma) scales each conv filter.

docs/method.md §0: the *scaling factor* of filter ``c`` of a conv is the per-channel affine weight
of the norm layer that normalizes that filter's output channel. A filter may land on
several norms (DenseNet concatenation); a conv with no such norm is *unscaled* and
carries a reason.

A ``ScalingMap`` is produced by :func:`filtersurgery.trace`. It keeps a reference to the
traced module (the unwrapped one: ``DataParallel``/``DDP``/``torch.compile`` wrappers are
peeled off) so that operations can be called with the map alone.

A *frozen* scaling factor is one whose gamma is a buffer, not an ``nn.Parameter``
(torchvision's ``FrozenBatchNorm2d``, used by every torchvision detection backbone, and
timm's ``FrozenBatchNormAct2d``): it is mapped like any other, read-only and in-place
operations work on it, and operations that need its gradient call :func:`check_trainable`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class NormRef:
    """Filter ``c`` of the conv lands on channel ``offset + c`` of norm ``norm``.

    Usually for every filter. When an op cuts one conv's output into pieces that go
    different ways (DPN's dual path: a residual slice and a concatenated slice), each piece
    has its own ref, valid for filters ``first <= c < first + count`` only.
    """

    norm: str
    offset: int
    first: int = 0
    count: Optional[int] = None  # None: every filter of the conv

    def filter_range(self, out_channels: int) -> range:
        """The filters ``c`` this ref scales (channel ``offset + c`` of ``norm``)."""
        return range(self.first, out_channels if self.count is None else self.first + self.count)

    def covers(self, c: int, out_channels: int) -> bool:
        return c in self.filter_range(out_channels)


@dataclass
class ConvEntry:
    """One ``nn.Conv2d`` of the model and what scales its filters."""

    name: str
    out_channels: int
    groups: int
    scaled_by: List[NormRef] = field(default_factory=list)
    reason: Optional[str] = None  # None when mapped, else why it is unscaled

    @property
    def mapped(self) -> bool:
        """True when at least one norm weight scales this conv's filters."""
        return bool(self.scaled_by)


@dataclass
class FactorView:
    """Flat, cached view of every scaling factor of the model (docs/method.md §1 candidates).

    ``params[i]`` is the weight tensor of norm ``norms[i]`` (an ``nn.Parameter``, or a buffer
    for a frozen norm); ``channels[i]`` the (sorted, unique) channel indices of that norm
    that scale at least one conv filter. The global factor index ``k`` runs over
    ``(i, channels[i][j])`` in this order; ``offsets[i]`` is the global index of
    ``channels[i][0]``. ``frozen[i]`` is True when ``params[i]`` is not a trainable
    ``nn.Parameter`` (a frozen norm's buffer); an empty list means none is.
    """

    norms: List[str]
    params: List[nn.Parameter]
    channels: List[torch.Tensor]
    offsets: List[int]
    frozen: List[bool] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Number of scaling factors (``(norm, channel)`` pairs that scale at least one filter)."""
        return sum(int(c.numel()) for c in self.channels)

    @property
    def n_frozen(self) -> int:
        """Number of frozen scaling factors (their gamma is a buffer: no gradient, no optimizer)."""
        return sum(int(c.numel()) for c, f in zip(self.channels, self.frozen) if f)

    def frozen_mask(self) -> torch.Tensor:
        """Per-factor boolean mask (global factor order, CPU): True for a frozen factor."""
        flags = self.frozen or [False] * len(self.channels)
        parts = [torch.full((int(c.numel()),), bool(f), dtype=torch.bool) for c, f in zip(self.channels, flags)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    def __repr__(self) -> str:
        return f"FactorView({self.numel} factors in {len(self.norms)} norms)"

    def gammas(self) -> torch.Tensor:
        """All scaling factors as one detached float32 vector (global factor order)."""
        if not self.params:
            return torch.zeros(0)
        dev = self.params[0].device
        return torch.cat([p.detach()[c.to(p.device)].float().to(dev) for p, c in zip(self.params, self.channels)])

    def masks_from_flat(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Scatter a flat per-factor tensor back to one full-size tensor per norm weight.

        Channels of a norm that scale no filter get 0.
        """
        out = []
        for p, c, off in zip(self.params, self.channels, self.offsets):
            full = torch.zeros(p.shape, dtype=flat.dtype, device=p.device)
            full[c.to(p.device)] = flat[off : off + c.numel()].to(p.device)
            out.append(full)
        return out

    def locate(self, k: int) -> Tuple[str, int]:
        """Global factor index -> ``(norm_name, channel)``."""
        for name, c, off in zip(self.norms, self.channels, self.offsets):
            if off <= k < off + c.numel():
                return name, int(c[k - off])
        raise IndexError(f"factor index {k} out of range [0, {self.numel})")


class ScalingMap:
    """Map from every conv filter to the normalization weight(s) that scale it.

    Use ``sm[conv_name]`` for a :class:`ConvEntry`, ``sm.scaled_by(conv_name, c)`` for
    the list of ``(norm_name, channel)`` of filter ``c``, ``sm.unscaled`` for
    ``{conv_name: reason}`` and ``sm.factors`` for the cached :class:`FactorView`.
    """

    def __init__(self, module: nn.Module, convs: Dict[str, ConvEntry], norm_kinds: Dict[str, str]):
        self.module = module
        self.convs: Dict[str, ConvEntry] = dict(convs)
        # name -> "bn" | "frozen" | "gn" | "in" | "ln2d" | "norm2d" (channel dim 1) | "ln" | "norm" (channel dim last)
        self.norm_kinds: Dict[str, str] = dict(norm_kinds)
        self._factors: Optional[FactorView] = None
        self.input_size: Optional[Tuple[int, ...]] = None  # (C, H, W) the tracer used
        self.trace_seconds: Optional[float] = None

    # ----------------------------------------------------------------- queries
    def __getitem__(self, conv_name: str) -> ConvEntry:
        return self.convs[conv_name]

    def __contains__(self, conv_name: str) -> bool:
        return conv_name in self.convs

    def __iter__(self) -> Iterator[ConvEntry]:
        return iter(self.convs.values())

    def __len__(self) -> int:
        return len(self.convs)

    @property
    def mapped(self) -> Dict[str, ConvEntry]:
        """``{conv name: ConvEntry}`` of the convs with at least one scaling factor."""
        return {n: e for n, e in self.convs.items() if e.mapped}

    @property
    def unscaled(self) -> Dict[str, str]:
        """``{conv_name: reason}`` for every conv without a scaling factor."""
        return {n: e.reason or "unscaled" for n, e in self.convs.items() if not e.mapped}

    def scaled_by(self, conv_name: str, c: int) -> List[Tuple[str, int]]:
        """``[(norm_name, channel)]`` scaling filter ``c`` of conv ``conv_name``."""
        e = self.convs[conv_name]
        if not 0 <= c < e.out_channels:
            raise ValueError(f"c: filter index must be in [0, {e.out_channels}), got {c}")
        return [(r.norm, r.offset + c) for r in e.scaled_by if r.covers(c, e.out_channels)]

    @property
    def coverage(self) -> Optional[float]:
        """Mapped convs / convs that have an affine per-channel norm downstream (docs/tracer.md).

        A conv counts in the denominator unless it is unscaled for a *structural* reason
        (``is_structural(reason)``): no per-channel path from it reaches an affine norm.
        Unscaled convs with other reasons (unsupported ops, not executed) are tracer misses.
        ``None`` ("n/a", JSON ``null``) when nothing is mappable: no conv has such a norm
        downstream (a model without norms, such as SqueezeNet or an NF-Net, or without convs).
        """
        denom = sum(1 for e in self.convs.values() if e.mapped or not is_structural(e.reason))
        return None if denom == 0 else len(self.mapped) / denom

    # ----------------------------------------------------------- factor view
    @property
    def factors(self) -> FactorView:
        """Cached flat view of the scaling factors (no re-walk of the graph).

        Rebuilt when a norm module of the map was replaced since (``unfreeze_norms`` /
        ``freeze_norms`` swap modules under the same names), so the view always holds the
        model's current gamma tensors.
        """
        if self._factors is not None and self._stale(self._factors):
            self._factors = None
        if self._factors is None:
            chans: Dict[str, set] = {}
            for e in self.convs.values():
                for r in e.scaled_by:
                    chans.setdefault(r.norm, set()).update(r.offset + c for c in r.filter_range(e.out_channels))
            norms, params, channels, offsets, off = [], [], [], [], 0
            mods = dict(self.module.named_modules())
            for name in sorted(chans, key=list(mods).index):
                w = mods[name].weight
                idx = torch.tensor(sorted(c for c in chans[name] if c < w.numel()), dtype=torch.long)
                norms.append(name)
                params.append(w)
                channels.append(idx)
                offsets.append(off)
                off += idx.numel()
            frozen = [not is_trainable_weight(w) for w in params]
            self._factors = FactorView(norms, params, channels, offsets, frozen)
        return self._factors

    def _stale(self, fv: FactorView) -> bool:
        """True when some norm of ``fv`` no longer holds the cached weight tensor."""
        mods = dict(self.module.named_modules())
        return any(getattr(mods.get(n), "weight", None) is not p for n, p in zip(fv.norms, fv.params))

    @property
    def frozen_norms(self) -> List[str]:
        """Names of the norms of the map whose gamma is frozen (a buffer, e.g. ``FrozenBatchNorm2d``)."""
        fv = self.factors
        return [n for n, f in zip(fv.norms, fv.frozen) if f]

    def to_json(self) -> list:
        """The ``convs`` list of ``filtersurgery inspect --json`` (a frozen ref adds ``"frozen": true``)."""
        frozen = set(self.frozen_norms)
        return [
            {
                "name": e.name,
                "out_channels": e.out_channels,
                "groups": e.groups,
                "scaled_by": [_ref_json(r, r.norm in frozen) for r in e.scaled_by],
                "reason": e.reason,
            }
            for e in self.convs.values()
        ]

    def __repr__(self) -> str:
        return (
            f"ScalingMap(convs={len(self.convs)}, mapped={len(self.mapped)}, "
            f"unscaled={len(self.unscaled)}, factors={self.factors.numel}, coverage={format_coverage(self.coverage, '.3f')})"
        )


def _ref_json(r: NormRef, frozen: bool = False) -> dict:
    """``{"norm", "offset"}``, plus ``"filters": [first, stop)`` for a ref valid on a piece only
    and ``"frozen": true`` for a frozen norm."""
    d = {"norm": r.norm, "offset": r.offset}
    if r.count is not None:
        d["filters"] = [r.first, r.first + r.count]
    if frozen:
        d["frozen"] = True
    return d


def format_coverage(coverage: Optional[float], spec: str = ".1%") -> str:
    """``coverage`` formatted with ``spec``, or ``"n/a"`` when it is None (nothing mappable)."""
    return "n/a" if coverage is None else format(coverage, spec)


def is_trainable_weight(w) -> bool:
    """True when a norm's gamma ``w`` is an ``nn.Parameter`` (frozen norms keep it as a buffer)."""
    return isinstance(w, nn.Parameter)


def check_trainable(scaling_map: "ScalingMap", op: str = "this operation") -> None:
    """One-line ValueError when ``scaling_map`` has frozen scaling factors and ``op`` needs gradients.

    A frozen factor's gamma is a buffer (torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``): it gets no gradient and no optimizer updates it, so SST and
    training would silently leave it alone. The message names the count of frozen factors
    and the fix, ``filtersurgery.unfreeze_norms(model)`` (``freeze_norms`` freezes them again).
    Operations that only read or write gammas in place (ranking, ``rescale``, ``verify``)
    do not call it. (A model is traced first: ``check_trainable(filtersurgery.trace(model))``.)
    """
    if not isinstance(scaling_map, ScalingMap):
        raise ValueError(f"scaling_map: expected a ScalingMap (filtersurgery.trace(model)), got {type(scaling_map).__name__}")
    fv = scaling_map.factors
    n = fv.n_frozen
    if n == 0:
        return
    mods = dict(scaling_map.module.named_modules())
    names = [nm for nm, f in zip(fv.norms, fv.frozen) if f]
    classes = sorted({type(mods[nm]).__name__ for nm in names if nm in mods})
    raise ValueError(
        f"model: {n} of {fv.numel} scaling factors are frozen ({len(names)} {'/'.join(classes)} norms, "
        f"first: {names[0]}) and {op} needs their gradients; call filtersurgery.unfreeze_norms(model) "
        "first (filtersurgery.freeze_norms(model) freezes them again afterwards)"
    )


# Reasons (prefixes) for which a conv has no affine per-channel norm downstream at all;
# these convs are left out of ``ScalingMap.coverage``. The tracer emits exactly these
# prefixes (filtersurgery/tracing/tracer.py REASONS, docs/tracer.md).
STRUCTURAL_REASONS = (
    "SE gate",
    "attention gate",
    "classifier conv",
    "no norm in the model",
    "no norm downstream",
    "norm has no affine weight",
    "frozen norm",
)

# norm kinds whose per-channel weight applies to the last dim (all others: dim 1)
CHANNEL_LAST_KINDS = ("ln", "norm")


def is_structural(reason: Optional[str]) -> bool:
    """True when ``reason`` says the conv has no affine per-channel norm downstream."""
    return bool(reason) and reason.startswith(STRUCTURAL_REASONS)


def channel_dim(kind: str, ndim: int) -> int:
    """Channel dim of a norm's input for norm kind ``kind`` (1, or the last dim for LayerNorm)."""
    return ndim - 1 if kind in CHANNEL_LAST_KINDS else 1


def unwrap(model: nn.Module) -> nn.Module:
    """Peel ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model
