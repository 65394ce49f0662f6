"""The tracer: map every ``nn.Conv2d`` filter to the norm weight(s) that scale it (docs/method.md §0).

``trace(model)`` builds torch-pruning's ``DependencyGraph`` (one forward pass recorded by
autograd; its nodes are modules and autograd ops) and walks it forward from each conv:

* through per-channel ops only (elementwise/activation ops, add/mul with broadcasting,
  dropout, pooling/padding/upsampling, reshapes that keep the channel dim intact,
  permute/transpose (the channel dim is followed), depthwise convs, concat/split/slice
  with channel offsets),
* to the first norm on each path (a norm's inner ops such as BatchNormAct2d's act or
  LayerNorm2d's permutes belong to the norm), never past a norm,
* stopping at channel-mixing ops (conv, grouped conv, linear, flatten, ...).

Residual adds: the norms reached across the fewest residual adds win (0 for post-act
ResNets, 1 for pre-activation ResNets). Channel offsets come from autograd's own
shape metadata (``grad_fn._input_metadata``) and saved op arguments, so a filter ``c``
lands on ``offset + c`` of each norm it is scaled in. See docs/tracer.md.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from filtersurgery.tracing.capture import _build_graph, _Capture, _capture_hooks, _preserved, _to_meta
from filtersurgery.tracing.norm_kinds import norm_kind
from filtersurgery.tracing.probe import default_input_size, device_dtype, example_input, reduced_input_size
from filtersurgery.tracing.scaling_map import CHANNEL_LAST_KINDS, ConvEntry, NormRef, ScalingMap, unwrap
from filtersurgery.tracing.transfers import _op, _shape, _transfer

__all__ = ["trace", "REASONS"]

# reason strings (docs/tracer.md lists them; scaling_map.STRUCTURAL_REASONS matches the prefixes)
REASONS = {
    "se": "SE gate: no norm downstream",
    "attn": "attention gate: output is broadcast over channels, no per-channel norm",
    "classifier": "classifier conv: output reaches the model output without a norm",
    "no_norm_model": "no norm in the model",
    "no_affine": "norm has no affine weight",
    "frozen": "frozen norm ({cls}) has no per-channel weight",
    "mixing": "no norm downstream: the output reaches channel-mixing ops ({ops}) before any norm",
    "unsupported": "unsupported op on the path to a norm: {ops}",
    "dropped": "no norm downstream: its channels are sliced away before any norm",
    "not_run": "conv not executed in the traced forward pass",
}



def _channel_last(kind: str) -> bool:
    return kind in CHANNEL_LAST_KINDS


@dataclass
class _Norm:
    name: str
    module: nn.Module
    kind: str
    channels: int
    reason: Optional[str]  # None when it has an affine per-channel weight


def _norm_info(name: str, m: nn.Module) -> _Norm:
    kind = norm_kind(m)
    w = getattr(m, "weight", None)
    if kind == "frozen":  # gamma is a buffer: mapped, the map marks its factors frozen
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            return _Norm(name, m, kind, int(w.numel()), None)
        return _Norm(name, m, kind, 0, REASONS["frozen"].format(cls=type(m).__name__))
    if kind == "other":
        return _Norm(name, m, kind, 0, f"unsupported norm type {type(m).__name__}")
    if not isinstance(w, nn.Parameter):
        return _Norm(name, m, kind, 0, REASONS["no_affine"])
    return _Norm(name, m, kind, int(w.numel()), None)


# ----------------------------------------------------------------------- inputs
def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ValueError(f"example_inputs: expected a tensor (N, C, H, W) or a tuple of tensors, got {type(example_inputs).__name__}")


def _check_shape(model: nn.Module, inputs: tuple, expected: Tuple[int, int, int]) -> None:
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor):
        return
    c = expected[0]
    if x.dim() != 4 or x.shape[1] != c:
        raise ValueError(
            f"example_inputs: expected shape (N, {c}, H, W) e.g. (1, {c}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
        )


# ------------------------------------------------------------------------ walk
@dataclass
class _WalkResult:
    # (norm, offset, first, count): filter c in [first, first + count) lands on channel
    # offset + c; count None = every filter. Per filter, the norms at the fewest adds.
    hits: List[Tuple[_Norm, int, int, Optional[int]]] = field(default_factory=list)
    cuts: Set[str] = field(default_factory=set)  # ops that cut the filters into pieces
    stops: Set[str] = field(default_factory=set)
    mixers: Set[object] = field(default_factory=set)  # conv modules that stopped the walk
    gate: bool = False
    bad_dim: Set[str] = field(default_factory=set)


class _Graph:
    """Consumers of every autograd output (grad_fn, output_nr) of the DependencyGraph's nodes."""

    def __init__(self, dg, cap: _Capture, norms: Dict[nn.Module, _Norm]):
        self.consumers: Dict[Tuple[object, int], List[Tuple[object, int]]] = defaultdict(list)
        fns: Set[object] = set()
        for node in dg.module2node.values():
            if node.grad_fn is not None and hasattr(node.grad_fn, "next_functions"):
                fns.add(node.grad_fn)
        fns.update(cap.conv_fns)  # applications of a reused conv share one node
        for _, _, out_fn in cap.norm_calls:
            fns.add(out_fn)
        for fn in fns:
            for i, (pf, nr) in enumerate(fn.next_functions):
                if pf is not None:
                    self.consumers[(pf, nr)].append((fn, i))
        self.conv_fns = cap.conv_fns
        # every op inside a norm call (BatchNormAct2d's act, LayerNorm2d's permutes) -> the norm
        self.norm_of_fn: Dict[object, _Norm] = {}
        for m, in_fn, out_fn in cap.norm_calls:
            for f in _inner_fns(in_fn, out_fn):
                self.norm_of_fn[f] = norms[m]

    def downstream_has_norm(self, start_fns: Sequence[object]) -> bool:
        """Any norm reachable forward from ``start_fns`` through any ops."""
        seen, todo = set(start_fns), list(start_fns)
        while todo:
            fn = todo.pop()
            for nr in range(len(getattr(fn, "_input_metadata", ())) or 1):
                for c, _ in self.consumers.get((fn, nr), ()):
                    if c in self.norm_of_fn:
                        return True
                    if c not in seen:
                        seen.add(c)
                        todo.append(c)
        return False

    def walk(self, start_fns: Sequence[object], n_chan: int) -> _WalkResult:
        """Follow filters ``[0, n_chan)`` from the conv outputs ``start_fns`` (0-1 BFS on adds).

        A state carries the piece of filters ``[first, first + count)`` it follows: the whole
        conv, unless a split/slice cut the filters into pieces that go different ways (DPN).
        Per filter, the norms reached across the fewest residual adds win.
        """
        res = _WalkResult()
        best: Dict[tuple, int] = {}
        # (fn, output_nr, cdim, offset of filter `first`, adds, first, count)
        queue = deque((fn, 0, 1, 0, 0, 0, n_chan) for fn in start_fns)
        level: Dict[Tuple[int, int], int] = {}  # fewest adds at which a piece reached a norm
        found: List[Tuple[_Norm, int, int, int, int]] = []

        def beaten(adds: int, first: int, count: int) -> bool:  # a piece holding ours hit with fewer adds
            return any(a < adds and f <= first and first + count <= f + n for (f, n), a in level.items())

        while queue:
            fn, nr, cdim, off, adds, first, count = queue.popleft()
            if level and beaten(adds, first, count):
                continue
            sh = _shape(fn, nr)
            if sh is None or cdim >= len(sh):
                res.stops.add(f"unsupported:{_op(fn)}(shape)")
                continue
            for c, i in self.consumers.get((fn, nr), ()):
                norm = self.norm_of_fn.get(c)
                if norm is not None:
                    ok_dim = (cdim == len(sh) - 1) if _channel_last(norm.kind) else (cdim == 1)
                    if norm.reason is None and (not ok_dim or sh[cdim] != norm.channels or off + count > norm.channels):
                        res.bad_dim.add(f"unsupported:{norm.name}(filters on dim {cdim} of {list(sh)})")
                        continue
                    found.append((norm, off, adds, first, count))
                    level[(first, count)] = min(level.get((first, count), adds), adds)
                    continue
                st = _transfer(c, i, sh, cdim, off, count, self.conv_fns, self.norm_of_fn)
                res.gate |= st.gate
                if st.cut:
                    res.cuts.add(st.cut)
                if st.stop:
                    res.stops.add(st.stop)
                    if c in self.conv_fns:
                        res.mixers.add(self.conv_fns[c])
                nadds = adds + (1 if st.residual else 0)
                for out in st.outs:
                    onr, ocd, ooff = out[:3]
                    nfirst, ncount = (first + out[3], out[4]) if len(out) == 5 else (first, count)
                    key = (c, onr, ocd, ooff, nfirst, ncount)
                    if best.get(key, 1 << 30) <= nadds:
                        continue
                    best[key] = nadds
                    (queue.append if st.residual else queue.appendleft)((c, onr, ocd, ooff, nadds, nfirst, ncount))
        if found:
            fewest = [1 << 30] * n_chan
            for _, _, a, f, n in found:
                for k in range(f, f + n):
                    fewest[k] = min(fewest[k], a)
            pieces: Dict[Tuple[str, int], Tuple[_Norm, Set[int]]] = {}
            for norm, off, a, f, n in found:
                if a == min(fewest[f : f + n]):
                    pieces.setdefault((norm.name, off - f), (norm, set()))[1].update(range(f, f + n))
            for (_, off), (norm, filters) in pieces.items():
                for f, n in _runs(sorted(filters)):  # adjacent pieces on one offset: one ref
                    res.hits.append((norm, off, f, None if (f, n) == (0, n_chan) else n))
        return res


