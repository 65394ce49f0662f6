"""The epoch driver: what every resumable training does around its batches, written once.

Both the trainer's phases (:func:`filtersurgery.engine.trainer.run_phase`: the multi-step
framework and its baselines, and the single-run methods with their per-epoch callbacks)
and growth's stages (``methods/growth.py``) run their epochs through :func:`run_epochs`:

* one epoch is ``one_epoch(epoch) -> row`` (train with
  :func:`~filtersurgery.engine.loop.sgd_batches`, validate, fill the ``epochs.csv`` row);
* after it the resumable state is saved, after every epoch or, with ``state_every > 0``, at
  most every ``state_every`` seconds and always after the last epoch;
* only then are the rows of the epochs that state covers appended to ``epochs.csv``, so a
  killed run re-run with the same arguments neither loses nor repeats a row;
* the loop ends when ``done(epoch)`` is true: a fixed number of epochs, or a rule that reads
  the curve so far (growth's termination rule).

:func:`save_training_state` / :func:`restore_rng` put the global RNG and the augmentation
generator into, and back from, the state file the same way for every caller, and
:func:`check_finite_loss` is the once-per-epoch guard (no host sync per batch).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from filtersurgery.engine import checkpoint

__all__ = ["run_epochs", "save_training_state", "restore_rng", "check_finite_loss"]


def run_epochs(start: int, done: Callable[[int], bool], one_epoch: Callable[[int], Dict],
               save: Callable[[int], None], log: Callable[[Dict], None], state_every: float = 0.0) -> int:
    """Run epochs ``start, start + 1, ...`` until ``done(epoch)``; returns the first epoch not run.

    After epoch ``e`` (``row = one_epoch(e)``) the state is saved with ``save(e)`` when it is
    due (``state_every <= 0``: every epoch; else when ``state_every`` seconds have passed since
    the last save, or ``done(e + 1)``), and then every row held back since the last save is
    passed to ``log`` in order. ``done`` is asked again after each epoch, so it may read what
    the epoch recorded.
    """
    if not (math.isfinite(state_every) and state_every >= 0):
        raise ValueError(f"state_every: must be a finite number of seconds >= 0, got {state_every}")
    pending: List[Dict] = []  # rows of epochs no saved state covers yet
    saved_at = time.time()
    epoch = start
    while not done(epoch):
        pending.append(one_epoch(epoch))
        epoch += 1
        if state_every <= 0 or done(epoch) or time.time() - saved_at >= state_every:
            save(epoch - 1)
            for row in pending:  # after the state: a kill never duplicates a row
                log(row)
            pending, saved_at = [], time.time()
    return epoch


def save_training_state(path: Path, model_state: Mapping[str, torch.Tensor], optimizer: Optional[Mapping],
                        extra: Dict[str, Any], gen: Optional[torch.Generator] = None) -> None:
    """Write the resumable state: ``model_state``, the optimizer's state dict and ``extra`` plus the
    global RNG states (``extra["rng"]``) and, when given, the augmentation generator's (``extra["gen"]``)."""
    extra = {**extra, "rng": checkpoint.rng_state()}
    if gen is not None:
        extra["gen"] = gen.get_state()
    checkpoint.save_training_state(path, dict(model_state), optimizer, extra)


def restore_rng(extra: Mapping[str, Any], gen: Optional[torch.Generator] = None) -> None:
    """Set the global RNGs (and ``gen``, when given) to a state written by :func:`save_training_state`
    (a state saved without the generator's is a KeyError naming it)."""
    checkpoint.set_rng_state(extra["rng"])
    if gen is not None:
        gen.set_state(extra["gen"])


def check_finite_loss(total: Union[torch.Tensor, float], where: str, state_path: Path) -> None:
    """One-line RuntimeError when an epoch's summed loss is NaN or infinite (read once per epoch).

    ``where`` names the epoch (``"step 2 phase sst epoch 3"``); the message says where the
    last saved state is (the weights in memory were updated with the bad loss)."""
    if not math.isfinite(float(total)):
        raise RuntimeError(f"non-finite loss at {where}; the last saved state (an earlier epoch) is kept in {state_path}")
