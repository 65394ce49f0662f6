"""``multi_step``: one seed of a multi-step method, step by step, resumable, with its do-no-harm record.

Per step it trains the plan's phases in order (each phase hands the next what it needs: SST's
norm scales to AOD), writes ``stepK.safetensors`` and the step's ``metrics.json`` entry: test,
validation and training accuracy, FLOPs, and the validation accuracy of the model the step
received beside its output's (``val_in``, ``worse``, per phase ``phase_vals``).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from filtersurgery.data import ImageData
from filtersurgery.engine import checkpoint
from filtersurgery.engine.config import TrainConfig, resume_keys
from filtersurgery.engine.distributed import barrier, is_main_process
from filtersurgery.engine.metrics import preprocess_info
from filtersurgery.engine.phase import Phase
from filtersurgery.engine.run import Run, forward_flops
from filtersurgery.engine.trainer import run_phase
from filtersurgery.methods.multistep.config import MultiStepConfig
from filtersurgery.methods.multistep.plans import plan_step

__all__ = ["multi_step", "single_step", "harm_margin", "config_record"]


def config_record(cfg: TrainConfig, opts: MultiStepConfig, seed: int) -> Dict:
    """What ``metrics.json``'s ``config`` holds: the run's and the method's settings (one flat dict) and the seed."""
    return {**cfg.record(), **asdict(opts), "seed": seed}


def _open_run(run: Run, opts: MultiStepConfig) -> Dict:
    """Create the run's folders and return its ``metrics.json`` so far (its config replaced by the run's);
    a folder that holds a run with other settings (:func:`~filtersurgery.engine.config.resume_keys`, the
    model's identity among them) is refused in one line before anything is written."""
    out = run.out
    metrics_path = out / "metrics.json"
    metrics = checkpoint.read_json(metrics_path) if metrics_path.exists() else {}
    record = config_record(run.cfg, opts, run.seed)
    old = metrics.get("config")
    if isinstance(old, dict):
        checkpoint.refuse_other_settings(out, old, record,
                                         keys=[k for k in resume_keys(MultiStepConfig) if k in old])
    checkpoint.make_dir(out, "out")
    run.work.mkdir(exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"out: directory {out} is not writable")
    metrics.setdefault("preprocess", preprocess_info(run.data))
    metrics.setdefault("steps", [])
    metrics["config"] = record
    return metrics


def _train_step(run: Run, opts: MultiStepConfig, step: int, model: nn.Module,
                step1_from: Optional[str]) -> Tuple[nn.Module, List[Tuple[Phase, Optional[float]]]]:
    """Train the phases of ``step`` from ``model`` (step 1: or load ``step1_from``), each handing the next
    what it needs; returns the step's model and ``(phase, validation accuracy of the model it received)``."""
    if step == 1 and step1_from is not None and Path(step1_from).exists():
        model.load_state_dict(checkpoint.load_state_dict(step1_from, device=str(run.device)))
        return model, []
    done, handoff = [], {}
    for phase in plan_step(run.cfg, opts, step):
        val_in = run.acc(model, phase.parts) if step > 1 else None  # also right on a resume
        model, handoff = run_phase(run, step, phase, model, handoff)
        done.append((phase, val_in))
    return model, done


def _phase_record(run: Run, step: int, phase: Phase, val_in: Optional[float]) -> Dict:
    """One phase's do-no-harm numbers for ``metrics.json``: the validation accuracy of the model it received
    (``val_in``), its lowest and last epoch (best student), SST's fraction of factors at zero and what its
    end's projection moved (``projected``, ``projected_max``: :meth:`~filtersurgery.ops.sparsity.Sparsifier.project`),
    the epoch SST handed on with its validation accuracy (``kept_epoch``, ``val_out``; ``MultiStepConfig.sst_keep``),
    and the incoming model's training accuracy with SST's peak lr (``train_acc_in``, ``peak_lr``; ``sst_fit_acc``)."""
    rows = [r for r in _epoch_rows(run) if r.get("step") == str(step) and r.get("phase") == phase.name]
    vals = [max(float(r[k]) for k in ("val_acc0", "val_acc1") if r.get(k) not in (None, "")) for r in rows]
    rec = {"phase": phase.name, "val_in": None if val_in is None else round(val_in, 4),
           "val_min": round(min(vals), 4) if vals else None, "val_end": round(vals[-1], 4) if vals else None}
    if rows and rows[-1].get("zero_frac") not in (None, ""):
        rec["zero_frac"] = float(rows[-1]["zero_frac"])
        extra = json.loads(rows[-1].get("extra") or "{}")
        rec.update({k: extra[k] for k in ("projected", "projected_max", "kept_epoch", "train_acc_in", "peak_lr")
                    if k in extra})
        if "kept_val" in extra:  # keep="best": the epoch SST handed on, not necessarily its last
            rec["val_out"] = extra["kept_val"]
    return rec


def _epoch_rows(run: Run) -> List[Dict[str, str]]:
    path = run.out / "epochs.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def harm_margin(val: float, n: int) -> float:
    """How far below the incoming model a step's validation accuracy may end before it counts as worse: one
    binomial standard deviation of ``n`` validation images at accuracy ``val`` (%), at least one point."""
    p = min(max(val / 100.0, 0.0), 1.0)
    return max(1.0, 100.0 * math.sqrt(p * (1.0 - p) / max(1, n)))