def _inner_fns(in_fn, out_fn, limit: int = 64) -> Set[object]:
    """Autograd ops between a norm's input and its output (the norm's own ops)."""
    inner, todo = {out_fn}, [out_fn]
    while todo:
        fn = todo.pop()
        for pf, _ in getattr(fn, "next_functions", ()):
            if pf is None or pf is in_fn or pf in inner or _op(pf) == "AccumulateGrad":
                continue
            inner.add(pf)
            todo.append(pf)
            if len(inner) > limit:  # the input was not found: keep only the output op
                return {out_fn}
    return inner


# ------------------------------------------------------------------------ trace
def _reason(res: _WalkResult, has_norms: bool, se: bool, classifier: bool) -> str:
    nonaffine = [n for n, *_ in res.hits if n.reason is not None]
    if nonaffine:
        return nonaffine[0].reason
    if not has_norms:
        return REASONS["no_norm_model"]
    if se:
        return REASONS["se"]
    if "attn" in res.stops:
        return REASONS["attn"]
    unsupported = sorted({s.split(":", 1)[1] for s in res.stops | res.bad_dim if s.startswith("unsupported:")})
    if classifier:
        return REASONS["classifier"]
    if unsupported:
        return REASONS["unsupported"].format(ops=", ".join(unsupported))
    mix = sorted({s.split(":", 1)[1] for s in res.stops if s.startswith("mix:")})
    if not mix:
        return REASONS["dropped"]
    return REASONS["mixing"].format(ops=", ".join(mix))


