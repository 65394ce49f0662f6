"""Probing a model: an example input, the order its modules run in, its train/eval modes kept.

Everything that runs a model once to learn about it (the tracer, :func:`~filtersurgery.verify`,
block discovery, growth's partition, sharing's plan, FLOP counts) uses these helpers:

- :func:`example_input`: a batch of the model's input size (:func:`default_input_size`: the
  timm ``input_size``, channels from the first conv, behind a space-to-depth stem the
  model's ``in_chans``) on the model's device and dtype, drawn from a private seeded
  generator, so the global RNG is never touched (``generator=None``: the global RNG).
- :func:`call_order`: a context manager recording which modules run, in order.
- :func:`preserve_mode` / :func:`eval_mode`: context managers that restore every submodule's
  own ``training`` flag on exit, also after an exception.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from filtersurgery.tracing.scaling_map import unwrap

__all__ = [
    "example_input", "default_input_size", "reduced_input_size", "device_dtype",
    "call_order", "CallOrder", "Call", "preserve_mode", "eval_mode", "SEEDED",
]

SEEDED = "seeded"  # example_input's default generator: a private one seeded with ``seed``


# --------------------------------------------------------------------------- input size
def _first_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _cfg_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """timm's ``pretrained_cfg`` (else ``default_cfg``) ``input_size``, if any."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(s) for s in cfg["input_size"])
    return None


