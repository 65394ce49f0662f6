"""Blocks of a CNN and their outputs: the features attention transfer compares (docs/method.md §0).

A *block* is a stage of the network: timm's stages (the modules named by the model's
``feature_info``), torchvision's stages (``layer1..4``, ``features`` stages, ...), else the
last stage-level module at each spatial resolution of a probe forward pass, searched
through nested containers (Hugging Face ``resnet.encoder.stages.N``, your own
``trunk.levels['a']``), without the stem and the heads.

``blocks(model)`` names them (``named_modules`` names of the unwrapped model, in forward
order); ``capture_blocks(model, names)`` records their outputs for one forward pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.tracing.probe import CallOrder, call_order, eval_mode, example_input
from filtersurgery.tracing.scaling_map import unwrap

__all__ = ["blocks", "capture_blocks"]

_POOLS = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
)


def _n_convs(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, nn.Conv2d))


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_pool(module: nn.Module) -> bool:
    return isinstance(module, _POOLS) or (
        "pool" in type(module).__name__.lower() and not _has_params(module)
    )


# ---------------------------------------------------------------------------------------
# timm: feature_info
# ---------------------------------------------------------------------------------------


def _feature_info_entries(model: nn.Module) -> List[dict]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    if hasattr(fi, "get_dicts"):  # timm FeatureInfo (features_only models)
        fi = fi.get_dicts()
    if not isinstance(fi, (list, tuple)):
        return []
    return [e for e in fi if isinstance(e, dict) and isinstance(e.get("module"), str)]


def _blocks_from_feature_info(model: nn.Module) -> List[str]:
    """timm's stage outputs, deduplicated, pooled copies and a single-conv stem dropped."""
    modules = dict(model.named_modules())
    names: List[str] = []
    prev_chs = None
    for e in _feature_info_entries(model):
        name = e["module"]
        if not name or name not in modules or name in names:
            continue  # '' is the whole model, not a stage
        # a pooling layer listed right after a stage with the same width is a pooled copy
        # of that stage's output (e.g. vgg's final max-pool): keep the stage only
        if names and _is_pool(modules[name]) and e.get("num_chs") == prev_chs:
            continue
        names.append(name)
        prev_chs = e.get("num_chs")
    if len(names) > 1 and _n_convs(modules[names[0]]) <= 1:
        names = names[1:]  # the stem (a single conv / its norm / activation)
    return names


# ---------------------------------------------------------------------------------------
# generic rule: a probe forward pass
# ---------------------------------------------------------------------------------------


@dataclass
class _Call:
    start: int = -1
    end: int = -1
    calls: int = 0
    out4d: bool = False  # the (last) output was a 4-d tensor (a feature map)
    out_hw: Optional[Tuple[int, int]] = None  # set for conv/pool leaves only


@dataclass
class _Probe:
    calls: Dict[str, _Call] = field(default_factory=dict)
    events: List[Tuple[int, Tuple[int, int]]] = field(default_factory=list)  # (end, hw)


def _run_probe(model: nn.Module, example_inputs) -> _Probe:
    """One forward pass of ``example_inputs`` (eval mode, no grad, modes restored): every call, in order."""
    names = [n for n, _ in model.named_modules() if n]
    # eval mode: no running-stat updates, no aux heads
    with eval_mode(model), call_order(model, names) as order, torch.no_grad():
        try:
            if isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            shapes = [tuple(t.shape) for t in (example_inputs if isinstance(example_inputs, (tuple, list))
                                               else [example_inputs]) if torch.is_tensor(t)]
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"example_inputs: the probe forward pass of {type(model).__name__} failed on inputs of shape "
                f"{shapes} ({msg}); pass example_inputs= of the model's input shape"
            ) from None
    return _probe_of(model, order)


def _probe_of(model: nn.Module, order: CallOrder) -> _Probe:
    """Per module: first start, last end, number of calls, 4-d output; the resolution events of conv/pool leaves."""
    modules = dict(model.named_modules())
    probe = _Probe()
    for call in order.calls:
        c = probe.calls.setdefault(call.name, _Call())
        c.calls += 1
        if c.start < 0:
            c.start = call.start
    for call in sorted((k for k in order.calls if k.end >= 0), key=lambda k: k.end):
        c = probe.calls[call.name]
        c.end = call.end
        c.out4d = call.shape is not None and len(call.shape) == 4
        m = modules[call.name]
        track = isinstance(m, nn.Conv2d) or (_is_pool(m) and not list(m.children()))
        if track and c.out4d:
            hw = (int(call.shape[-2]), int(call.shape[-1]))
            if hw != (1, 1):  # global pooling / SE squeeze: not a resolution
                c.out_hw = hw
                probe.events.append((call.end, hw))
    return probe


