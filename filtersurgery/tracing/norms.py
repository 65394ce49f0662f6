"""Frozen batch norms <-> trainable ones: ``unfreeze_norms`` and ``freeze_norms``.

Every pretrained torchvision detection model with a ResNet backbone (Faster R-CNN,
RetinaNet, Mask R-CNN, keypoint R-CNN, FCOS) builds that backbone with
``torchvision.ops.FrozenBatchNorm2d`` (built without weights it uses ``nn.BatchNorm2d``),
and timm offers ``freeze_batch_norm_2d`` for the same purpose: the normalization weights
(gamma, the scaling factors) are buffers, not parameters. The tracer maps them, marked
frozen; operations that need their gradient (``sparsify``, training) refuse them
(:func:`filtersurgery.tracing.scaling_map.check_trainable`). These two functions convert between
the frozen and the trainable form, leaving eval-mode outputs unchanged.

Each norm is converted by timm's own converters (``timm.layers.freeze_batch_norm_2d`` /
``unfreeze_batch_norm_2d``), one module at a time, so that

* a norm module used at several places stays one module (shared norms keep sharing);
* the new module lives on the old one's device and dtype (timm builds it on the CPU);
* its train/eval mode, and the BatchNorm ``momentum`` across a freeze/unfreeze round trip,
  are kept;
* torchvision's own ``FrozenBatchNorm2d`` (which lacks the ``num_features``/``affine``
  attributes timm's converter reads) is handled too.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from filtersurgery.tracing.scaling_map import unwrap

__all__ = ["unfreeze_norms", "freeze_norms"]

_DEFAULT_MOMENTUM = 0.1  # nn.BatchNorm2d's default, for frozen norms that never had one


def _timm_norm_act():
    """timm's ``(BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d, freeze, unfreeze)``."""
    from timm.layers import norm_act

    return (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct, norm_act.FrozenBatchNormAct2d,
            norm_act.freeze_batch_norm_2d, norm_act.unfreeze_batch_norm_2d)