def _map_once(model: nn.Module, inputs: tuple, norms: Dict[nn.Module, _Norm], meta: bool, train_non_norm: bool):
    with _preserved(model, not meta, train_non_norm), torch.inference_mode(False), torch.enable_grad():
        with _capture_hooks(model, norms) as cap:
            dg = _build_graph(model, _to_meta(inputs) if meta else inputs, meta, train_non_norm)
        graph = _Graph(dg, cap, norms)
        del dg
    return graph, cap


_TRACE_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError, IndexError, AttributeError)


def _map_any(model, inputs_for, attempts, norms, train_non_norm):
    """Trace with the first of ``attempts`` ``[(meta, size), ...]`` that works."""
    errors = []
    for meta, size in attempts:
        try:
            return _map_once(model, inputs_for(size), norms, meta, train_non_norm), size
        except _TRACE_ERRORS as e:
            errors.append(e)
    raise errors[-1]


# Above this many parameters a real forward is dominated by touching the weights (VGG's
# 400 MB classifier convs take ~0.6 s even on a tiny input): trace on the meta device.
_REAL_TRACE_MAX_PARAMS = 40_000_000


def _attempts(net: nn.Module, expected, device, user_given: bool):
    """Trace strategies in order: (on meta device?, input size)."""
    if user_given:
        return [(True, None), (False, None)]
    full, small = expected, reduced_input_size(expected)
    if device.type == "meta":
        return [(True, full)]
    if sum(p.numel() for p in net.parameters()) <= _REAL_TRACE_MAX_PARAMS:
        # a real forward at a reduced size is 2-5x faster than the meta device's python
        # kernels (batch_norm is decomposed there); the graph, hence the map, is the same
        return [(False, small), (True, full), (False, full)]
    return [(True, full), (False, small), (False, full)]


