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

import math
import re
import time
import warnings
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from filtersurgery.tracing.probe import default_input_size, device_dtype, example_input, preserve_mode, reduced_input_size
from filtersurgery.tracing.scaling_map import CHANNEL_LAST_KINDS, ConvEntry, NormRef, ScalingMap, unwrap

__all__ = ["trace", "default_input_size", "reduced_input_size", "norm_kind", "REASONS"]

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

_NAME_RE = re.compile(r"Backward\d*$")
# class names of norm layers we cannot map (EvoNorm2dB0, FilterResponseNormAct2d, ...), not
# blocks that merely contain the word (NormFreeBlock)
_NORM_CLASS_RE = re.compile(r"Norm(Act)?(\d+d)?([A-Z]\d*)?$")


# ----------------------------------------------------------------------------- norms
def norm_kind(m: nn.Module) -> Optional[str]:
    """Kind of a normalization module, or ``None`` when ``m`` is not a norm.

    ``"bn"`` (BatchNorm1d/2d/3d, SyncBatchNorm, timm BatchNormAct2d), ``"gn"`` (GroupNorm),
    ``"in"`` (InstanceNorm), ``"ln2d"`` (timm/torchvision LayerNorm2d, a LayerNorm with
    ``data_format="channels_first"`` such as Hugging Face's ConvNextLayerNorm: channel dim 1),
    ``"ln"`` (nn.LayerNorm over the last dim), ``"norm2d"``/``"norm"`` (other timm norms
    with a per-channel weight: RmsNorm2d/SimpleNorm2d, RmsNorm/SimpleNorm),
    ``"frozen"`` (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d: gamma is a
    buffer; mapped like a BatchNorm, its factors are *frozen*), ``"other"`` (a norm we cannot map).
    """
    cls = type(m).__name__
    if cls.startswith("FrozenBatchNorm"):
        return "frozen"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(m, nn.GroupNorm):
        return "gn"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "in"
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            return "other"
        channels_first = "2d" in cls.lower() or getattr(m, "data_format", None) == "channels_first"
        return "ln2d" if channels_first else "ln"  # data_format: Hugging Face's ConvNextLayerNorm
    if cls.startswith(("RmsNorm", "SimpleNorm")):
        return "norm2d" if "2d" in cls.lower() else "norm"
    if _NORM_CLASS_RE.search(cls) and any(isinstance(p, nn.Parameter) for p in m.parameters(recurse=False)):
        return "other"  # e.g. EvoNorm: per-channel weight, but not a plain normalize-then-scale
    return None


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
def _capture_hooks(model: nn.Module, norms: Dict[nn.Module, _Norm]) -> Iterator[_Capture]:
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


# ------------------------------------------------------------------ op semantics
def _op(fn) -> str:
    return _NAME_RE.sub("", fn.name()) if hasattr(fn, "name") else type(fn).__name__