def _is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` or timm's ``FrozenBatchNormAct2d`` (what we can unfreeze)."""
    return isinstance(m, (FrozenBatchNorm2d, _timm_norm_act()[2]))


def _is_trainable_bn(m: nn.Module) -> bool:
    """``BatchNorm2d`` / ``SyncBatchNorm`` (exact classes) or timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``."""
    bn_act, sync_act = _timm_norm_act()[:2]
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) or isinstance(m, (bn_act, sync_act))


def _placed_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and floating dtype, in ``old``'s train/eval mode."""
    ref = old.weight if isinstance(getattr(old, "weight", None), torch.Tensor) else old.running_mean
    new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


def _unfreeze_one(m: nn.Module) -> nn.Module:
    """A trainable BatchNorm2d / BatchNormAct2d holding ``m``'s statistics and affine values."""
    unfreeze = _timm_norm_act()[4]
    if not hasattr(m, "num_features"):  # torchvision's own FrozenBatchNorm2d: timm reads these
        m.num_features = int(m.weight.numel())
    if not hasattr(m, "affine"):
        m.affine = True  # its weight and bias always apply
    new = unfreeze(m)
    new.momentum = getattr(m, "momentum", _DEFAULT_MOMENTUM)
    return _placed_like(new, m)


def _freeze_one(m: nn.Module) -> nn.Module:
    """A frozen copy of ``m`` (timm's converter); remembers ``m.momentum`` for :func:`unfreeze_norms`."""
    freeze = _timm_norm_act()[3]
    new = freeze(m)
    new.momentum = m.momentum
    return _placed_like(new, m)


def _convert(model: nn.Module, select: Callable[[nn.Module], bool], convert: Callable[[nn.Module], nn.Module],
             skip: Callable[[nn.Module], str]) -> Tuple[nn.Module, int, Dict[str, List[str]]]:
    """Replace every module ``select`` accepts by ``convert(module)``, in place; one new module per old one.

    ``skip(m)`` returns a reason (non-empty) for a selected module that must be left as it
    is. Returns ``(model or its replacement, converted count, {reason: [names]})``.
    """
    net = unwrap(model)
    done: Dict[nn.Module, nn.Module] = {}
    skipped: Dict[str, List[str]] = {}
    for name, m in list(net.named_modules(remove_duplicate=False)):
        if not select(m) or m in done:
            continue
        why = skip(m)
        if why:
            skipped.setdefault(why, []).append(name or "<model>")
            continue
        done[m] = convert(m)
    if net in done:  # the model itself is a norm
        return done[net], len(done), skipped
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if child in done:
                setattr(parent, child_name, done[child])
    return model, len(done), skipped


def _warn_skipped(what: str, skipped: Dict[str, List[str]]) -> None:
    for why, names in skipped.items():
        warnings.warn(f"{what}: left {len(names)} norm(s) as they are ({why}), first: {names[0]}", stacklevel=3)


def _frozen_skip(m: nn.Module) -> str:
    if not _is_frozen_bn(m):
        return f"{type(m).__name__} is not torchvision's FrozenBatchNorm2d or timm's FrozenBatchNormAct2d"
    return ""


def _looks_frozen(m: nn.Module) -> bool:
    return type(m).__name__.startswith("FrozenBatchNorm")


def unfreeze_norms(model: nn.Module) -> nn.Module:
    """Make every frozen batch norm of ``model`` trainable, in place; returns ``model``.

    torchvision's ``FrozenBatchNorm2d`` becomes ``nn.BatchNorm2d`` and timm's
    ``FrozenBatchNormAct2d`` becomes timm's ``BatchNormAct2d`` (same activation and drop
    modules), with the same weight, bias, running statistics and ``eps``, on the same
    device and dtype, in the same train/eval mode: outputs in eval mode are unchanged (up
    to float rounding: ``x * scale + shift`` vs ``(x - mean) / std * gamma + beta``). The
    gammas become ``nn.Parameter``s: build the optimizer afterwards. ``momentum`` is the one
    the norm had before :func:`freeze_norms`, else 0.1. In train mode the new norms use
    batch statistics and update their running statistics, as any BatchNorm does; keep them
    in eval mode (``m.eval()`` per norm) to train gammas on frozen statistics.

    ``DataParallel``/DDP/``torch.compile`` wrappers are looked through; a norm used at
    several places stays one module. A ScalingMap traced before stays valid (same names,
    same channels): its factor view follows the new modules. When ``model`` itself is a
    frozen norm, the new norm is returned. Other classes named ``FrozenBatchNorm*`` are left
    as they are, with a warning; a model without any frozen norm is returned unchanged,
    with a warning.
    """
    return _convert_all("unfreeze_norms", model, _looks_frozen, _unfreeze_one, _frozen_skip,
                        "has no frozen batch norm; nothing to unfreeze")


def _bn_skip(m: nn.Module) -> str:
    if not _is_trainable_bn(m):
        return f"{type(m).__name__} is a BatchNorm2d subclass that timm's freeze_batch_norm_2d would not reproduce"
    if m.running_mean is None or m.running_var is None:
        return "track_running_stats=False: eval mode uses batch statistics, nothing to freeze"
    return ""


def _is_any_bn2d(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))


def freeze_norms(model: nn.Module) -> nn.Module:
    """The inverse of :func:`unfreeze_norms`: make every BatchNorm2d of ``model`` frozen, in place; returns ``model``.

    ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` become torchvision's ``FrozenBatchNorm2d``
    and timm's ``BatchNormAct2d`` becomes ``FrozenBatchNormAct2d`` (timm's
    ``freeze_batch_norm_2d``), with the same weight, bias, running statistics and ``eps``:
    eval-mode outputs are unchanged (up to float rounding), and train-mode outputs become
    the eval-mode ones (frozen statistics). ``unfreeze_norms(freeze_norms(m))`` gives back
    norms with bit-identical state (``num_batches_tracked`` restarts at 0; a
    ``SyncBatchNorm`` comes back as ``BatchNorm2d``; an ``affine=False`` norm as an affine
    one with gamma 1, beta 0). The gammas become buffers: an optimizer built before holds
    stale parameters. Wrappers, shared norms, the device, dtype and a ScalingMap traced
    before are handled as by :func:`unfreeze_norms`. Norms without running statistics
    (``track_running_stats=False``) and other ``BatchNorm2d`` subclasses are left as they
    are, with a warning; so is a model without any BatchNorm2d.
    """
    return _convert_all("freeze_norms", model, _is_any_bn2d, _freeze_one, _bn_skip,
                        "has no BatchNorm2d; nothing to freeze")


def _convert_all(op: str, model: nn.Module, select, convert, skip, nothing: str) -> nn.Module:
    """Run :func:`_convert` for ``op``, warning about skipped norms and about a model with none to convert."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    out, n, skipped = _convert(model, select, convert, skip)
    _warn_skipped(op, skipped)
    if n == 0 and not skipped:
        warnings.warn(f"{op}: {type(unwrap(model)).__name__} {nothing}", stacklevel=3)
    return out
