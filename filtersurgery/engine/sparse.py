"""``filtersurgery.sparsify``: the SST/BST sparsifier and, given a loader, its training loop.

The operation itself (:func:`filtersurgery.ops.sparsity.sparsify`) builds a
:class:`~filtersurgery.ops.sparsity.Sparsifier` and trains nothing; here a ``loader``
makes it train, through the engine's batch loop (:func:`~filtersurgery.engine.loop.sgd_batches`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.engine.loop import sgd_batches
from filtersurgery.ops import sparsity as _op
from filtersurgery.ops.ranking import DEFAULT_RANKING, ModelOrMap, as_scaling_map
from filtersurgery.ops.sparsity import Sparsifier
from filtersurgery.tracing.probe import device_dtype, preserve_mode

__all__ = ["sparsify", "train_sparse"]


def train_sparse(
    model: nn.Module,
    sp: Sparsifier,
    loader,
    epochs: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    loss_fn: Optional[Callable] = None,
    device=None,
) -> Sparsifier:
    """The SST/BST training loop (paper IV-B): SGD lr 0.1, momentum 0.9, wd 1e-4, cosine over ``epochs``.

    The weight decay is the paper's Tiny-ImageNet value (the setting of its Fig. 3).
    A given ``optimizer`` is used as is, with cosine annealing from its current lr.
    The model's train/eval mode is restored at the end. An epoch without batches or with a
    non-finite mean loss raises a one-line ValueError (``loader: ...`` / ``loss: ...``).

    Its batches go through the engine's one batch loop (``sgd_batches``). It has no epoch
    driver (``engine/epochs.py``) because it writes nothing: the caller owns the model, the
    loader and any checkpoints, and ``sp.history`` is its log.
    """
    device = torch.device(device) if device is not None else device_dtype(model)[0]
    loss_fn = loss_fn or F.cross_entropy
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    batch_loss = lambda x, y: loss_fn(model(x), y)  # noqa: E731
    with preserve_mode(model, train=True):
        for epoch in range(epochs):
            sp.set_epoch(epoch, epochs)
            on_device = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
            total, count = sgd_batches(on_device, batch_loss, opt, sparsifier=sp, per_sample=True)
            if count == 0:
                raise ValueError(f"loader: yielded no batches in epoch {epoch}; it must give (x, y) batches every epoch")
            sched.step()
            loss_mean = float(total) / count
            if not math.isfinite(loss_mean):  # checked once per epoch: no host sync per batch
                raise ValueError(
                    f"loss: non-finite mean training loss in epoch {epoch} (lr too high or bad data); "
                    "the weights were updated with it: reload the last good checkpoint"
                )
            sp.history[-1]["loss"] = loss_mean
    return sp


def sparsify(
    model: ModelOrMap,
    target_r: float = 0.3,
    epochs: Optional[int] = None,
    lam: float = 1e-4,
    selective: bool = True,
    e_cut_fraction: float = 1.0 / 3.0,
    zero_tol: Optional[float] = None,
    loader=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    loss_fn: Optional[Callable] = None,
    device=None,
    ranking: str = DEFAULT_RANKING,
    update: str = "subgradient",
) -> Sparsifier:
    """Selective sparsity training (multistep paper III-B, eq. 1-3; docs/method.md).

    Without ``loader`` this is the operation :func:`filtersurgery.ops.sparsity.sparsify`: a
    :class:`Sparsifier` at epoch 0 that the caller steps after each backward.

    Args:
        model: a model (traced with :func:`filtersurgery.trace`) or a ScalingMap.
        target_r: Target_r in (0, 1): the final fraction of factors driven to 0.
        epochs: E_max for the SP_r schedule; None: SP_r = Target_r from the start
            (or pass ``total`` to :meth:`Sparsifier.set_epoch`). Required with ``loader``.
        lam: lambda of the L1 subgradient (default 1e-4), in the units of ``ranking``;
            :func:`lam_for_budget` gives the lambda that can reach ``target_r`` zeros in a
            given schedule.
        selective: False gives BST (network slimming: SP_r = 1 throughout).
        e_cut_fraction: E_cut / E_max (eq. 3: 1/3); 0 gives no ramp: SP_r = Target_r from the
            first epoch, so only the final targets are ever pushed.
        zero_tol: score counted as converged for the early switch; default
            1e-2 * median score at the start.
        loader, optimizer, loss_fn, device: with a ``loader`` of ``(x, y)`` batches the SST
            training loop runs here (:func:`train_sparse`) and the trained Sparsifier is returned.
        ranking: ``"per-norm"`` (default: |gamma| over the mean |gamma| of its own norm at the
            start; the L1 push on a factor is ``lam`` times that scale) or ``"global"`` (the
            paper: |gamma| across all norms, for models whose norms share one scale).
        update: ``"subgradient"`` (default, the paper: ``lam * sign(gamma)`` added to the
            targets' gradients in :meth:`Sparsifier.step`) or ``"proximal"`` (``step()`` shrinks
            each target's |gamma| by ``lam`` times its norm scale, stopping at exactly 0, and
            drops the gradient of the targets at 0; ``lam`` is then a per-step amount in score units).

    Returns:
        a :class:`Sparsifier` (already at epoch 0; after ``epochs`` of training with a ``loader``).
    """
    sp = _op.sparsify(model, target_r, epochs, lam, selective, e_cut_fraction, zero_tol, ranking=ranking, update=update)
    if loader is not None:
        if epochs is None:
            raise ValueError("epochs: required (an integer >= 1) when a loader is given")
        net = model if isinstance(model, nn.Module) else as_scaling_map(model).module
        train_sparse(net, sp, loader, int(epochs), optimizer, loss_fn, device)
    return sp
