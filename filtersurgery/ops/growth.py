"""Incremental growth with look-ahead initialization (incremental-training paper, docs/method.md §7).

The backbone of a CNN is cut into ``K`` sub-networks ``S_1..S_K`` (by default its stages,
the blocks of docs/method.md §0) plus its classifier block (the *head*). Training starts with
``S_1`` + a small head and adds ``S_(k+1)`` whenever the validation accuracy stops
improving (:func:`should_grow`, paper Fig. 2). Look-ahead initialization trains the new
sub-network (and a fresh head) for a few epochs with ``S_1..S_k`` frozen before training
everything (paper §3, Fig. 1 step 3).

- :func:`partition` splits a timm / torchvision / CIFAR-ResNet model into a
  :class:`Partition` (``stages`` + ``head``). ``stages[0]`` holds the stem as well (the
  paper's sub-networks group the layers with the same number of filters; a stem conv
  alone would be a weak ``S_1``).
- :func:`grow` returns :class:`GrownNet`, the network truncated after ``S_k`` with a head
  that fits its width (global average pooling + linear). The stage modules are *shared*
  with the original model, so training a grown network trains the model in place and
  ``grow(p, k + 1)`` starts from the trained ``S_1..S_k``.
- :func:`frozen_stages` freezes the first ``n`` stages of a :class:`GrownNet` (look-ahead).
- :func:`window_angle`, :func:`window_angles`, :func:`should_grow`, :func:`stop_epoch`: the
  termination rule, pure functions of an accuracy curve.
- :func:`train_flops_per_image`: FLOPs of one training step per image (forward + backward,
  counted with ``torch.utils.flop_counter``; frozen stages cost their forward only).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.distill.blockfeats import blocks as find_blocks
from filtersurgery.tracing.probe import call_order, eval_mode, example_input, preserve_mode
from filtersurgery.tracing.scaling_map import unwrap

__all__ = [
    "Partition", "GrownNet", "LinearHead", "partition", "grow", "frozen_stages",
    "window_angle", "window_angles", "should_grow", "stop_epoch", "train_flops_per_image",
]


# ---------------------------------------------------------------------------------------
# the termination rule (paper §3, Fig. 2)
# ---------------------------------------------------------------------------------------


def window_angle(acc: Sequence[float]) -> float:
    """Angle (degrees) between the x-axis and the least-squares line through ``acc``.

    ``acc`` are consecutive validation accuracies (one per epoch, x = 0, 1, ...), as
    fractions in [0, 1] (the paper's Keras accuracies): the angle is ``atan(slope)`` of
    the fit, so its value depends on the unit; pass percentages divided by 100.
    Paper Fig. 2: ``alpha_i`` is this angle for the ``i``-th window.
    """
    ys = [float(a) for a in acc]
    n = len(ys)
    if n < 2:
        raise ValueError(f"acc: a line needs >= 2 points, got {n}")
    mx, my = (n - 1) / 2.0, sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx
    return math.degrees(math.atan(slope))


def window_angles(curve: Sequence[float], window: int) -> List[float]:
    """Angles of the consecutive, non-overlapping full windows of ``curve`` (epochs 1..ws, ws+1..2ws, ...)."""
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window: must be an int >= 2 (a line needs two points), got {window!r}")
    n = len(curve) // window
    return [window_angle(curve[i * window:(i + 1) * window]) for i in range(n)]


def should_grow(curve: Sequence[float], window: int, gamma: float) -> bool:
    """Paper Fig. 2: stop training the current network when ``alpha_i <= gamma * alpha_(i-1)``.

    Checked every ``window`` epochs: True only when ``len(curve)`` is a multiple of
    ``window`` and at least two full windows exist, comparing the angle of the last window
    (``alpha_i``) with the one before (``alpha_(i-1)``). ``curve``: validation accuracy
    per epoch as fractions in [0, 1]; ``gamma`` in [0, 1].
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: must be in [0, 1], got {gamma}")
    if len(curve) == 0 or len(curve) % window:
        window_angles(curve, window)  # validates window
        return False
    a = window_angles(curve, window)
    return len(a) >= 2 and a[-1] <= gamma * a[-2]


def stop_epoch(curve: Sequence[float], window: int, gamma: float) -> Optional[int]:
    """First epoch (1-based) at which :func:`should_grow` fires on a prefix of ``curve``, else None."""
    for e in range(1, len(curve) + 1):
        if should_grow(curve[:e], window, gamma):
            return e
    return None


# ---------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------


def _first_param_leaf(module: nn.Module) -> Optional[nn.Module]:
    for m in module.modules():
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            return m
    return None


class _Chain(nn.Sequential):
    """``nn.Sequential`` over modules taken from a model, named in ``names``.

    One shim: a unit whose first parameterized leaf is an ``nn.Linear`` gets its input
    flattened to ``[B, -1]`` (``torch.flatten(x, 1)`` between torchvision's ``avgpool``
    and ``fc``).
    """

    def __init__(self, named: Sequence[Tuple[str, nn.Module]]):
        super().__init__(*[m for _, m in named])
        self.names = [n for n, _ in named]
        self._flatten = [isinstance(_first_param_leaf(m), nn.Linear) for _, m in named]

    def forward(self, x):
        for flat, m in zip(self._flatten, self):
            if flat and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = m(x)
        return x


@dataclass
class Partition:
    """A CNN cut into ``K`` sub-networks and its classifier block (paper §3).

    ``stages[k]`` is an ``nn.Sequential`` of the model's own modules (shared, not copied);
    ``stages[0]`` includes the stem. ``names[k]`` are their ``named_modules`` names in the
    unwrapped model, ``head`` / ``head_names`` the modules after the last stage (pooling,
    classifier). ``widths[k]`` is the number of output channels of ``S_(k+1)``.
    """

    model: nn.Module
    stages: List[nn.Module]
    names: List[List[str]]
    head: nn.Module
    head_names: List[str]
    widths: List[int]
    num_classes: int
    probe_shape: Tuple[int, ...] = field(default=())

    @property
    def K(self) -> int:  # noqa: N802 - the paper's symbol
        return len(self.stages)

    def __repr__(self) -> str:
        parts = [f"S{i + 1}[{','.join(n)}]->{w}" for i, (n, w) in enumerate(zip(self.names, self.widths))]
        return f"Partition(K={self.K}, {' '.join(parts)}, head[{','.join(self.head_names)}])"


def _call_order(model: nn.Module, x: torch.Tensor) -> Tuple[Dict[str, Tuple[int, int]], torch.Tensor]:
    """``name -> (first call index, number of calls)`` of every submodule in one forward pass, and its output."""
    with call_order(model, [n for n, _ in model.named_modules() if n]) as order, torch.no_grad():
        out = model(x)
    return order.first_calls(), out


def _units(model: nn.Module, stage_names: Sequence[str], calls) -> List[Tuple[str, nn.Module]]:
    """The model's called modules in forward order, descending into the containers of stages."""
    ancestors = set()
    for n in stage_names:
        parts = n.split(".")
        ancestors.update(".".join(parts[:i]) for i in range(1, len(parts)))
    units: List[Tuple[str, nn.Module]] = []

    def expand(prefix: str, module: nn.Module) -> None:
        kids = []
        for n, c in module.named_children():
            full = f"{prefix}.{n}" if prefix else n
            if full in calls:
                kids.append((full, c))
        for full, c in sorted(kids, key=lambda nc: calls[nc[0]][0]):
            if full in ancestors:
                expand(full, c)
            else:
                units.append((full, c))

    expand("", model)
    return units


def _fail(model: nn.Module, why: str) -> ValueError:
    return ValueError(f"model: cannot partition {type(model).__name__} into a chain of stages + head ({why}); "
                      "supported: timm/torchvision CNNs whose forward is stem -> stages -> head, e.g. "
                      "ResNet, VGG, MobileNet, EfficientNet, cifar:resnetN")


def partition(model: nn.Module, stage_names: Optional[Sequence[str]] = None,
              example_inputs: Optional[torch.Tensor] = None) -> Partition:
    """Split ``model`` into ``K`` sub-networks (its stages) plus its head (docs/method.md §7, paper §3).

    ``stage_names`` (default :func:`filtersurgery.distill.blocks`: timm ``feature_info`` stages,
    torchvision's stages, else one block per resolution) name the last module of each
    sub-network. One forward pass of ``example_inputs`` (default: a fixed random batch of
    the model's input size; eval mode, no grad, modes restored, the global RNG untouched)
    records the order in which the modules run; ``S_1`` is everything up to the first
    stage (stem included), ``S_k`` everything after ``S_(k-1)`` up to stage ``k``, and the
    head everything after the last stage. The chain is then checked: running
    ``stages`` then ``head`` must reproduce the model's output, else a one-line
    ``ValueError`` says why (a forward with functional ops between modules, a module
    called twice, ...). A timm ``drop_rate`` dropout in ``forward_head`` is not part of
    the chain.
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    x = example_inputs if example_inputs is not None else example_input(model)
    try:
        names = list(stage_names) if stage_names is not None else find_blocks(model)
    except ValueError as e:
        raise _fail(model, str(e).split("; ")[0]) from None
    if len(names) < 1:
        raise ValueError("stage_names: need at least one stage name")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"stage_names: not modules of {type(model).__name__}: {missing[:5]}")
    with eval_mode(model):
        calls, ref = _call_order(model, x)
        units = _units(model, names, calls)
        twice = [n for n, _ in units if calls[n][1] != 1]
        if twice:
            raise _fail(model, f"module {twice[0]!r} runs {calls[twice[0]][1]} times per forward")
        pos = {n: i for i, (n, _) in enumerate(units)}
        if any(n not in pos for n in names):
            raise _fail(model, f"stage {next(n for n in names if n not in pos)!r} is not called once in forward")
        idx = [pos[n] for n in names]
        if idx != sorted(idx) or len(set(idx)) != len(idx):
            raise _fail(model, "stage_names are not in forward order")
        bounds = [-1] + idx
        stage_units = [units[bounds[i] + 1:bounds[i + 1] + 1] for i in range(len(names))]
        head_units = units[idx[-1] + 1:]
        if not head_units:
            raise _fail(model, "no classifier after the last stage")
        stages = [_Chain(u) for u in stage_units]
        head = _Chain(head_units)
        # check the chain against the model, stage by stage and at the output
        widths = []
        with torch.no_grad():
            h = x
            for s, n in zip(stages, names):
                h = s(h)
                if h.dim() != 4:
                    raise _fail(model, f"stage {n!r} does not output a [B, C, H, W] feature map")
                widths.append(int(h.shape[1]))
            try:
                out = head(h)
            except (RuntimeError, ValueError, TypeError) as e:
                raise _fail(model, f"head {[n for n, _ in head_units]} fails on the last stage's output: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not (torch.is_tensor(ref) and out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)):
            raise _fail(model, "running the stages in sequence does not reproduce the model's output")
    num_classes = int(ref.shape[1]) if torch.is_tensor(ref) and ref.dim() == 2 else -1
    return Partition(model=model, stages=stages, names=[[n for n, _ in u] for u in stage_units], head=head,
                     head_names=[n for n, _ in head_units], widths=widths, num_classes=num_classes,
                     probe_shape=tuple(x.shape[1:]))


# ---------------------------------------------------------------------------------------
# the grown network
# ---------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Global average pooling + linear: the classifier block put after ``S_k`` (k < K)."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class GrownNet(nn.Module):
    """``S_1 .. S_k`` followed by ``head``; the first ``frozen`` stages may be frozen (look-ahead).

    Frozen stages run under ``torch.no_grad()`` (no back-propagation through them, paper
    §3) and stay in eval mode whatever ``train()`` is called with, so their BatchNorm
    statistics do not move either. Use :func:`frozen_stages` to set ``frozen``.
    """

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.frozen = 0

    @property
    def k(self) -> int:
        return len(self.stages)

    def train(self, mode: bool = True) -> "GrownNet":
        super().train(mode)
        for s in self.stages[: self.frozen]:
            s.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                for s in self.stages[: self.frozen]:
                    x = s(x)
        for s in self.stages[self.frozen:]:
            x = s(x)
        return self.head(x)


def grow(part: Partition, k: int, num_classes: Optional[int] = None, original_head: bool = True) -> GrownNet:
    """The network truncated after sub-network ``k`` (1-based) with a head fitting its width.

    For ``k < K`` the head is a fresh :class:`LinearHead` (global average pooling + linear,
    ``part.widths[k - 1]`` inputs, drawn from the global RNG). For ``k == K`` it is the
    model's own classifier block (``part.head``) when ``original_head`` (so the grown
    network *is* the model), else a fresh :class:`LinearHead` too. ``num_classes``
    defaults to the model's. The stages are the model's modules, shared.
    """
    if not isinstance(k, int) or not 1 <= k <= part.K:
        raise ValueError(f"k: must be an int in [1, {part.K}] (the number of sub-networks), got {k!r}")
    nc = part.num_classes if num_classes is None else num_classes
    if not isinstance(nc, int) or nc < 1:
        raise ValueError(f"num_classes: must be an int >= 1, got {nc!r}")
    if k == part.K and original_head and nc == part.num_classes:
        head = part.head
    else:
        head = LinearHead(part.widths[k - 1], nc)
        p = next(part.stages[k - 1].parameters(), None)
        if p is not None:
            head = head.to(device=p.device, dtype=p.dtype)
    return GrownNet(part.stages[:k], head)


@contextlib.contextmanager
def frozen_stages(net: GrownNet, n: int) -> Iterator[GrownNet]:
    """Freeze ``S_1..S_n`` of ``net`` for the ``with`` block (look-ahead, paper §3).

    Their parameters get ``requires_grad=False`` and they run in eval mode under
    ``no_grad``; on exit ``requires_grad``, the train/eval modes and ``net.frozen`` are
    restored.
    """
    if not isinstance(n, int) or not 0 <= n < net.k:
        raise ValueError(f"n: must be an int in [0, {net.k - 1}] (leave at least one stage to train), got {n!r}")
    params = [p for s in net.stages[:n] for p in s.parameters() if p.requires_grad]
    old = net.frozen
    with preserve_mode(net):
        try:
            for p in params:
                p.requires_grad_(False)
            net.frozen = n
            net.train(net.training)
            yield net
        finally:
            for p in params:
                p.requires_grad_(True)
            net.frozen = old


def train_flops_per_image(net: nn.Module, input_shape: Sequence[int], batch: int = 2) -> int:
    """FLOPs of one training step per image: forward + backward of ``net`` in train mode.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on a deep copy of ``net``
    (so BatchNorm statistics, gradients and the global RNG are untouched) for a batch of
    ``batch`` random images of ``input_shape`` (``C, H, W``), divided by ``batch``. Frozen
    stages of a :class:`GrownNet` run under ``no_grad``, so they cost their forward only;
    parameters with ``requires_grad=False`` get no weight gradient. The loss and the
    optimizer update are not counted (tiny next to the convolutions).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch: must be an int >= 2 (BatchNorm needs 2 samples in train mode), got {batch!r}")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape: must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    p = next(net.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    twin = copy.deepcopy(net)
    twin.train()
    x = example_input(twin, shape, batch=batch, device=device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as fc:
        out = twin(x)
        loss = out.float().logsumexp(1).mean()
        if loss.requires_grad:
            loss.backward()
    return int(fc.get_total_flops()) // batch