def _res_at(events: List[Tuple[int, Tuple[int, int]]], t: int) -> Optional[Tuple[int, int]]:
    """Resolution of the activations at time ``t`` (last conv/pool output before it)."""
    hw = None
    for when, e_hw in events:
        if when > t:
            break
        hw = e_hw
    return hw


def _trunk_groups(units, calls: Dict[str, _Call], events) -> List[List[Tuple[str, nn.Module]]]:
    """Consecutive units grouped by the resolution they end at, along the trunk only.

    The trunk runs while the resolution shrinks; the first group whose resolution is not
    smaller than the one before (an FPN's top-down path, a decoder, per-scale heads run
    after the last stage) ends it.
    """
    groups: List[Tuple[Tuple[int, int], List[Tuple[str, nn.Module]]]] = []
    for name, mod in units:
        hw = _res_at(events, calls[name].end)
        if hw is None:
            continue
        if not groups or hw != groups[-1][0]:
            if groups and hw[0] * hw[1] >= groups[-1][0][0] * groups[-1][0][1]:
                break  # back up to a resolution the trunk has passed: heads from here on
            groups.append((hw, []))
        groups[-1][1].append((name, mod))
    return [g for _, g in groups]


def _blocks_from_probe(model: nn.Module, example_inputs) -> List[str]:
    """Last top-level unit at each spatial resolution, descending into multi-stage containers."""
    probe = _run_probe(model, example_inputs)
    calls, events = probe.calls, probe.events

    def called_children(prefix: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The called children of ``module``, looking through children that are never called
        themselves (``ModuleList`` / ``ModuleDict`` / plain holder modules), in call order."""
        out = []
        for n, c in module.named_children():
            full = f"{prefix}.{n}" if prefix else n
            if full in calls and calls[full].calls > 0:
                out.append((full, c))
            elif full not in calls:
                out.extend(called_children(full, c))
        return sorted(out, key=lambda nc: calls[nc[0]].start)

    def n_res(name: str) -> int:
        c = calls[name]
        res = {hw for when, hw in events if c.start < when <= c.end}
        before = _res_at(events, c.start)
        if before is not None:
            res.add(before)
        return len(res)

    # units: the trunk flattened until no unit spans more than one resolution change; a container whose
    # output is not a feature map (a Hugging Face encoder's ModelOutput, a tuple) cannot be a block: look inside
    units: List[Tuple[str, nn.Module]] = []
    stack = list(reversed(called_children("", model)))
    while stack:
        name, mod = stack.pop()
        kids = called_children(name, mod)
        if kids and (n_res(name) > 2 or not calls[name].out4d):
            stack.extend(reversed(kids))
        else:
            units.append((name, mod))

    names: List[str] = []
    for gi, group in enumerate(_trunk_groups(units, calls, events)):
        usable = [(n, m) for n, m in group if calls[n].calls == 1 and calls[n].out4d]
        if gi == 0 and sum(_n_convs(m) for _, m in group) <= 1:
            continue  # the stem: a single conv
        multi = [i for i, (_, m) in enumerate(usable) if _n_convs(m) >= 2]
        with_params = [i for i, (_, m) in enumerate(usable) if _has_params(m)]
        pick = multi[-1] if multi else (with_params[-1] if with_params else None)
        if pick is None:
            continue  # only pooling / activations at this resolution
        # extend over trailing parameter-free, non-pooling units (activation after a norm)
        while pick + 1 < len(usable):
            nxt = usable[pick + 1][1]
            if _has_params(nxt) or _is_pool(nxt):
                break
            pick += 1
        names.append(usable[pick][0])
    return names


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def blocks(model: nn.Module, example_inputs=None) -> List[str]:
    """Ordered names of the model's blocks (docs/method.md §0), for attention transfer (eq. 9).

    ``named_modules`` names of the unwrapped model (``DataParallel``/DDP/``torch.compile``
    peeled off), in forward order:

    - timm models: the modules of ``model.feature_info`` (timm's stages), deduplicated; a
      pooling entry that only pools the previous stage is dropped, and so is the first
      entry when it is a single-conv stem (it holds at most one conv).
    - any other model (torchvision, Hugging Face ``transformers``, custom): one probe
      forward pass (eval mode, no grad, modes restored; input ``example_inputs`` or a
      seeded random batch of the model's input size, :func:`~filtersurgery.tracing.probe.example_input`,
      default ``C x 224 x 224``; the global RNG is not touched) flattens the model into
      stage-level units: called modules, descending into any container that spans more
      than one resolution change or whose output is not a 4-d feature map, and looking through containers that are never called
      themselves (``ModuleList``, ``ModuleDict``, plain holder modules), so stages nested
      at any depth are found. Units are grouped by the spatial size they end at, along the
      trunk: the first group whose resolution is not smaller than the one before (an
      FPN's top-down path, a decoder, per-scale heads) ends it. Each group gives its last
      unit with >= 2 convs (else its last unit with parameters, extended over a trailing
      activation): one block per resolution. A first group holding a single conv (the
      stem) and groups holding only pooling are skipped. For torchvision this gives ResNet
      ``layer1..4``, ShuffleNet ``stage2..4``, RegNet ``trunk_output.block1..4``, the last
      ``features`` stage per resolution for MobileNet/EfficientNet/ConvNeXt, dense blocks
      for DenseNet, GoogLeNet's last inception block per resolution; for ``transformers``
      ``resnet/convnext/regnet.encoder.stages.0..3``, MobileNetV2's ``conv_stem`` and
      ``layer.1/4/11/15``, EfficientNet's last ``encoder.blocks.N`` per resolution.

    Raises a one-line ``ValueError`` when no block is found (e.g. a single-stage model).
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    names = _blocks_from_feature_info(model)
    if len(names) < 2:
        if example_inputs is None:
            example_inputs = example_input(model)
        names = _blocks_from_probe(model, example_inputs)
    if not names:
        raise ValueError(
            f"model: no blocks found in {type(model).__name__} (needs >= 2 stages of convs "
            "at different resolutions); pass names= explicitly to capture_blocks"
        )
    return names


@contextlib.contextmanager
def capture_blocks(model: nn.Module, names: Optional[Sequence[str]] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Record each block's output of one forward pass: ``with capture_blocks(m) as feats:``.

    ``feats`` maps block name -> output tensor (with its autograd graph: losses on student
    features back-propagate). It is filled in forward order by forward hooks on the
    unwrapped model's modules ``names`` (default :func:`blocks`); a module called several
    times in one pass keeps its last output, and a second forward overwrites the first.
    On exit (also on an exception) the hooks are removed and ``feats`` is cleared, so no
    tensor is kept alive by it: compute the losses inside the ``with`` block (or copy the
    entries you need yourself).
    """
    model = unwrap(model)
    if names is None:
        names = blocks(model)
    names = list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"names: not modules of {type(model).__name__}: {missing[:5]}")
    feats: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(mod, args, out):
            feats.pop(name, None)  # keep forward order when a pass is repeated
            feats[name] = out

        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make_hook(n)))
        yield feats
    finally:
        for h in handles:
            h.remove()
        feats.clear()


@torch.no_grad()
def block_sizes(model: nn.Module, example_inputs: torch.Tensor, names: Optional[Sequence[str]] = None
                ) -> Dict[str, Optional[Tuple[int, int]]]:
    """Spatial size ``(H, W)`` of each block's output for ``example_inputs`` (None if not a 4-D map).

    One probe forward pass in eval mode without gradients (the train/eval mode is restored,
    BN running statistics are not touched). ``names`` default to :func:`blocks`.
    """
    net = unwrap(model)
    names = list(blocks(net, example_inputs) if names is None else names)
    with eval_mode(net), capture_blocks(net, names) as feats:
        net(example_inputs)
        return {n: (tuple(feats[n].shape[-2:]) if torch.is_tensor(feats.get(n)) and feats[n].dim() == 4 else None)
                for n in names}


def spatial_blocks(model: nn.Module, example_inputs: torch.Tensor, min_size: int,
                   names: Optional[Sequence[str]] = None, arg: str = "min_size") -> List[str]:
    """The blocks whose output map is at least ``min_size x min_size`` for ``example_inputs``.

    Attention transfer on a 1x1 map is identically 0 (a normalized single value) and on
    2x2 maps it is unstable at the usual weights, so distillation terms use the blocks
    that carry spatial information. One-line ``ValueError`` (naming ``arg``) when none
    qualifies, listing every block's size.
    """
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"{arg}: must be an int >= 1, got {min_size!r}")
    sizes = block_sizes(model, example_inputs, names)
    keep = [n for n, hw in sizes.items() if hw is not None and min(hw) >= min_size]
    if not keep:
        shown = ", ".join(f"{n} {hw[0]}x{hw[1]}" if hw else f"{n} (no map)" for n, hw in sizes.items())
        raise ValueError(f"{arg}: no block has a map of at least {min_size}x{min_size} at input size "
                         f"{tuple(example_inputs.shape[-2:])} (blocks: {shown}); lower {arg} or use larger images")
    return keep