def _stem_channels(model: nn.Module, conv_in: int) -> int:
    """The model's ``in_chans`` when the first conv sees ``in_chans * k * k`` channels (space-to-depth, k >= 2)."""
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int) and 0 < in_chans < conv_in and conv_in % in_chans == 0:
        k = math.isqrt(conv_in // in_chans)
        if k >= 2 and k * k * in_chans == conv_in:
            return in_chans
    return conv_in


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """``(C, H, W)`` the model expects: timm ``pretrained_cfg['input_size']`` else 3x224x224.

    ``C`` is the first conv's ``in_channels`` (so ``in_chans`` is respected, and so is a
    replaced stem conv), except behind a space-to-depth stem (TResNet): when that is
    ``in_chans * k*k`` (k >= 2) for the model's ``in_chans`` attribute (timm sets it), ``C``
    is ``in_chans``.
    """
    model = unwrap(model)
    size = _cfg_size(model)
    c, h, w = size if size and len(size) == 3 else (3, 224, 224)
    conv = _first_conv(model)
    if conv is not None:
        c = _stem_channels(model, conv.in_channels)
    return c, h, w


def reduced_input_size(size: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Smaller spatial size used when the caller gave no input (same map, ~10x faster)."""
    c, h, w = size
    s = max(64, math.ceil(min(h, w) * 2 / 7))
    if s >= min(h, w):
        return size
    return c, max(s, round(h * s / min(h, w))), max(s, round(w * s / min(h, w)))


def device_dtype(model: Optional[nn.Module]) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter or buffer (CPU float32 if none)."""
    if model is not None:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------- example input
def _checked_size(input_size: Sequence[int]) -> Tuple[int, ...]:
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size: expected (C, H, W) of positive integers, got {input_size!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size: expected (C, H, W) of positive integers, got {list(input_size)}")
    return size


def example_input(
    model: Optional[nn.Module] = None,
    input_size: Optional[Sequence[int]] = None,
    batch: int = 1,
    *,
    seed: int = 0,
    generator: Union[str, None, torch.Generator] = SEEDED,
    device: Union[None, str, torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """A standard-normal batch ``(batch, C, H, W)`` to probe ``model`` with.

    ``input_size`` ``(C, H, W)`` defaults to :func:`default_input_size` of ``model`` (one
    of the two is needed). The batch is put on ``device`` / in ``dtype``, by default the
    model's (:func:`device_dtype`; CPU float32 without a model). ``generator``:

    - ``"seeded"`` (default): drawn in float32 on the CPU from a private generator seeded
      with ``seed``, then moved: the same values on every device, the global RNG untouched;
    - a ``torch.Generator``: drawn from it on its device (it advances), then moved;
    - ``None``: drawn from the global RNG of ``device``, directly in ``dtype`` (what a
      caller that consumed the global RNG before keeps doing, so later draws stay the same).
    """
    if model is None and input_size is None:
        raise ValueError("input_size: needed when no model is given")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: must be an int >= 1, got {batch!r}")
    size = _checked_size(default_input_size(model) if input_size is None else input_size)
    dev, dt = device_dtype(unwrap(model) if model is not None else None)
    dev = dev if device is None else torch.device(device)
    dt = dt if dtype is None else dtype
    shape = (batch, *size)
    if generator is None:
        return torch.randn(shape, device=dev, dtype=dt)
    if isinstance(generator, str) and generator == SEEDED:
        generator = torch.Generator().manual_seed(int(seed))
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: must be 'seeded', None or a torch.Generator, got {generator!r}")
    return torch.randn(shape, generator=generator, device=generator.device).to(device=dev, dtype=dt)


# --------------------------------------------------------------------------- call order
@dataclass
class Call:
    """One call of a module: its name and the event numbers of its start and end."""

    name: str
    start: int  # event number of the forward pre-hook
    end: int = -1  # event number of the forward hook (-1: the call did not return)
    shape: Optional[Tuple[int, ...]] = None  # output shape when the output is a tensor


@dataclass
class CallOrder:
    """The module calls recorded by :func:`call_order`, in the order they started.

    Starts and ends share one event counter, so ``a.start < b.start <= b.end < a.end``
    means ``b`` ran inside ``a``.
    """

    calls: List[Call] = field(default_factory=list)

    def starts(self) -> Dict[str, List[int]]:
        """``name -> [start of each call]``."""
        out: Dict[str, List[int]] = {}
        for c in self.calls:
            out.setdefault(c.name, []).append(c.start)
        return out

    def ends(self) -> Dict[str, List[int]]:
        """``name -> [end of each call]``, in the order the calls returned."""
        out: Dict[str, List[int]] = {}
        for c in sorted((c for c in self.calls if c.end >= 0), key=lambda c: c.end):
            out.setdefault(c.name, []).append(c.end)
        return out

    def first_calls(self) -> Dict[str, Tuple[int, int]]:
        """``name -> (start of its first call, number of calls)``."""
        out: Dict[str, Tuple[int, int]] = {}
        for c in self.calls:
            first, n = out.get(c.name, (c.start, 0))
            out[c.name] = (first, n + 1)
        return out

    def names(self) -> List[str]:
        """The names of the modules that ran, in the order of their first call."""
        return list(self.first_calls())


@contextmanager
def call_order(model: nn.Module, modules: Optional[Iterable[str]] = None) -> Iterator[CallOrder]:
    """Record which modules run, in order, during the forward passes inside the ``with``.

    ``modules``: ``named_modules()`` names of the (unwrapped) model to watch; default every
    module, the model itself (``""``) included. Forward pre-hooks and hooks append to the
    yielded :class:`CallOrder`; they are removed on exit, also after an exception. The
    model's modes are not changed (combine with :func:`eval_mode`).
    """
    net = unwrap(model)
    named = dict(net.named_modules())
    names = list(named) if modules is None else list(modules)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"modules: not modules of {type(net).__name__}: {missing[:5]}")
    order = CallOrder()
    counter = [0]
    handles = []

    def tick() -> int:
        counter[0] += 1
        return counter[0] - 1

    def pre(name: str):
        def hook(mod, args):
            running.setdefault(id(mod), []).append(len(order.calls))
            order.calls.append(Call(name, tick()))
        return hook

    def post(mod, args, out):
        call = order.calls[running[id(mod)].pop()]
        call.end = tick()
        call.shape = tuple(out.shape) if torch.is_tensor(out) else None

    running: Dict[int, List[int]] = {}
    try:
        for n in names:
            handles.append(named[n].register_forward_pre_hook(pre(n)))
            handles.append(named[n].register_forward_hook(post))
        yield order
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- modes
@contextmanager
def preserve_mode(model: nn.Module, train: Optional[bool] = None) -> Iterator[nn.Module]:
    """Keep every submodule's own ``training`` flag: restored exactly on exit, also after an exception.

    ``train``: ``None`` leaves the modes as they are inside the ``with`` (the caller may
    change them); ``True`` / ``False`` calls ``model.train(train)`` first. The flags are
    written back directly (no ``train()`` call), so modules whose ``train()`` is overridden
    (pinned in eval mode) are restored as they were.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        if train is not None:
            model.train(train)
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def eval_mode(model: nn.Module):
    """:func:`preserve_mode` with ``model.eval()`` inside: every module's flag restored on exit."""
    return preserve_mode(model, train=False)
