"""Kernel reactivation as a training method, with its baselines (docs/method.md §5).

CLI methods (``filtersurgery run --method M``), each one training run from scratch on
the whole training set (docs/method.md §8: 10% of it held out for validation; test accuracy on the
official test set), SGD 0.9 / wd 5e-4 / cosine lr from ``--lr`` (default 0.1, the
paper's), via :func:`filtersurgery.engine.trainer.run_phase`:

- ``plain``: cross-entropy training, nothing else (the paper's "baseline");
- ``reactivation``: + :func:`~filtersurgery.ops.reactivation.reactivate_kernels` after every
  ``--reactivation-period`` E-th epoch with ``gamma_t = gamma * lr_t / lr_0`` (cosine-annealed);
- ``weight-evolution``: + :func:`~filtersurgery.ops.weight_evolution.evolve_weights` after
  every E-th epoch;
- ``filter-grafting``: two networks (the phase ``Scratch2``) +
  :func:`~filtersurgery.ops.filter_grafting.graft` after every ``--graft-period``-th epoch
  (default 1); the better network on validation is kept. Trains two models: about 2x
  the memory and compute.

No operation runs after the last epoch (:class:`MethodHook`). Every method's ``epochs.csv`` row also
logs, after every epoch and before the method's operation, what reactivation would act on
(:func:`invalid_fractions`: the fraction of filters meeting C1∧C2, of kernels meeting C3 at that
epoch's ``gamma_t``, the median rescale ratio), so a run shows whether there is anything to
reactivate. :func:`choose_on_validation` picks hyperparameters by validation accuracy.

All four methods of one seed start from the same initial weights (FG: its first network)
and see the same batches and augmentation, so per-seed differences are paired.

For users' own loops the same operations are callbacks called once per epoch with the
current learning rate: :class:`ReactivationCallback`, :class:`WeightEvolutionCallback`,
:class:`GraftingCallback` (``engine/callbacks.py``, public as ``filtersurgery.reactivation``).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.engine import checkpoint
from filtersurgery.engine.registry import MethodSpec, option, register
from filtersurgery.engine.callbacks import GraftingCallback, ReactivationCallback, WeightEvolutionCallback, report_row
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.metrics import write_metrics
from filtersurgery.engine.phase import Phase, Scratch, Scratch2
from filtersurgery.engine.run import Run, forward_flops
from filtersurgery.engine.trainer import run_phase
from filtersurgery.ops.checks import check_fraction
from filtersurgery.ops.reactivation import candidate_convs, invalid_filters, kernel_multipliers

METHODS = ("plain", "reactivation", "weight-evolution", "filter-grafting")
PHASE_NAME = "train"  # the same for every method: same augmentation stream per seed


# --------------------------------------------------------------------------- config
@dataclass
class ReactivationMethodConfig:
    """Options of the four methods. Defaults: the paper's ``(alpha, beta, gamma, E) = (0.2, 0.3, 0.1, 10)``;
    filter grafting ``a = 0.4, c = 500`` (docs/method.md §9), grafting every epoch.

    The field metadata names each option's ``filtersurgery run`` flag (engine/registry.py
    :func:`~filtersurgery.engine.registry.option`); ``graft_a`` and ``graft_c`` have none."""

    alpha: float = option(0.2, flag="--reactivation-alpha",
                          help="reactivation/WE C1: lowest fraction of filters model-wide by mean |w| (default %(default)s)")
    beta: float = option(0.3, flag="--reactivation-beta",
                         help="reactivation/WE C2: lowest fraction of filters within their layer (default %(default)s)")
    gamma: float = option(0.1, flag="--reactivation-gamma",
                          help="reactivation C3: fraction of kernels at lr_0, annealed as gamma*lr_t/lr_0 (default %(default)s)")
    period: int = option(10, flag="--reactivation-period",
                         help="reactivation/WE every E-th epoch; scale it with --epochs (paper: 10 of 200) (default %(default)s)")
    graft_period: int = option(1, flag="--graft-period", help="filter grafting every N-th epoch (default %(default)s)")
    graft_a: float = 0.4
    graft_c: float = 500.0

    def validate(self) -> None:
        """One-line ValueError naming the bad field and its allowed range."""
        for n in ("alpha", "beta", "gamma", "graft_a"):
            check_fraction(n, getattr(self, n))
        for n in ("period", "graft_period"):
            v = getattr(self, n)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{n}: must be an integer >= 1, got {v!r}")
        if not float(self.graft_c) > 0:
            raise ValueError(f"graft_c: must be > 0, got {self.graft_c!r}")


# --------------------------------------------------------------------------- callbacks
class MethodHook:
    """``Phase.callback`` of a method: builds the method's callback for the phase's models, calls it.

    Nothing is done after the last of ``epochs`` epochs: no training would follow the
    change (kernel reactivation is a no-op there anyway, ``lr_T = 0``; a last Weight
    Evolution or grafting would only perturb the final model, and grafted layers would
    no longer match their BatchNorm running statistics). Every epoch, the last included, the
    row also gets :func:`invalid_fractions` of the first network before the operation
    (``gamma_t`` from ``mcfg.gamma`` and the epoch's lr), for every method, ``plain`` included.
    """

    def __init__(self, method: str, mcfg: ReactivationMethodConfig, lr0: float, epochs: Optional[int] = None):
        if method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
        self.method, self.mcfg, self.lr0, self.epochs = method, mcfg, lr0, epochs
        self._cb, self._for = None, None

    def _callback(self, models: List[nn.Module]):
        c = self.mcfg
        if self.method == "reactivation":
            return ReactivationCallback(models[0], c.period, c.alpha, c.beta, c.gamma, lr0=self.lr0)
        if self.method == "weight-evolution":
            return WeightEvolutionCallback(models[0], c.period, c.alpha, c.beta)
        if self.method == "filter-grafting":
            if len(models) != 2:
                raise ValueError(f"models: filter grafting needs 2 networks, got {len(models)}")
            return GraftingCallback(models[0], models[1], c.graft_period, c.graft_a, c.graft_c)
        return None

    def __call__(self, models: List[nn.Module], epoch: int, lr: float) -> Optional[Dict]:
        key = tuple(id(m) for m in models)
        if self._for != key:
            self._cb, self._for = self._callback(models), key
        c = self.mcfg  # what reactivation would act on now, logged for every method (first network)
        ratio = min(max(lr / self.lr0, 0.0), 1.0) if self.lr0 > 0 else 0.0
        row = invalid_fractions(models[0], c.alpha, c.beta, c.gamma * ratio)
        if self._cb is None or (self.epochs is not None and epoch + 1 >= self.epochs):
            return row
        return {**row, **report_row(self._cb(lr, epoch=epoch))}


# --------------------------------------------------------------------------- diagnostics, selection
@torch.no_grad()
def invalid_fractions(model: nn.Module, alpha: float, beta: float, gamma_t: float) -> Dict:
    """What :func:`~filtersurgery.ops.reactivation.reactivate_kernels` would act on now; weights untouched.

    Over the candidate convs (kernels with more than one element): ``frac_c1c2``, the fraction of
    filters meeting C1∧C2; ``frac_c3``, the fraction of kernels meeting C3 at ``gamma_t`` inside
    those filters (kernels with L1 0, which cannot be rescaled, not counted); ``ratio_c3_median``,
    the median rescale ratio ``Best_L1 / kernel_L1`` of those kernels (None when there are none:
    nothing to reactivate). Fractions rounded to 6 digits, the ratio to 4.
    """
    for n, v in (("alpha", alpha), ("beta", beta), ("gamma_t", gamma_t)):
        check_fraction(n, v)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    convs = candidate_convs(model)
    masks = invalid_filters(convs, alpha, beta)
    filters = kernels = n_c1c2 = 0
    ratios = []
    for name, conv in convs.items():
        w = conv.weight
        filters, kernels = filters + w.shape[0], kernels + w.shape[0] * w.shape[1]
        inv = masks[name]["invalid"]
        n_c1c2 += int(inv.sum())
        mult, selected = kernel_multipliers(w, inv, gamma_t)
        live = selected & (w.detach().abs().flatten(2).sum(2) > 0)
        ratios.append(mult[live].cpu())
    r = torch.cat(ratios) if ratios else torch.zeros(0)
    return {"frac_c1c2": round(n_c1c2 / filters, 6) if filters else 0.0,
            "frac_c3": round(r.numel() / kernels, 6) if kernels else 0.0,
            "ratio_c3_median": round(float(r.median()), 4) if r.numel() else None}


def choose_on_validation(candidates: Sequence[Tuple[object, Sequence[float]]]):
    """The candidate whose runs have the highest mean validation accuracy; returns ``(key, mean)``.

    ``candidates``: ``(key, [val_acc of each run])`` pairs, in order of preference: a tie goes to
    the earlier one (list the paper's setting first). Test accuracy must not be passed in.
    """
    if not candidates:
        raise ValueError("candidates: need at least one (key, val_accs) pair")
    best = None
    for key, vals in candidates:
        vals = [float(v) for v in vals]
        if not vals:
            raise ValueError(f"candidates: {key!r} has no validation accuracy")
        mean = sum(vals) / len(vals)
        if best is None or mean > best[1]:
            best = (key, mean)
    return best


# --------------------------------------------------------------------------- memory
def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``/proc/self/clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device) -> Iterator[Dict]:
    """Measure peak memory of the enclosed block; fills the yielded dict on exit.

    CUDA: ``torch.cuda.max_memory_allocated`` (``kind = "cuda_max_allocated"``). CPU: the
    process's peak resident set size since the block started (Linux: peak RSS reset via
    ``/proc/self/clear_refs``, ``kind = "cpu_peak_rss"``; elsewhere ``ru_maxrss`` since the
    process started, ``kind = "cpu_maxrss_process"``). ``peak_mb`` and ``base_mb`` (at entry).
    """
    dev = torch.device(device)
    info: Dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        try:
            yield info
        finally:
            torch.cuda.synchronize(dev)
            info.update(kind="cuda_max_allocated", base_mb=base / 2**20,
                        peak_mb=torch.cuda.max_memory_allocated(dev) / 2**20)
        return
    was_reset = _reset_peak_rss()
    base = _proc_status_mb("VmRSS")
    try:
        yield info
    finally:
        peak = _proc_status_mb("VmHWM") if was_reset else None
        if peak is not None:
            info.update(kind="cpu_peak_rss", base_mb=base, peak_mb=peak)
        else:
            scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, kB on Linux
            info.update(kind="cpu_maxrss_process", base_mb=base,
                        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale)


# --------------------------------------------------------------------------- the method
def method_phase(cfg: TrainConfig, mcfg: ReactivationMethodConfig) -> Phase:
    """The single training phase of ``cfg.method`` (lr: ``cfg.lr`` if set, else ``cfg.scratch_lr``)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    lr = cfg.lr if cfg.lr is not None else cfg.scratch_lr
    kind = Scratch2 if cfg.method == "filter-grafting" else Scratch
    hook = MethodHook(cfg.method, mcfg, lr0=lr, epochs=cfg.epochs)  # plain: only the invalid_fractions log
    return kind(PHASE_NAME, [0], lr, cfg.epochs, callback=hook)


def run_method(cfg: TrainConfig, options: Optional[ReactivationMethodConfig], out_dir, seed: int, data=None) -> Dict:
    """Train ``cfg.method`` (one of :data:`METHODS`) from scratch for one seed; returns the metrics.

    Writes ``out_dir/step1.safetensors``, ``out_dir/metrics.json`` (one entry, ``step: 1``,
    with ``peak_mem_mb``/``mem_kind``), ``out_dir/epochs.csv`` (per-epoch reactivation
    counts in ``extra``). Re-running resumes from the last finished epoch, or returns the
    finished metrics; a folder holding a run with other method options is refused.
    ``options``: the methods' :class:`ReactivationMethodConfig` (None: the defaults).
    """
    mcfg = options if options is not None else ReactivationMethodConfig()
    mcfg.validate()
    one = replace(cfg, split="multi", steps=1)  # the whole training set as one part
    phase = method_phase(one, mcfg)
    out = Path(out_dir)
    opts = asdict(mcfg)
    ident = {"method": cfg.method, **opts}
    metrics_path, ckpt = out / "metrics.json", out / "step1.safetensors"
    opts_path = out / ".work" / "method.json"
    for p in (metrics_path, opts_path):
        if p.exists():
            old = checkpoint.read_json(p)
            if p == metrics_path:
                c = old.get("config", {})
                old = {"method": c.get("method"), **c.get("method_options", {})}
            checkpoint.refuse_other_settings(out, old, ident, keys=list(ident))
    if metrics_path.exists() and ckpt.exists():
        done = checkpoint.read_json(metrics_path)
        if done.get("steps"):
            return done
    run = Run(one, seed, out, data)
    run.work.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(ident, opts_path)
    t0 = time.time()
    with peak_memory(run.device) as mem:
        model, _ = run_phase(run, 1, phase, run.new_model())
    seconds = time.time() - t0
    n_train = len(run.parts[0][0])
    entry = {
        "step": 1, "test_acc": round(run.acc(model), 4), "val_acc": round(run.acc(model, [0]), 4),
        "seconds": round(seconds, 2),
        "train_flops": phase.flops(forward_flops(model, run.data, run.device), n_train),
        "phases": [phase.name], "models_trained": phase.models(),
        "peak_mem_mb": round(mem["peak_mb"], 1), "base_mem_mb": None if mem["base_mb"] is None else round(mem["base_mb"], 1),
        "mem_kind": mem["kind"], "train_images": n_train,
    }
    checkpoint.save_state_dict(model.state_dict(), ckpt)
    config = {**cfg.record(), "seed": seed, "lr_used": phase.lr, "method_options": opts}
    metrics = write_metrics(out, run.data, config, [entry])
    run.drop_step_work(1)
    opts_path.unlink(missing_ok=True)  # metrics.json now holds the method options
    checkpoint.remove_empty_dir(run.work)
    return metrics


def plan_phases(cfg: TrainConfig, options: Optional[ReactivationMethodConfig], data) -> List[Tuple[int, Phase, torch.Tensor]]:
    """The one phase of ``cfg.method``, on the whole training set (:attr:`MethodSpec.plan`)."""
    one = replace(cfg, split="multi", steps=1)
    return [(1, method_phase(one, options if options is not None else ReactivationMethodConfig()), data.train_y)]


register(MethodSpec(METHODS, ReactivationMethodConfig, run_method, plan=plan_phases,
                    help="kernel reactivation and its baselines: one training run from scratch (docs/reactivation.md)"))

__all__ = ["METHODS", "ReactivationMethodConfig", "MethodHook", "method_phase", "run_method", "peak_memory",
           "invalid_fractions", "choose_on_validation"]
