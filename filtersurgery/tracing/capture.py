"""How the tracer records a model's graph: torch-pruning's ``DependencyGraph`` of one forward pass, our own
hooks on convs and norms (``_Capture``), on meta-device copies of the model's tensors or, where that fails,
on the real ones with every mode and value restored afterwards."""
from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from filtersurgery.tracing.norm_kinds import norm_kind
from filtersurgery.tracing.probe import preserve_mode

__all__: List[str] = []  # the tracer's internals (tracing/tracer.py)


# ------------------------------------------------------------------ model state
@contextmanager
def _preserved(model: nn.Module, real: bool, train_non_norm: bool) -> Iterator[None]:
    """Trace-safe model state; modes (and, for a real-tensor trace, requires_grad) restored after.

    torch-pruning traces with autograd and calls ``model.eval()``. On the meta device the
    model's own tensors are never used (``functional_call`` with meta copies), so only the
    modes need restoring. A real-tensor trace temporarily sets ``requires_grad`` on every
    parameter and, when non-norm modules run in train mode, restores buffers bit-exactly.
    Norms always run in eval mode, so BN running statistics never move.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()] if real else []
    bufs = [(b, b.detach().clone()) for b in model.buffers()] if real and train_non_norm else []
    with preserve_mode(model):
        try:
            for p, _ in flags:
                if p.is_floating_point() or p.is_complex():
                    p.requires_grad_(True)
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            with torch.no_grad():
                for b, v in bufs:
                    if not torch.equal(b, v):
                        b.copy_(v)


def _set_modes(model: nn.Module, train_non_norm: bool) -> None:
    for m in model.modules():
        m.training = bool(train_non_norm and norm_kind(m) is None and not isinstance(m, nn.modules.dropout._DropoutNd))


def _meta_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Meta-device stand-ins for every parameter (requiring grad) and buffer of ``model``."""
    state = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        t = torch.empty_like(p, device="meta")
        state[n] = t.requires_grad_(True) if t.is_floating_point() else t
    for n, b in model.named_buffers(remove_duplicate=False):
        state[n] = torch.empty_like(b, device="meta")
    return state


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x) if not hasattr(x, "_fields") else type(x)(*(_to_meta(v) for v in x))
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------- graph capture
@dataclass
class _Capture:
    """Module-level facts recorded by our own hooks during torch-pruning's forward."""

    conv_fns: Dict[object, nn.Module] = field(default_factory=dict)  # conv output grad_fn -> conv
    conv_runs: Dict[nn.Module, List[object]] = field(default_factory=lambda: defaultdict(list))
    norm_calls: List[Tuple[nn.Module, object, object]] = field(default_factory=list)  # (norm, in_fn, out_fn)


@contextmanager
def _capture_hooks(model: nn.Module, norms: Dict[nn.Module, object]) -> Iterator[_Capture]:
    cap = _Capture()
    pending: Dict[int, List[object]] = defaultdict(list)
    handles = []

    def conv_hook(m, inp, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            cap.conv_fns[out.grad_fn] = m
            cap.conv_runs[m].append(out.grad_fn)

    def norm_pre(m, inp):
        x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        pending[id(m)].append(x.grad_fn if x is not None else None)

    def norm_hook(m, inp, out):
        in_fn = pending[id(m)].pop() if pending[id(m)] else None
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            cap.norm_calls.append((m, in_fn, out.grad_fn))

    try:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif m in norms:
                handles.append(m.register_forward_pre_hook(norm_pre))
                handles.append(m.register_forward_hook(norm_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()


def _flat_tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _build_graph(model: nn.Module, inputs: tuple, meta: bool, train_non_norm: bool):
    """torch-pruning's DependencyGraph for ``model`` on ``inputs``.

    With ``meta`` the forward runs on meta-device copies of the parameters, buffers and
    inputs (``torch.func.functional_call``): autograd records the same graph with shapes,
    at no compute cost and without touching the model's tensors. torch-pruning calls
    ``model.eval()`` before its forward; our ``forward_fn`` then sets the modes we want.
    """
    import torch_pruning as tp

    def forward(m, x):
        _set_modes(m, train_non_norm)
        if meta:
            return torch.func.functional_call(m, _meta_state(m), tuple(x), strict=False, tie_weights=True)
        return m(*x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph()
        try:
            dg.build_dependency(model, example_inputs=inputs, forward_fn=forward, output_transform=_flat_tensors, verbose=False)
        except (ZeroDivisionError, IndexError, KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            # torch-pruning's pruning-index bookkeeping after the trace can fail on ops it does
            # not model (e.g. ShuffleNet's channel-shuffle reshape); the node graph is complete
            # by then (``module2node`` is set when tracing returns) and is all we use.
            if not hasattr(dg, "module2node"):
                raise
    return dg