def _record_harm(run: Run, step: int, phases: List, val_in: float, entry: Dict, n_val: int) -> None:
    """Put the incoming model's validation accuracy beside the output's in ``entry`` (``val_in``), each
    phase's record (:func:`_phase_record`), and ``worse``: True, with a warning, when the step's output is
    below the model it received by more than :func:`harm_margin` (the same validation images)."""
    entry["val_in"] = round(val_in, 4)
    entry["phase_vals"] = [_phase_record(run, step, p, v) for p, v in phases]
    entry["worse"] = bool(entry["val_acc"] < entry["val_in"] - harm_margin(entry["val_in"], n_val))
    if entry["worse"]:
        warnings.warn(f"step {step} ({run.cfg.method}, seed {run.seed}) left the model worse than it received it: "
                      f"validation {entry['val_in']:.2f}% -> {entry['val_acc']:.2f}%", stacklevel=2)


def _save_step(run: Run, step: int, model: nn.Module, metrics: Dict, entry: Dict) -> None:
    """Record a finished step: ``stepK.safetensors``, ``metrics.json``; drop its work files (rank 0)."""
    metrics["steps"] = [s for s in metrics["steps"] if s["step"] != step] + [entry]
    if is_main_process():  # under torchrun only rank 0 writes (every rank holds the same model)
        checkpoint.save_state_dict(model.state_dict(), run.out / f"step{step}.safetensors")
        checkpoint.atomic_write_json(metrics, run.out / "metrics.json")
        run.drop_step_work(step)
    barrier()


def multi_step(cfg: TrainConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None,
               options: Optional[MultiStepConfig] = None, step1_from: Optional[str] = None,
               until_step: Optional[int] = None, on_step: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run ``cfg.steps`` steps of the multi-step method ``cfg.method`` for one seed; returns the metrics dict.

    ``options``: the method's settings (default ``MultiStepConfig()``). Writes ``out_dir/stepK.safetensors``,
    ``out_dir/metrics.json``, ``out_dir/epochs.csv``. Re-running with the same ``out_dir`` resumes.
    ``step1_from``: a ``step1.safetensors`` to reuse (the step-1 model is the same for every method of a
    seed); ``until_step``: stop after that step (the rest can be run later into the same ``out_dir``);
    ``on_step``: called with each newly trained step's ``metrics.json`` entry as soon as it is written.
    """
    opts = (options if options is not None else MultiStepConfig()).validate()
    run = Run(cfg, seed, Path(out_dir), data)  # validates the config, loads the data, checks the model
    with checkpoint.run_lock(run.out) if is_main_process() else contextlib.nullcontext():
        metrics = _open_run(run, opts)
        _run_steps(run, opts, metrics, step1_from, until_step, on_step)
        if is_main_process():
            checkpoint.remove_empty_dir(run.work)
    return metrics


def _run_steps(run: Run, opts: MultiStepConfig, metrics: Dict, step1_from: Optional[str], until_step: Optional[int],
               on_step: Optional[Callable[[Dict], None]]) -> None:
    """Steps ``1..until_step`` (default all): load a finished step's checkpoint, train the others."""
    done = {s["step"] for s in metrics["steps"]}
    model, fwd = run.new_model(), []
    for step in range(1, (until_step or run.cfg.steps) + 1):
        ckpt = run.out / f"step{step}.safetensors"
        if step in done and ckpt.exists():
            model.load_state_dict(checkpoint.load_state_dict(ckpt, device=str(run.device)))
            continue
        model, entry = _step_entry(run, opts, step, model, step1_from, fwd)
        _save_step(run, step, model, metrics, entry)
        if on_step is not None and is_main_process():
            on_step(entry)


def _step_entry(run: Run, opts: MultiStepConfig, step: int, model: nn.Module, step1_from: Optional[str],
                fwd: List[int]) -> Tuple[nn.Module, Dict]:
    """Train ``step`` from ``model``; returns the step's model and its ``metrics.json`` entry (test, validation
    and training accuracy, the incoming model's validation accuracy and every phase's, seconds, FLOPs)."""
    t0 = time.time()
    cur = plan_step(run.cfg, opts, step)[-1].parts  # the step's last phase's data parts: its validation split
    val_in = run.acc(model, cur) if step > 1 else None  # the model the step received
    model, phases_run = _train_step(run, opts, step, model, step1_from)
    if not fwd:
        fwd.append(forward_flops(model, run.data, run.device))
    flops = sum(p.flops(fwd[0], len(run.part_xy(p.parts, "train")[1])) for p, _ in phases_run)
    entry = {"step": step, "test_acc": round(run.acc(model), 4), "val_acc": round(run.acc(model, cur), 4),
             "train_acc": round(run.train_acc(model, cur), 4),
             "seconds": round(time.time() - t0, 2), "train_flops": flops, "phases": [p.name for p, _ in phases_run]}
    if val_in is not None:
        _record_harm(run, step, phases_run, val_in, entry, len(run.part_xy(cur, "val")[1]))
    return model, entry


def single_step(cfg: TrainConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None, **kw) -> Dict:
    """The single-step (1:1) experiment: ``multi_step`` with ``split='single'``, 2 steps."""
    return multi_step(replace(cfg, split="single", steps=2), out_dir, seed=seed, data=data, **kw)
