"""Per-epoch callbacks for any training loop: kernel reactivation, Weight Evolution and filter
grafting every ``period`` epochs (docs/method.md §5, §9).

Each is called once per epoch, after the epoch (``cb(lr, epoch=None)``), and returns the
operation's report when it acted, else None; :func:`report_row` turns a report into the
items of a log row. The trainer's methods (``methods/reactivation.py``) use them through a
phase's ``epoch_end``; a user's own loop calls them directly.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from filtersurgery.ops.filter_grafting import GraftReport, graft
from filtersurgery.ops.checks import check_fraction
from filtersurgery.ops.reactivation import KernelReactivation, ReactivationReport
from filtersurgery.ops.weight_evolution import EvolutionReport, evolve_weights

__all__ = ["ReactivationCallback", "WeightEvolutionCallback", "GraftingCallback", "report_row"]


def _next_epoch(cb, epoch: Optional[int]) -> int:
    """0-based index of the epoch that just ended: ``epoch`` if given, else the callback's own count."""
    e = cb.epoch if epoch is None else epoch
    if isinstance(e, bool) or int(e) != e or e < 0:
        raise ValueError(f"epoch: must be an integer >= 0 (0-based, the epoch that just ended), got {epoch!r}")
    cb.epoch = int(e) + 1
    return int(e)


def _check_period(period) -> int:
    if isinstance(period, bool) or int(period) != period or period < 1:
        raise ValueError(f"period: must be an integer >= 1, got {period!r}")
    return int(period)


class ReactivationCallback(KernelReactivation):
    """Kernel reactivation for a user's loop: call once per epoch, after the epoch, with the current lr.

    ::

        cb = ReactivationCallback(model, period=10, lr0=0.1)   # alpha=0.2, beta=0.3, gamma=0.1
        for epoch in range(epochs):
            train_one_epoch(...)
            cb(scheduler.get_last_lr()[0])   # reactivates after epochs E, 2E, ... (1-based)

    ``gamma_t = gamma * lr / lr0`` (docs/method.md §5); ``lr0`` defaults to the lr of the first
    call. ``cb(lr, epoch=e)`` names the 0-based epoch that just ended (after a resume);
    without it the callback counts its calls. Returns the
    :class:`~filtersurgery.ops.reactivation.ReactivationReport` when it reactivated, else None;
    all reports are in ``history``.
    """

    def __init__(self, model: nn.Module, period: int = 10, alpha: float = 0.2, beta: float = 0.3,
                 gamma: float = 0.1, lr0: Optional[float] = None):
        super().__init__(model, alpha=alpha, beta=beta, gamma=gamma, period=_check_period(period))
        if lr0 is not None and not float(lr0) > 0:
            raise ValueError(f"lr0: must be > 0, got {lr0!r}")
        self.lr0 = None if lr0 is None else float(lr0)
        self.epoch = 0

    def __call__(self, lr: float, epoch: Optional[int] = None) -> Optional[ReactivationReport]:
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise ValueError(f"lr: must be a number >= 0 (the current learning rate), got {lr!r}") from None
        if not lr >= 0:
            raise ValueError(f"lr: must be >= 0, got {lr!r}")
        if self.lr0 is None:
            if not lr > 0:
                raise ValueError("lr0: not given and the first lr is 0; pass lr0= the initial learning rate")
            self.lr0 = lr
        return self.on_epoch_end(_next_epoch(self, epoch), lr, self.lr0)


class WeightEvolutionCallback:
    """Weight Evolution (:func:`~filtersurgery.ops.weight_evolution.evolve_weights`) every ``period`` epochs.

    Call once per epoch, after the epoch: ``cb(lr=None, epoch=None)`` (the lr is not used);
    returns the :class:`~filtersurgery.ops.weight_evolution.EvolutionReport` or None.
    """

    def __init__(self, model: nn.Module, period: int = 10, alpha: float = 0.2, beta: float = 0.3):
        for n, v in (("alpha", alpha), ("beta", beta)):
            check_fraction(n, v)
        self.model, self.alpha, self.beta, self.period = model, alpha, beta, _check_period(period)
        self.epoch = 0
        self.history: List[EvolutionReport] = []

    def __call__(self, lr: Optional[float] = None, epoch: Optional[int] = None) -> Optional[EvolutionReport]:
        if (_next_epoch(self, epoch) + 1) % self.period:
            return None
        rep = evolve_weights(self.model, self.alpha, self.beta)
        self.history.append(rep)
        return rep


class GraftingCallback:
    """Filter grafting of two networks (:func:`~filtersurgery.ops.filter_grafting.graft`) every ``period`` epochs.

    Train ``model_a`` and ``model_b`` side by side (each with its own optimizer) and call
    ``cb(lr=None, epoch=None)`` once per epoch, after the epoch; returns the
    :class:`~filtersurgery.ops.filter_grafting.GraftReport` or None.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, period: int = 1, a: float = 0.4, c: float = 500.0,
                 bins: int = 10):
        check_fraction("a", a)
        if not float(c) > 0:
            raise ValueError(f"c: must be > 0, got {c!r}")
        self.model_a, self.model_b, self.period = model_a, model_b, _check_period(period)
        self.a, self.c, self.bins = float(a), float(c), bins
        self.epoch = 0
        self.history: List[GraftReport] = []

    def __call__(self, lr: Optional[float] = None, epoch: Optional[int] = None) -> Optional[GraftReport]:
        if (_next_epoch(self, epoch) + 1) % self.period:
            return None
        rep = graft(self.model_a, self.model_b, a=self.a, c=self.c, bins=self.bins)
        self.history.append(rep)
        return rep


def report_row(rep) -> Dict:
    """The per-epoch log items (``epochs.csv`` column ``extra``) of a callback's report."""
    if rep is None:
        return {}
    if isinstance(rep, ReactivationReport):
        return {"react_filters": rep.invalid_filters, "react_kernels": rep.kernels, "gamma_t": round(rep.gamma_t, 6)}
    if isinstance(rep, EvolutionReport):
        return {"we_filters": rep.invalid_filters, "we_weights": rep.weights}
    if isinstance(rep, GraftReport):
        return {"graft_layers": len(rep.layers), "graft_coef_mean": round(rep.mean_coef_a, 4)}
    raise ValueError(f"rep: unknown report type {type(rep).__name__}")
