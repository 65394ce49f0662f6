"""How a conv's channels pass through each autograd op on the way to a norm: the op transfer table.

Support for a new op goes here: a ``_t_*`` function that says, for an op and the input
position a conv's channels arrive on, where they leave (output number, channel dim, offset)
or that the op mixes channels (the walk stops), registered in ``_TRANSFERS`` under the op's
autograd name (``AddBackward0`` -> ``Add``). The tracer's walk (``tracing/tracer.py``) calls
:func:`_transfer` for every op it meets.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn

__all__: List[str] = []  # the tracer's internals (tracing/tracer.py)

_NAME_RE = re.compile(r"Backward\d*$")

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