def _shape(fn, nr: int) -> Optional[Tuple[int, ...]]:
    try:
        return tuple(fn._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _dims(d, ndim: int) -> Tuple[int, ...]:
    if d is None:
        return tuple(range(ndim))
    if isinstance(d, int):
        d = (d,)
    return tuple(sorted({int(x) % ndim for x in d})) if ndim else ()


_POINTWISE = {
    "Relu", "Hardtanh", "LeakyRelu", "Elu", "Celu", "Gelu", "Silu", "Mish", "Sigmoid", "Tanh", "Hardswish",
    "Hardsigmoid", "Softplus", "Threshold", "Clamp", "ClampMin", "ClampMax", "Neg", "Abs", "Exp", "Exp2",
    "Expm1", "Log", "Log1p", "Log2", "Sqrt", "Rsqrt", "Reciprocal", "Sign", "Sgn", "Clone", "ToCopy", "Alias",
    "NativeDropout", "Erf", "Erfc", "LogSigmoid", "Softshrink", "Hardshrink", "Sin", "Cos", "Tan", "Atan",
    "Sinh", "Cosh", "Asinh", "Logit", "NanToNum", "Frac", "Pow", "Add", "Sub", "Rsub", "Mul", "Div", "Maximum",
    "Minimum", "Fmax", "Fmin", "Where", "Addcmul", "Addcdiv", "Atan2", "Hypot", "Lerp", "Copysign", "Xlogy",
    "Remainder", "Fmod", "PreluKernel", "Prelu", "MaskedFill", "Square", "Rrelu", "RreluWithNoise", "Glu_",
}
_SPATIAL = {
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "UpsampleNearest1D",
    "UpsampleNearest2D", "UpsampleNearest3D", "UpsampleNearestExact1D", "UpsampleNearestExact2D",
    "UpsampleNearestExact3D", "UpsampleBilinear2D", "UpsampleBicubic2D", "UpsampleLinear1D",
    "UpsampleTrilinear3D", "ReflectionPad1D", "ReflectionPad2D", "ReflectionPad3D", "ReplicationPad1D",
    "ReplicationPad2D", "ReplicationPad3D", "FractionalMaxPool2D", "MaxPool2D", "AdaptiveMaxPool1D",
    "AvgPool1D", "AdaptiveAvgPool1D",
}
_REDUCE = {"Mean", "Sum", "Amax", "Amin", "Max", "Min", "Std", "Var", "LinalgVectorNorm", "Norm", "Logsumexp", "Prod", "StdMean", "VarMean"}
_RESHAPE = {"View", "Reshape", "UnsafeView", "ReshapeAlias", "Squeeze", "Unsqueeze", "Flatten", "Unflatten", "ViewAs"}
_MIX = {
    "Convolution", "MkldnnConvolution", "SlowConv2D", "ConvDepthwise2D", "Addmm", "Mm", "Bmm", "Baddbmm", "Matmul",
    "Linear", "Embedding", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "NativeChannelShuffle", "Im2Col",
    "Col2Im", "NativeLayerNorm", "NativeGroupNorm", "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm",
    "ScaledDotProductAttention", "ScaledDotProductFlashAttentionForCpu", "ScaledDotProductEfficientAttention",
    "ScaledDotProductFlashAttention", "Mv", "Dot", "Cross",
}


@dataclass
class _Step:
    """Result of pushing a channel range through one op."""

    # (output_nr, cdim, offset) or, for a piece of our filters, (..., first, count)
    outs: List[Tuple[int, ...]] = field(default_factory=list)
    stop: Optional[str] = None  # "mix:<op>" | "unsupported:<op>" | "attn" | None
    gate: bool = False  # our tensor was broadcast over spatial dims into a multiply (SE gate)
    residual: bool = False  # a residual add (>= 2 activation operands)
    cut: Optional[str] = None  # the op split our filters into pieces (followed separately)


def _n_activation_inputs(fn) -> int:
    return sum(1 for f, _ in fn.next_functions if f is not None and _op(f) != "AccumulateGrad")


def _pointwise(fn, op, sh, cdim, off, n_chan) -> _Step:
    out = _shape(fn, 0)
    if out is None or len(out) < len(sh):
        return _Step(stop=f"unsupported:{op}")
    k = len(out) - len(sh)
    nd = cdim + k
    if out[nd] != sh[cdim]:
        return _Step(stop="attn" if op in ("Mul", "Div") and sh[cdim] == 1 else f"unsupported:{op}")
    gate = op in ("Mul", "Div") and any(sh[d] == 1 and out[d + k] > 1 for d in range(len(sh)) if d != cdim and d > 0)
    residual = op in ("Add", "Sub", "Rsub") and _n_activation_inputs(fn) >= 2
    return _Step(outs=[(0, nd, off)], gate=gate, residual=residual)


def _reshape(fn, op, sh, cdim, off) -> _Step:
    out = _shape(fn, 0)
    if out is None:
        return _Step(stop=f"unsupported:{op}")
    before = math.prod(sh[:cdim])
    for k, s in enumerate(out):
        if s == sh[cdim] and math.prod(out[:k]) == before:
            return _Step(outs=[(0, k, off)])
    return _Step(stop=f"mix:{'flatten' if len(out) < len(sh) else op}")


def _transfer(fn, i: int, sh: Tuple[int, ...], cdim: int, off: int, n_chan: int, conv_fns, norm_of_fn) -> _Step:
    """Push channels ``[off, off + n_chan)`` on dim ``cdim`` of input ``i`` through op ``fn``."""
    if fn in conv_fns:  # a conv module application
        return _through_conv(conv_fns[fn], i, cdim, off)
    op = _op(fn)
    rule = _TRANSFERS.get(op)
    if rule is None:
        return _Step(stop=f"unsupported:{op}")
    return rule(fn, op, i, sh, cdim, off, n_chan)


def _through_conv(m: nn.Module, i: int, cdim: int, off: int) -> _Step:
    """A conv: a depthwise conv maps channel c to channel c; any other conv mixes channels."""
    if i == 0 and cdim == 1 and m.groups == m.in_channels == m.out_channels:
        return _Step(outs=[(0, 1, off)])  # depthwise conv: channel c -> channel c
    return _Step(stop=f"mix:{type(m).__name__}" + ("(grouped)" if m.groups > 1 else ""))


# One rule per op family below: ``rule(fn, op, i, sh, cdim, off, n_chan) -> _Step`` (see _transfer).
def _t_pointwise(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    return _pointwise(fn, op, sh, cdim, off, n_chan)


def _t_expand(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    out = _shape(fn, 0)
    k = len(out) - len(sh) if out else -1
    if out is None or k < 0 or out[cdim + k] != sh[cdim]:
        return _Step(stop=f"unsupported:{op}")
    return _Step(outs=[(0, cdim + k, off)])


def _t_spatial(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    out = _shape(fn, 0)
    if cdim == 1 and out is not None and len(out) == len(sh) and out[1] == sh[1]:
        return _Step(outs=[(0, 1, off)])
    return _Step(stop=f"unsupported:{op}")


def _t_pad(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    pad = list(getattr(fn, "_saved_pad", []))
    out = _shape(fn, 0)
    j = len(sh) - 1 - cdim  # pads are given from the last dim backwards
    left = pad[2 * j] if 2 * j + 1 < len(pad) else 0
    if out is None:
        return _Step(stop=f"unsupported:{op}")
    return _Step(outs=[(0, cdim, off + int(left))])


def _t_reduce(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = getattr(fn, "_saved_dim", None)
    keep = bool(getattr(fn, "_saved_keepdim", False))
    if d is None or (isinstance(d, (tuple, list)) and len(d) == 0):
        return _Step(stop=f"mix:{op}")
    dims = _dims(d, len(sh))
    if cdim in dims:
        return _Step(stop=f"mix:{op}(channels)")
    out = _shape(fn, 0)
    ncd = cdim if keep else cdim - sum(1 for x in dims if x < cdim)
    if out is None or ncd >= len(out) or out[ncd] != sh[cdim]:
        return _Step(stop=f"unsupported:{op}")
    return _Step(outs=[(0, ncd, off)])


def _t_permute(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    dims = [int(x) % len(sh) for x in fn._saved_dims]
    return _Step(outs=[(0, dims.index(cdim), off)])


def _t_transpose(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    a, b = int(fn._saved_dim0) % len(sh), int(fn._saved_dim1) % len(sh)
    return _Step(outs=[(0, b if cdim == a else a if cdim == b else cdim, off)])


def _t_reshape(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    return _reshape(fn, op, sh, cdim, off)


def _t_as_strided(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    """Adaptive pooling to 1x1 re-strides its output: accept pure re-layouts."""
    out = _shape(fn, 0)
    stride = getattr(fn, "_saved_stride", None)
    if out == sh and not getattr(fn, "_saved_storage_offset", None) and stride is not None:
        if all(s == 1 or st == math.prod(out[d + 1 :]) for d, (s, st) in enumerate(zip(out, stride))):
            return _Step(outs=[(0, cdim, off)])
    return _Step(stop=f"unsupported:{op}")


def _t_repeat(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    out = _shape(fn, 0)
    if out is not None and out[len(out) - len(sh) + cdim] == sh[cdim]:
        return _Step(outs=[(0, len(out) - len(sh) + cdim, off)])
    return _Step(stop=f"unsupported:{op}")


def _t_cat(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    out = _shape(fn, 0)
    d = int(getattr(fn, "_saved_dim", 0)) % len(out)
    if d != cdim:
        return _Step(outs=[(0, cdim, off)])
    before = 0
    for f, nr in fn.next_functions[:i]:
        s = _shape(f, nr) if f is not None else None
        if s is None:
            return _Step(stop="unsupported:Cat(constant input)")
        before += s[d]
    return _Step(outs=[(0, cdim, off + before)])


def _t_stack(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = int(fn._saved_dim) % (len(sh) + 1)
    return _Step(outs=[(0, cdim + 1 if d <= cdim else cdim, off)])


def _t_split(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = int(fn._saved_dim) % len(sh)
    n_out = len(fn._input_metadata)
    if op == "Unbind":
        if d == cdim:
            return _Step(stop="unsupported:Unbind(channels)")
        return _Step(outs=[(k, cdim - (1 if d < cdim else 0), off) for k in range(n_out)])
    if d != cdim:
        return _Step(outs=[(k, cdim, off) for k in range(n_out)])
    sizes = [_shape(fn, k)[d] for k in range(n_out)]
    return _pieces(op, sizes, off, n_chan, cdim)


def _t_slice(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = int(fn._saved_dim) % len(sh)
    if d != cdim:
        return _Step(outs=[(0, cdim, off)])
    start, end, step = fn._saved_start, fn._saved_end, fn._saved_step
    start = 0 if start is None else int(start)
    start = start + sh[d] if start < 0 else start
    end = sh[d] if end is None or end > sh[d] else int(end)
    end = end + sh[d] if end < 0 else end
    if step != 1:
        return _Step(stop="unsupported:Slice(step)")
    return _pieces(op, [start, end - start], off, n_chan, cdim, keep=[1])


def _t_select(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = getattr(fn, "_saved_dim", None)
    nd = len(sh)
    if op in ("Select", "IndexSelect", "Gather") and d is not None and int(d) % nd != cdim:
        ncd = cdim - (1 if op == "Select" and int(d) % nd < cdim else 0)
        return _Step(outs=[(0, ncd, off)])
    return _Step(stop=f"unsupported:{op}")


def _t_softmax(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = int(fn._saved_dim) % len(sh)
    return _Step(stop=f"mix:{op}(channels)") if d == cdim else _Step(outs=[(0, cdim, off)])


def _t_roll(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    d = getattr(fn, "_saved_dims", None) or getattr(fn, "_saved_dim", None)
    if d is not None and cdim not in _dims(d, len(sh)):
        return _Step(outs=[(0, cdim, off)])
    return _Step(stop=f"unsupported:{op}")


def _t_mix(fn, op, i, sh, cdim, off, n_chan) -> _Step:
    return _Step(stop=f"mix:{op}")


# op name -> its rule; an op in no family is unsupported
_TRANSFERS = {
    op: rule
    for ops, rule in (
        (_POINTWISE, _t_pointwise), (("Expand", "ExpandAs"), _t_expand), (_SPATIAL, _t_spatial),
        (("ConstantPadNd",), _t_pad), (_REDUCE, _t_reduce), (("Permute",), _t_permute),
        (("Transpose",), _t_transpose), (_RESHAPE, _t_reshape), (("AsStrided",), _t_as_strided),
        (("Repeat",), _t_repeat), (("Cat",), _t_cat), (("Stack",), _t_stack),
        (("Split", "SplitWithSizes", "Unbind"), _t_split), (("Slice",), _t_slice),
        (("Select", "IndexSelect", "Index", "Gather", "Narrow"), _t_select),
        (("Softmax", "LogSoftmax"), _t_softmax), (("Roll", "Flip"), _t_roll), (_MIX, _t_mix),
    )
    for op in ops
}


def _pieces(op, sizes, off, n_chan, cdim, keep=None) -> _Step:
    """Channels ``[off, off+n)`` split into consecutive pieces of ``sizes`` (slice: a kept window)."""
    st = _Step()
    if keep is not None:  # slice: sizes = [start, length]; output 0 is the window
        bounds = [(0, sizes[0], sizes[0] + sizes[1])]
    else:
        acc, bounds = 0, []
        for k, s in enumerate(sizes):
            bounds.append((k, acc, acc + s))
            acc += s
    for k, s, e in bounds:
        if s <= off and off + n_chan <= e:
            st.outs.append((k, cdim, off - s))
        elif off < e and s < off + n_chan:
            # the window keeps part of our filters: follow that piece on its own,
            # (output_nr, cdim, offset, first filter relative to ours, filters in the piece)
            a, b = max(off, s), min(off + n_chan, e)
            st.outs.append((k, cdim, a - s, a - off, b - a))
            st.cut = f"{op}(cuts the filters of one conv into pieces)"
    return st


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