def trace(model: nn.Module, example_inputs=None) -> ScalingMap:
    """Map every ``nn.Conv2d`` filter of ``model`` to the norm weight(s) that scale it (docs/method.md §0).

    ``model`` may be wrapped (DataParallel/DDP/``torch.compile``): the unwrapped module is
    traced and names are its ``named_modules()`` names. ``example_inputs`` is a tensor
    ``(N, C, H, W)`` or a tuple of forward arguments. By default the input is ``(1, C, H, W)``
    with ``(C, H, W) = default_input_size(model)``; models with up to 40M parameters are
    traced with a real forward at ``reduced_input_size`` (faster; the graph, hence the map,
    does not depend on the spatial size), larger ones on the meta device (no compute).
    The model's modes, requires_grad flags, parameters, buffers, dtype, device and memory
    format are left as they were. The size used is ``sm.input_size``.
    """
    t0 = time.perf_counter()
    net = unwrap(model)
    if not isinstance(net, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    named = list(net.named_modules())
    name_of: Dict[nn.Module, str] = {}
    for n, m in named:
        name_of.setdefault(m, n)
    norms = {m: _norm_info(name_of[m], m) for m in name_of if norm_kind(m) is not None}
    convs = [(name_of[m], m) for m in name_of if isinstance(m, nn.Conv2d)]
    graphs, size = _trace_graphs(net, example_inputs, norms, convs)
    results: Dict[nn.Module, Tuple[_WalkResult, _Graph, List[object]]] = {}
    for name, m in convs:
        for g, c in graphs:
            if m in c.conv_runs:
                results[m] = (g.walk(c.conv_runs[m], m.out_channels), g, c.conv_runs[m])
                break
    gates = _se_gates(results)
    order = {nm: k for k, (nm, _) in enumerate(named)}
    entries = {name: _entry(name, m, results.get(m), m in gates, bool(norms), order) for name, m in convs}
    kinds = {n.name: n.kind for n in norms.values() if n.reason is None}
    sm = ScalingMap(net, entries, kinds)
    sm.input_size = size
    sm.trace_seconds = time.perf_counter() - t0
    return sm


def _trace_graphs(net: nn.Module, example_inputs, norms: Dict[nn.Module, _Norm], convs) -> Tuple[list, Optional[tuple]]:
    """``([(graph, capture), ...], input size used)``: the eval-mode trace, plus a second trace
    with non-norm modules in train mode when some conv did not run (train-only auxiliary heads)."""
    expected = default_input_size(net)
    device, dtype = device_dtype(net)
    given = None
    if example_inputs is None:
        # drawn from the global RNG of the model's device, as always: a caller's later draws stay the same
        inputs_for = lambda sz: (example_input(net, sz, generator=None, device=device, dtype=dtype),)  # noqa: E731
    else:
        given = _as_inputs(example_inputs)
        _check_shape(net, given, expected)
        inputs_for = lambda sz: given  # noqa: E731
    attempts = _attempts(net, expected, device, example_inputs is not None)
    try:
        (graph, cap), size = _map_any(net, inputs_for, attempts, norms, False)
    except _TRACE_ERRORS as e:
        raise _shape_error(e, expected) from e
    if size is None:
        size = tuple(given[0].shape[1:]) if isinstance(given[0], torch.Tensor) else None
    graphs = [(graph, cap)]
    if any(m not in cap.conv_runs for _, m in convs):
        try:
            graphs.append(_map_any(net, inputs_for, attempts, norms, True)[0])
        except _TRACE_ERRORS:
            pass
    return graphs, size


def _se_gates(results) -> Set[nn.Module]:
    """SE gates: convs whose walk multiplies into a feature map, and the reduce convs that feed only gates."""
    gates = {m for m, (r, _, _) in results.items() if r.gate and not any(n.reason is None for n, *_ in r.hits)}
    for _ in range(2):
        gates |= {
            m for m, (r, _, _) in results.items()
            if not r.hits and r.mixers and r.mixers <= gates and not any(s.startswith("unsupported") for s in r.stops)
        }
    return gates


def _entry(name: str, m: nn.Conv2d, result, gate: bool, has_norms: bool, order: Dict[str, int]) -> ConvEntry:
    """The map's entry of conv ``m`` from its walk ``result`` ``(walk, graph, conv outputs)`` (None: not run)."""
    e = ConvEntry(name=name, out_channels=m.out_channels, groups=m.groups)
    if result is None:
        e.reason = REASONS["not_run"]
        return e
    r, g, fns = result
    affine = [h for h in r.hits if h[0].reason is None]
    if r.cuts and affine and _uncovered(affine, m.out_channels):
        # pieces of the filters reach no norm: report the conv rather than half-map it
        affine = []
        r.stops |= {f"unsupported:{cut}" for cut in r.cuts}
    if affine:
        e.scaled_by = sorted(
            (NormRef(n.name, off, f, cnt) for n, off, f, cnt in affine),
            key=lambda ref: (order[ref.norm], ref.first, ref.offset),
        )
    else:
        classifier = has_norms and not g.downstream_has_norm(fns)
        e.reason = _reason(r, has_norms, gate, classifier)
    return e


def _runs(sorted_ints: Sequence[int]) -> List[Tuple[int, int]]:
    """``[(first, count)]`` of the consecutive runs of a sorted integer list."""
    runs: List[Tuple[int, int]] = []
    for k in sorted_ints:
        if runs and runs[-1][0] + runs[-1][1] == k:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def _uncovered(hits, n_chan: int) -> bool:
    """Some filter of ``[0, n_chan)`` is in no hit's piece."""
    covered = [False] * n_chan
    for _, _, f, cnt in hits:
        for k in range(f, n_chan if cnt is None else f + cnt):
            covered[k] = True
    return not all(covered)


def _shape_error(e: Exception, expected: Tuple[int, int, int]) -> ValueError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    c, h, w = expected
    return ValueError(f"example_inputs: the model failed on the example input (expected shape (N, {c}, H, W), e.g. (1, {c}, {h}, {w})): {msg}")
