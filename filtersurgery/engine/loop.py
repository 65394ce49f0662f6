"""The one SGD batch loop every training in the library runs through.

A multi-step phase (:func:`filtersurgery.engine.trainer.run_phase`), a growth stage
(:mod:`filtersurgery.methods.growth`) and the stand-alone SST loop
(:func:`filtersurgery.engine.sparse.train_sparse`) differ in what they do around an epoch
(resume, logging, stopping rules); the step on one batch is the same and lives here:

    loss = loss_fn(x, y); zero_grad; backward (AMP-scaled); unscale; sparsifier.step();
    optimizer step; scaler update; per-batch schedule step.

The sparsifier's L1 subgradient is added to *unscaled* gradients (after ``unscale_``), so it
is the same with and without fp16 loss scaling. Nothing here synchronises with the host:
the summed loss stays a tensor; callers check it once per epoch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple, Union

import torch

__all__ = ["sgd_batches"]


def sgd_batches(batches: Iterable, loss_fn: Callable[[Any, Any], torch.Tensor], opt: torch.optim.Optimizer, *,
                scaler: Optional[torch.amp.GradScaler] = None, sparsifier=None, sched=None,
                per_sample: bool = False) -> Tuple[Union[torch.Tensor, float], int]:
    """One pass of SGD over ``batches`` (``(x, y)`` pairs); returns ``(summed loss, count)``.

    ``count`` is the number of batches, or of samples (``len(y)``) with ``per_sample``, in
    which case each batch's mean loss is weighted by its size and summed into an fp32 tensor. ``scaler``: an AMP GradScaler
    (None: plain ``backward``/``step``); ``sparsifier``: its ``step()`` adds the L1
    subgradient after the gradients are unscaled; ``sched``: stepped after every batch.
    """
    total: Union[torch.Tensor, float] = 0.0
    count = 0
    for xb, yb in batches:
        loss = loss_fn(xb, yb)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if sparsifier is not None:
            sparsifier.step()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None:
            sched.step()
        if per_sample:  # summed into an fp32 tensor, also for a bf16/fp16 loss
            if count == 0:
                total = torch.zeros((), device=loss.device)
            total += loss.detach() * len(yb)
            count += len(yb)
        else:
            total += loss.detach()
            count += 1
    return total, count
