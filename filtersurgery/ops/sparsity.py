"""Selective sparsity training (SST) and its baseline BST — multistep paper III-B, docs/method.md §1.

``sp = filtersurgery.sparsify(model, target_r=0.3, epochs=90)`` returns a
:class:`Sparsifier`. Inside any training loop::

    for epoch in range(90):
        sp.set_epoch(epoch)        # SP_r of eq. (2)-(3); re-selects the target factors
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward()
            sp.step()              # grad += lam * sign(gamma), targets only
            opt.step()

AMP: with a ``GradScaler`` call ``scaler.unscale_(opt)`` first, then ``sp.step()``, then
``scaler.step(opt)`` (the subgradient must be added to unscaled gradients).
DDP: call ``sp.step()`` after ``backward()``; gradients are already all-reduced (identical
on every rank) and ``sign(gamma)`` is identical on every rank, so the added subgradient
is identical and the replicas stay in sync without any communication.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import warnings

from filtersurgery.ops.checks import check_target_r, fraction_count, smallest_mask
from filtersurgery.ops.ranking import (DEFAULT_RANKING, ModelOrMap, as_scaling_map, check_ranking, checked_gammas, factor_scales,
                                       factor_view)
from filtersurgery.tracing.scaling_map import ScalingMap, check_trainable


UPDATES = ("subgradient", "proximal")


def sp_ratio(epoch: int, target_r: float, e_cut: float) -> float:
    """Eq. (2): ``SP_r = (Target_r - 1) / E_cut * e + 1`` for ``e < E_cut``, else ``Target_r``."""
    if e_cut <= 0 or epoch >= e_cut:
        return float(target_r)
    return (target_r - 1.0) / e_cut * epoch + 1.0


def e_cut_of(e_max: int, e_cut_fraction: float = 1.0 / 3.0) -> float:
    """Eq. (3): ``E_cut = E_max / 3`` (``e_cut_fraction`` generalises the 1/3; 0: no ramp)."""
    return e_max * e_cut_fraction


@dataclass
class SparsityConfig:
    """Options of :func:`sparsify` (defaults: docs/method.md §1)."""

    target_r: float = 0.3
    epochs: Optional[int] = None  # E_max; None: SP_r = Target_r from the start
    lam: float = 1e-4  # lambda of the L1 subgradient (network slimming's CIFAR value)
    selective: bool = True  # False: BST (network slimming), SP_r = 1 throughout
    e_cut_fraction: float = 1.0 / 3.0
    zero_tol: Optional[float] = None  # "converged" score; None: 1e-2 * median score at start
    ranking: str = DEFAULT_RANKING  # how factors of different norms are compared (ranking.RANKINGS)
    # how the L1 penalty acts on the targets: "subgradient" (the paper: lam * sign(gamma) added to the
    # gradient) or "proximal" (each step shrinks |gamma| of a target by lam * scale, stopping at exactly 0)
    update: str = "subgradient"
    # proximal only: at every epoch start lam is raised (never lowered) when the largest final target could not
    # reach 0 by this fraction of E_max (by the next epoch's end once past it); None: lam stays as given
    catch_up: Optional[float] = None

    def validate(self) -> "SparsityConfig":
        """One-line ValueError naming the bad option and its allowed range; returns ``self``."""
        self.target_r = check_target_r(self.target_r)
        check_ranking(self.ranking)
        if self.epochs is not None and (int(self.epochs) != self.epochs or self.epochs < 1):
            raise ValueError(f"epochs: must be None or an integer >= 1, got {self.epochs!r}")
        if not (self.lam >= 0.0 and self.lam < float("inf")):
            raise ValueError(f"lam: must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.e_cut_fraction, (int, float)) and 0.0 <= self.e_cut_fraction <= 1.0):
            raise ValueError(f"e_cut_fraction: must be in [0, 1], got {self.e_cut_fraction!r}")
        if self.zero_tol is not None and not self.zero_tol >= 0.0:
            raise ValueError(f"zero_tol: must be None or >= 0, got {self.zero_tol!r}")
        if self.update not in UPDATES:
            raise ValueError(f"update: must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.catch_up is not None and not (isinstance(self.catch_up, (int, float)) and 0 < self.catch_up <= 1):
            raise ValueError(f"catch_up: must be None or in (0, 1], got {self.catch_up!r}")
        return self


class Sparsifier:
    """Adds ``lam * sign(gamma)`` to the gradients of the target scaling factors (SST / BST).

    Attributes:
        sp_r: the current SP_r (eq. 2; 1 for BST; ``Target_r`` after the early switch).
        targets: per-*factor* boolean mask (global factor order of ``scaling_map.factors``;
            ``factors.locate(k)`` gives ``(norm, channel)``): the smallest ``SP_r`` fraction
            by score, re-selected by :meth:`set_epoch`. A factor reached by several conv
            paths is one entry.
        scales: per-factor norm scale fixed at construction (``ranking``: 1 for
            ``"global"``, the mean |gamma| of the factor's norm for ``"per-norm"``); the score
            of a factor is ``|gamma| / scale`` and the L1 push on it is ``lam * scale``, so
            ``lam`` and ``zero_tol`` are in the ranking's units.
        switched: True once the early switch fired (sticky); ``switch_epoch``
            is the epoch at whose start it fired (None if it has not).
        zero_tol: score at or below which a factor counts as converged to 0.
        n_converged_at_start: factors already converged when SST began (e.g. zero-initialised
            norms under the global ranking); when they alone reach ``Target_r`` the early
            switch fires at epoch 0 and a warning says so.
        history: one dict per :meth:`set_epoch` call (epoch, sp_r, n_targets, n_converged).
    """

    def __init__(self, scaling_map: ScalingMap, config: SparsityConfig):
        self.config = config.validate()
        self.scaling_map = scaling_map
        self.factors = factor_view(scaling_map)
        check_trainable(scaling_map, "sparsify")  # frozen gammas get no gradient: refuse, name the fix
        g = checked_gammas(self.factors).abs()
        self.n = g.numel()
        self.scales = factor_scales(self.factors, config.ranking, g)
        scores = g / self.scales
        self.zero_tol = float(config.zero_tol) if config.zero_tol is not None else 1e-2 * float(scores.median())
        self.n_converged_at_start = int((scores <= self.zero_tol).sum())
        self._params: List[nn.Parameter] = list(self.factors.params)
        self._chan = [c.to(p.device) for p, c in zip(self._params, self.factors.channels)]
        self.epoch = 0
        self.total = config.epochs
        self.switched = False
        self.switch_epoch: Optional[int] = None
        self.sp_r = 1.0
        self.targets = torch.zeros(self.n, dtype=torch.bool)
        self.history: List[Dict[str, Any]] = []
        self._active: List[int] = []
        self._masks: List[torch.Tensor] = []
        self._free: List[torch.Tensor] = []
        self.lam = float(config.lam)  # the L1 strength now (config.lam, raised by the proximal catch-up)
        self.steps_per_epoch, self._steps = 0, 0  # steps of the last full epoch; steps of this one so far
        self.set_epoch(0)
        self.history.clear()

    # ------------------------------------------------------------- schedule
    @property
    def target_r(self) -> float:
        """Target_r: the fraction of factors that SST drives to 0 (``config.target_r``)."""
        return self.config.target_r

    def scheduled_sp_r(self, epoch: int, total: Optional[int] = None) -> float:
        """SP_r at ``epoch`` from eq. (2)-(3) alone (no early switch)."""
        if not self.config.selective:
            return 1.0
        total = total if total is not None else self.total
        if total is None:
            return self.target_r
        return sp_ratio(epoch, self.target_r, e_cut_of(total, self.config.e_cut_fraction))

    @torch.no_grad()
    def set_epoch(self, epoch: int, total: Optional[int] = None) -> float:
        """Start epoch ``epoch`` (0-based): update SP_r, apply the early switch, re-select targets.

        ``total`` (E_max) overrides ``epochs`` given at construction. One host-device sync
        per call (to rank the gammas); :meth:`step` has none. Returns the new SP_r.
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch: must be an integer >= 0, got {epoch!r}")
        if total is not None and (int(total) != total or total < 1):
            raise ValueError(f"total: must be None or an integer >= 1, got {total!r}")
        g = self.scores()  # NaN/Inf gammas: raise before any state changes
        if total is not None:
            self.total = int(total)
        self.epoch = int(epoch)
        n_conv = int((g <= self.zero_tol).sum())
        k = fraction_count(self.target_r, self.n)
        if self.config.selective and not self.switched and n_conv >= k:
            self.switched, self.switch_epoch = True, self.epoch  # early switch: Target_r already ~0
            if self.n_converged_at_start >= k:
                warnings.warn(
                    f"sparsify: early switch at epoch {self.epoch}: {self.n_converged_at_start} of {self.n} factors "
                    f"were already <= zero_tol before SST began (zero-initialised or untrained norms?), so SST "
                    f"creates no useless filters of its own; ranking='per-norm' compares each factor with its own norm",
                    stacklevel=2)
        self.sp_r = self.target_r if self.switched else self.scheduled_sp_r(self.epoch)
        self._catch_up(g, k)
        self._select(smallest_mask(g, self.sp_r))
        self.history.append({"epoch": self.epoch, "sp_r": self.sp_r, "n_targets": int(self.targets.sum()),
                             "n_converged": n_conv, "lam": self.lam})
        return self.sp_r

    def _catch_up(self, scores: torch.Tensor, k: int) -> None:
        """Proximal update with ``config.catch_up``: raise ``lam`` (never lower it) so that the largest of the
        ``k`` smallest scores, shrunk by ``lam`` per step at the step rate of the epoch just ended, reaches 0 by
        ``catch_up * E_max`` (by the end of this epoch once that is past). Counts the steps of the new epoch."""
        steps, self._steps = self._steps, 0
        if steps > 0:
            self.steps_per_epoch = steps
        c = self.config
        if c.update != "proximal" or c.catch_up is None or not c.selective or not self.total or not self.steps_per_epoch:
            return
        left = max(c.catch_up * self.total - self.epoch, 1.0)  # epochs to the deadline, at least this one
        largest = float(torch.sort(scores).values[k - 1]) if k > 0 else 0.0
        self.lam = max(self.lam, largest / (left * self.steps_per_epoch))

    def scores(self) -> torch.Tensor:
        """Every factor's score ``|gamma| / scale`` now (ranking units; NaN/Inf raise)."""
        g = checked_gammas(self.factors).abs()
        return g / self.scales.to(g.device)

    def _select(self, targets: torch.Tensor) -> None:
        """Cache ``lam * scale * mask`` per norm weight that holds at least one target (and, for the
        proximal update, ``1 - mask``: the channels whose gradient is always kept).

        Ramp-aware push: a target that is one only because ``SP_r > Target_r`` (outside the ``Target_r``
        smallest scores now) gets ``config.lam``, not the ``lam`` the catch-up raised for the final targets,
        so that a catch-up firing during the ramp cannot zero live factors before ``E_cut`` (docs/method.md §1)."""
        self.targets = targets.cpu()
        self._active, self._masks, self._free = [], [], []
        lam = torch.full((self.n,), self.lam)
        if self.lam > self.config.lam and self.sp_r > self.target_r:
            final = smallest_mask(self.scores().cpu(), self.target_r)
            lam[~final] = float(self.config.lam)
        push = lam * self.scales.cpu()
        for i, (p, off, c) in enumerate(zip(self._params, self.factors.offsets, self._chan)):
            t = self.targets[off : off + c.numel()]
            if not bool(t.any()):
                continue
            m = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            m[c[t.to(c.device)]] = push[off : off + c.numel()][t].to(device=p.device, dtype=p.dtype)
            self._active.append(i)
            self._masks.append(m)
            self._free.append((m == 0).to(p.dtype))
        self._active_params = [self._params[i] for i in self._active]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> None:
        """Add the L1 subgradient ``lam * sign(gamma)`` to the targets' gradients (eq. 1, targets only).

        Call after ``backward()`` and before ``optimizer.step()``. Multi-tensor (foreach)
        kernels, no Python loop over modules, no host-device synchronisation: NaN/Inf gammas
        are therefore not looked for here but at the next :meth:`set_epoch` (which ranks
        them and raises a one-line ValueError). If the model was moved or cast after
        :func:`sparsify` (``model.cuda()``, ``model.half()``), the cached masks follow it.
        """
        self._steps += 1
        if not self._active_params:
            return
        if any(m.device != p.device or m.dtype != p.dtype for m, p in zip(self._masks, self._active_params)):
            self._chan = [c.to(p.device) for p, c in zip(self._params, self.factors.channels)]
            self._select(self.targets)
        grads = [p.grad for p in self._active_params]
        if any(gr is None for gr in grads):
            name = self.factors.norms[self._active[[gr is None for gr in grads].index(True)]]
            raise ValueError(f"step: scaling factor {name}.weight has no gradient; call step() after loss.backward()")
        if self.config.update == "proximal":
            self._proximal(grads)
            return
        signs = torch._foreach_sign(self._active_params)
        torch._foreach_addcmul_(grads, signs, self._masks)

    def _proximal(self, grads: List[torch.Tensor]) -> None:
        """Soft-threshold the targets: ``gamma <- sign(gamma) * max(|gamma| - lam * scale, 0)`` (the
        proximal step of the L1 term), and drop the gradient of every target that sits at exactly 0
        (so the optimizer step does not lift it again; a factor that leaves the targets gets it back)."""
        ps = self._active_params
        new = torch._foreach_abs(ps)
        torch._foreach_sub_(new, self._masks)
        torch._foreach_clamp_min_(new, 0.0)
        keep = torch._foreach_sign(new)  # 1 where the new |gamma| > 0
        torch._foreach_add_(keep, self._free)  # non-targets always keep their gradient
        torch._foreach_clamp_max_(keep, 1.0)
        torch._foreach_mul_(new, torch._foreach_sign(ps))
        torch._foreach_mul_(grads, keep)
        torch._foreach_copy_(ps, new)

    # --------------------------------------------------------------- results
    def useless(self) -> torch.Tensor:
        """Per-factor mask of the ``Target_r`` fraction with the smallest score now."""
        return smallest_mask(self.scores(), self.target_r)

    def converged(self) -> torch.Tensor:
        """Per-factor mask of score <= ``zero_tol``."""
        return self.scores() <= self.zero_tol

    @torch.no_grad()
    def project(self) -> Dict[str, float]:
        """Set the ``ceil(Target_r * n)`` factors with the smallest score to exactly 0 (SST's end: eq. 1's goal,
        ``Target_r`` of the factors at 0, made exact). Returns ``{"projected": how many of them were above
        zero_tol, "projected_max": the largest score set to 0}``: both near 0 when the L1 did its work."""
        s = self.scores()
        k = math.ceil(self.target_r * self.n - 1e-9)
        mask = smallest_mask(s, self.target_r, k)
        moved = {"projected": int((mask & (s > self.zero_tol)).sum()),
                 "projected_max": float(s[mask].max()) if k > 0 else 0.0}
        mask = mask.cpu()
        for p, off, c in zip(self._params, self.factors.offsets, self._chan):
            m = mask[off : off + c.numel()]
            if bool(m.any()):
                p[c[m.to(c.device)]] = 0.0
        return moved

    def final_targets_converged(self) -> bool:
        """True when the ``ceil(Target_r * n)`` factors with the smallest score are all at or below ``zero_tol``
        (:meth:`project` would then move none that the L1 had not already brought to 0)."""
        k = math.ceil(self.target_r * self.n - 1e-9)
        return k == 0 or float(torch.sort(self.scores()).values[k - 1]) <= self.zero_tol

    def zero_fraction(self) -> float:
        """Fraction of the factors at or below ``zero_tol`` now (SST's goal: >= ``Target_r``)."""
        return float(self.converged().float().mean())

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the schedule (not the gammas: those live in the model)."""
        return {
            "config": asdict(self.config),
            "zero_tol": self.zero_tol,
            "epoch": self.epoch,
            "total": self.total,
            "switched": self.switched,
            "switch_epoch": self.switch_epoch,
            "scales": self.scales.detach().cpu().clone(),
            "n_converged_at_start": self.n_converged_at_start,
            "sp_r": self.sp_r,
            "targets": self.targets.clone(),
            "history": list(self.history),
            "lam": self.lam,
            "steps_per_epoch": self.steps_per_epoch,
            "steps": self._steps,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the target set is restored as saved (not re-ranked)."""
        tg = state["targets"]
        if tg.numel() != self.n:
            raise ValueError(f"state: targets has {tg.numel()} factors, this model has {self.n}")
        self.config = SparsityConfig(**state["config"]).validate()
        if "scales" in state:  # the scales of SST's start, not of the gammas now
            self.scales = state["scales"].to(self.scales.device, self.scales.dtype)
        self.n_converged_at_start = int(state.get("n_converged_at_start", self.n_converged_at_start))
        self.zero_tol = float(state["zero_tol"])
        self.epoch = int(state["epoch"])
        self.total = state["total"]
        self.switched = bool(state["switched"])
        self.switch_epoch = state.get("switch_epoch")
        self.sp_r = float(state["sp_r"])
        self.history = list(state.get("history", []))
        self.lam = float(state.get("lam", self.config.lam))
        self.steps_per_epoch = int(state.get("steps_per_epoch", 0))
        self._steps = int(state.get("steps", 0))
        self._select(tg.to(torch.bool))

    def __repr__(self) -> str:
        kind = "SST" if self.config.selective else "BST"
        return (
            f"Sparsifier({kind}, target_r={self.target_r}, sp_r={self.sp_r:.3f}, epoch={self.epoch}, "
            f"targets={int(self.targets.sum())}/{self.n}, lam={self.lam:.4g}, ranking={self.config.ranking!r}, "
            f"switched={self.switched})"
        )


def sparsify(
    model: ModelOrMap,
    target_r: float = 0.3,
    epochs: Optional[int] = None,
    lam: float = 1e-4,
    selective: bool = True,
    e_cut_fraction: float = 1.0 / 3.0,
    zero_tol: Optional[float] = None,
    ranking: str = DEFAULT_RANKING,
    update: str = "subgradient",
) -> Sparsifier:
    """Selective sparsity training (multistep paper III-B, eq. 1-3; docs/method.md): the Sparsifier.

    The operation trains nothing; :func:`filtersurgery.sparsify` (``engine/sparse.py``) takes a
    ``loader`` too and then runs the SST loop.

    Arguments: as :func:`filtersurgery.sparsify` (``engine/sparse.py``) without the loader ones.

    Returns:
        a :class:`Sparsifier` (already at epoch 0).
    """
    sm = as_scaling_map(model)
    cfg = SparsityConfig(target_r, epochs, lam, selective, e_cut_fraction, zero_tol, ranking, update)
    return Sparsifier(sm, cfg)


def lam_for_budget(model: ModelOrMap, target_r: float, lr: float, steps: int, momentum: float = 0.9,
                   safety: float = 2.0, ranking: str = DEFAULT_RANKING, update: str = "subgradient") -> float:
    """The ``lam="auto"`` rule: the lambda whose L1 push can carry the ``Target_r`` quantile to 0.

    Under PyTorch's SGD with momentum ``mu`` (``v = mu * v + g; p -= lr_t * v``) and a
    per-step cosine schedule ``lr_t = lr * (1 + cos(pi * t / steps)) / 2``, a constant
    subgradient ``lam`` moves a factor by ``D = lam * sum_t lr_t * (1 - mu**(t + 1)) / (1 - mu)``
    (about ``lam * lr * steps / (2 * (1 - mu))`` for long schedules: the cosine averages to
    ``lr / 2`` and momentum multiplies a constant gradient by ``1 / (1 - mu)`` once warmed
    up). The rule asks ``D = safety * q`` with ``q`` the score at the ``target_r`` quantile
    now (the largest score the final targets start from). ``safety`` covers the
    cross-entropy gradient that pushes back and the ramp of SP_r. The result is in the
    units of ``ranking`` (the Sparsifier multiplies it by each factor's norm scale).

    ``update="proximal"``: each of the ``steps`` steps shrinks a target by exactly ``lam``, so
    ``D = lam * steps`` and ``lam = safety * q / steps``, whatever ``lr`` and ``momentum`` are
    (``safety = 1.5``: the largest final target reaches 0 after two thirds of the steps).
    """
    target_r = check_target_r(target_r)
    check_ranking(ranking)
    if update not in UPDATES:
        raise ValueError(f"update: must be one of {', '.join(UPDATES)}, got {update!r}")
    for name, v, ok in (("lr", lr, lr > 0), ("steps", steps, steps >= 1), ("momentum", momentum, 0 <= momentum < 1),
                        ("safety", safety, safety > 0)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and ok):
            raise ValueError(f"{name}: out of range, got {v!r} (lr > 0, steps >= 1, 0 <= momentum < 1, safety > 0)")
    fv = factor_view(model)
    g = checked_gammas(fv).abs()
    scores = g / factor_scales(fv, ranking, g)
    q = float(torch.quantile(scores.double().cpu(), target_r))
    if update == "proximal":
        return safety * q / int(steps)
    t = torch.arange(int(steps), dtype=torch.float64)
    lr_t = lr * (1 + torch.cos(math.pi * t / int(steps))) / 2
    per_lam = float((lr_t * (1 - momentum ** (t + 1)) / (1 - momentum)).sum())
    return safety * q / per_lam


__all__ = ["Sparsifier", "SparsityConfig", "sparsify", "sp_ratio", "e_cut_of", "lam_for_budget", "UPDATES"]
