"""Numerical check of a scaling map: does perturbing a mapped filter move exactly its factor?

``verify(sm)`` checks a ScalingMap numerically: in eval mode, a batch whose sample ``b``
perturbs one mapped filter (noise added to output channel ``c`` of the conv, which is
what changing ``weight[c]`` does) is compared with the unperturbed sample 0 at the input
of every norm the filter is mapped to. Within the window of norm channels the conv lands
on, ``[offset, offset + out_channels)``, exactly channel ``offset + c`` must change.
(Outside the window other convs' outputs may change through channel-mixing paths, e.g.
later DenseNet layers; that says nothing about this conv's mapping.) A norm module called
several times in one forward pass is checked call by call: one call must show exactly the
mapped channel changing.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from filtersurgery.tracing.probe import default_input_size, eval_mode, example_input, reduced_input_size
from filtersurgery.tracing.scaling_map import ScalingMap, channel_dim

__all__ = ["verify", "VerifyResult"]


# ----------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    """Outcome of :func:`verify`."""

    filters: int = 0  # (conv, filter) probes checked against at least one norm
    checks: int = 0  # (probe, norm) pairs checked
    mismappings: List[str] = field(default_factory=list)
    unverified: List[str] = field(default_factory=list)  # mapped convs whose norms never ran in eval

    @property
    def ok(self) -> bool:
        """True when no probed filter was mis-mapped."""
        return not self.mismappings

    def __repr__(self) -> str:
        first = f", first: {self.mismappings[0][:80]}" if self.mismappings else ""
        return (f"VerifyResult({'ok' if self.ok else 'FAILED'}: {self.filters} filters, {self.checks} checks, "
                f"{len(self.mismappings)} mis-mappings, {len(self.unverified)} unverified{first})")


def _probe_filters(n: int, k: int) -> List[int]:
    """``k`` filters spread over ``[0, n)``: first, last, then evenly in between."""
    if k >= n:
        return list(range(n))
    picks = {0, n - 1} if k >= 2 else {0}
    for j in range(1, k - 1):
        picks.add(round(j * (n - 1) / (k - 1)))
    return sorted(picks)


def verify(
    sm: ScalingMap,
    input_size: Optional[Sequence[int]] = None,
    filters_per_conv: int = 3,
    batch: int = 32,
    seed: int = 0,
) -> VerifyResult:
    """Check numerically that each probed filter changes exactly its mapped norm channel.

    ``input_size`` ``(C, H, W)`` defaults to a reduced version of the traced size. Runs in
    eval mode (modes restored afterwards); parameters are not modified. A norm module
    called several times in one forward pass (shared by two branches) is checked call by
    call: the probe passes when one call shows exactly the mapped channel changing. The
    input and the noise come from a private generator seeded with ``seed``.
    """
    if filters_per_conv < 1:
        raise ValueError(f"filters_per_conv: expected >= 1, got {filters_per_conv}")
    if input_size is None:  # a reduced size is faster; models that need more (Inception) get the full one
        full = tuple(sm.input_size or default_input_size(sm.module))
        try:
            return verify(sm, reduced_input_size(full), filters_per_conv, batch, seed)
        except RuntimeError:
            input_size = full
    model = sm.module
    gen = torch.Generator().manual_seed(seed)
    x0 = example_input(model, tuple(input_size), generator=gen)
    probes = [(e.name, c) for e in sm.mapped.values() for c in _probe_filters(e.out_channels, filters_per_conv)]
    res = VerifyResult()
    never_ran: Dict[str, int] = Counter()
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(probes), batch):
            chunk = probes[start : start + batch]
            diffs = _perturbed_diffs(sm, x0, chunk, gen)
            _check_chunk(sm, chunk, diffs, res, never_ran)
    res.unverified = sorted(never_ran)
    return res


def _perturbed_diffs(sm: ScalingMap, x0: torch.Tensor, chunk: List[Tuple[str, int]],
                     gen: torch.Generator) -> Dict[str, List[torch.Tensor]]:
    """One forward pass of ``x0`` repeated, sample ``b`` perturbing filter ``chunk[b - 1]``:
    ``norm -> [(B, C) max |difference from sample 0| at the norm's input, per call of the norm]``."""
    model, mods = sm.module, dict(sm.module.named_modules())
    by_conv: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
    for b, (name, c) in enumerate(chunk, start=1):
        by_conv[name].append((b, c))
    norms = {r.norm for name, _ in chunk for r in sm[name].scaled_by}
    diffs: Dict[str, List[torch.Tensor]] = {}  # norm -> one (B, C) diff per call of the norm
    handles = []

    def conv_hook(m, inp, out, pairs):
        out = out.clone()
        for b, c in pairs:
            ch = out[b, c]
            noise = torch.randn(ch.shape, generator=gen).to(ch)
            # large on purpose: behind a 1e-6 layer scale (ConvNeXt) a small change is
            # lost in float32 rounding against the residual stream
            out[b, c] = ch + noise * (ch.abs().mean() + 1.0) * 1e3
        return out

    def norm_pre(m, inp, name):
        x = inp[0].detach().float()
        cd = channel_dim(sm.norm_kinds.get(name, "bn"), x.dim())
        d = (x - x[:1]).abs().movedim(cd, 1).flatten(2).amax(2)  # (B, C)
        diffs.setdefault(name, []).append(d)  # a shared norm: each call on its own

    try:
        for name, pairs in by_conv.items():
            handles.append(mods[name].register_forward_hook(lambda m, i, o, p=pairs: conv_hook(m, i, o, p)))
        for name in norms:
            handles.append(mods[name].register_forward_pre_hook(lambda m, i, n=name: norm_pre(m, i, n)))
        model(x0.expand(len(chunk) + 1, *x0.shape[1:]).contiguous())
    finally:
        for h in handles:
            h.remove()
    return diffs


def _check_chunk(sm: ScalingMap, chunk: List[Tuple[str, int]], diffs: Dict[str, List[torch.Tensor]],
                 res: VerifyResult, never_ran: Dict[str, int]) -> None:
    """Judge every probe of ``chunk`` (sample ``b`` = probe ``b - 1``) on ``diffs``, into ``res``."""
    for b, (name, c) in enumerate(chunk, start=1):
        e = sm[name]
        checked = False
        for r in e.scaled_by:
            if not r.covers(c, e.out_channels):
                continue
            if r.norm not in diffs:
                never_ran[name] += 1
                continue
            res.checks += 1
            checked = True
            what = _judge([_window_check(d[b], r, e.out_channels, c) for d in diffs[r.norm]])
            if what:
                res.mismappings.append(f"{name}[{c}] -> {r.norm}[{r.offset + c}]: {what}")
        res.filters += int(checked)


def _window_check(d: torch.Tensor, r, out_channels: int, c: int) -> Tuple[float, List[int]]:
    """``(change of channel offset + c, other channels of the ref's window that changed)`` for one norm call.

    ``d`` is the per-channel max |difference| from the unperturbed sample at the norm's input.
    """
    fr = r.filter_range(out_channels)
    lo = r.offset + fr.start  # the window of norm channels this ref scales
    window = d[lo : r.offset + fr.stop]
    k = r.offset + c - lo
    target = float(window[k]) if k < window.numel() else 0.0
    others = [lo + j for j in torch.nonzero(window > 1e-4 * target).flatten().tolist() if j != k]
    return target, others


def _judge(calls: List[Tuple[float, List[int]]]) -> Optional[str]:
    """None when some call of the norm shows exactly the mapped channel changing, else what went wrong.

    A norm module called several times in one forward pass (one BN shared by two branches,
    or reused in sequence) is checked call by call: the filter is scaled in the call its
    output reaches directly; in a later call the perturbation may already have been mixed
    across channels by a conv in between, which says nothing about the mapping.
    """
    if any(t > 0.0 and not o for t, o in calls):
        return None
    moved = [(len(o), o) for t, o in calls if t > 0.0]
    if not moved:
        return "did not change" + (f" (in any of the norm's {len(calls)} calls)" if len(calls) > 1 else "")
    others = min(moved)[1]
    return f"channels {others[:6]} changed too" + (f" (it changes alone in none of the norm's {len(calls)} calls)" if len(calls) > 1 else "")
