"""Re-estimate BatchNorm running statistics after surgery on the scaling factors.

SST moves the scaling factors at every step (and Dri re-draws them at once), so a norm's
running mean and variance, averaged over the last ~10 batches (momentum 0.1), describe
inputs that no longer exist: in eval mode every following norm then normalizes with
stale statistics and the errors compound through the network. On the demo's
``cifar:resnet8`` a proximal SST epoch that pushes every factor (SP_r = 1) left the network
at 66% validation accuracy with re-estimated statistics and at 7% with the stale ones
(docs/method.md, "Do no harm"). :func:`refresh_bn_stats` recomputes them from a pass over
training images (``torch.optim.swa_utils.update_bn``: reset, then a cumulative average),
with no gradient and every submodule's train/eval mode kept.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from filtersurgery.tracing.probe import preserve_mode

__all__ = ["refresh_bn_stats", "has_bn_stats"]


def has_bn_stats(model: nn.Module) -> bool:
    """True when ``model`` has a BatchNorm that tracks running statistics (what :func:`refresh_bn_stats` renews)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Replace every BatchNorm's running mean/variance by the average over ``batches`` (input tensors
    on the model's device, normalized as in training); returns ``model``.

    Frozen norms (``FrozenBatchNorm2d``) and norms without running statistics (GroupNorm,
    LayerNorm) are left alone; each submodule's ``training`` flag is restored on exit.
    """
    with preserve_mode(model):
        update_bn(batches, model)
    return model
