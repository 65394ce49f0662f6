"""The multi-step framework: docs/method.md §1-4 composed into steps, plus the §9 baselines.

Public as ``filtersurgery.train``. Read top to bottom, a step of the framework is::

    step 1            train Data1 from scratch (CE, lr 0.1)                       -> M1
    step 2            SST on Data1 (CE + selective L1)                            -> S
                      Dri(S, I=0.1), Dri(S, I=0.2)  -> two students
                      AOD on Data2 (eqs. 5-8), keep the better student on val     -> M2
    step k >= 3       SST on Data_k with MSL (eq. 9: KL + AT to the teacher M_{k-1},
                      classifier frozen, teacher <- student when val improves)      -> S
                      Dri x2 + AOD on Data_k                                       -> M_k

Every step is a list of *phases* (``plan_step``); each phase is trained by the engine's
``run_phase`` (``engine/trainer.py``: resumable after every epoch) with the phase kind's
set-up and loss. The kinds of this module: ``sst`` (SST / BST), ``sst_msl`` (SST under MSL),
``aod`` (Dri'd students + AOD), ``dml``, ``lwm``; the warm starts ``shrink-perturb`` and
``dash``. ``scratch`` and ``finetune`` are the engine's (``engine/phases.py``).

The baselines swap the phases of steps >= 2: ``finetune`` (CE at ``lr``), ``bst``
(network slimming instead of SST), ``dml`` (two students, CE + KL to the peer), ``lwm``
(CE + KD + Grad-CAM attention distillation from the previous model), ``joint`` (from
scratch on all data seen so far), ``shrink-perturb`` / ``dash`` (a warm start, then
fine-tuning). ``single_step`` is ``multi_step`` with two parts.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.data import augment
from filtersurgery.data.datasets import BatchLoader, ImageData
from filtersurgery.distill import losses
from filtersurgery.distill.blockfeats import capture_blocks, spatial_blocks
from filtersurgery.engine import checkpoint, registry
from filtersurgery.engine.phases import (PHASE_KINDS, WARM_STARTS, FineTune, Phase, PhaseKind, PhaseState, WarmStart,
                                         augmented, autocast, memory_format, normalized, phase_flops, phase_kind,
                                         register_phase_kind, register_warm_start)
from filtersurgery.engine.trainer import (METHODS, SINGLE_RUN_METHODS, STATE_FILE, Run, TrainConfig, amp_dtype, barrier,
                                          resume_keys,
                                          classifier_params, dist_info, evaluate, forward_flops, is_main_process,
                                          phase_seed, preprocess_info, resolve_device, resume_point, run_phase,
                                          write_metrics)
from filtersurgery.ops import warmstart
from filtersurgery.ops.normstats import refresh_bn_stats
from filtersurgery.ops.reinit import rescale
from filtersurgery.ops.ranking import as_scaling_map
from filtersurgery.ops.sparsity import Sparsifier, SparsityConfig, lam_for_budget
# names the old flat ``filtersurgery.train`` module carried (its imports), kept for its readers
from filtersurgery.data.datasets import load_dataset, split_parts  # noqa: F401
from filtersurgery.models.factory import build_model  # noqa: F401
from filtersurgery.ops.ranking import RANKINGS  # noqa: F401


# --------------------------------------------------------------------------- phase kinds
def _frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of ``model`` in eval mode without gradients."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _scales_path(run: Run, step: int) -> Path:
    return run.work / f"step{step}_sst_scales.safetensors"


def _sst_scales(run: Run, step: int) -> Optional[torch.Tensor]:
    """The per-factor norm scales that this step's SST ranked with (None without an SST phase)."""
    path = _scales_path(run, step)
    return checkpoint.load_state_dict(path)["scales"] if path.exists() else None


@register_phase_kind
class SST(FineTune):
    """SST on the incoming model: CE + selective L1 on the scaling factors (docs/method.md §1);
    BST (network slimming) with ``Phase.selective=False``. Logs ``sp_r`` and ``zero_frac``;
    leaves the norm scales it ranked with for Dri."""

    name = "sst"

    msl = False  # sized with the margin of SST with cross-entropy (TrainConfig.sst_safety)

    def set_up(self, run, step, phase, state, batches):
        cfg, model = run.cfg, state.students[0]
        safety = cfg.sst_safety(self.msl)
        lam = cfg.lam if cfg.lam != "auto" else lam_for_budget(
            model, cfg.target_r, phase.lr, phase.epochs * max(1, batches), cfg.momentum, safety, cfg.ranking,
            update=cfg.sst_update)
        # proximal "auto": the largest final target is due at 0 after 1 / safety of the phase; a late target catches up
        catch_up = 1.0 / safety if cfg.sst_update == "proximal" and cfg.lam == "auto" else None
        state.sparsifier = Sparsifier(as_scaling_map(model), SparsityConfig(
            target_r=cfg.target_r, epochs=phase.epochs, lam=lam, selective=phase.selective,
            e_cut_fraction=cfg.e_cut_fraction, ranking=cfg.ranking, update=cfg.sst_update, catch_up=catch_up))

    def after_batches(self, run, phase, state, epoch):
        """Re-estimate the BN running statistics from the phase's training images (``cfg.refresh_bn``): the
        factors moved at every step, so the averages of the last batches describe another network."""
        cfg = run.cfg
        if cfg.refresh_bn:
            x = run.part_xy(phase.parts, "train")[0][: cfg.refresh_bn_batches * cfg.batch_size]
            batches = (normalized(run, x[i: i + cfg.batch_size].to(run.device)) for i in range(0, len(x), cfg.batch_size))
            with autocast(run):
                refresh_bn_stats(state.students[0], batches)

    def epoch_end(self, run, phase, state, epoch, vals, row):
        sp = state.sparsifier
        row["sp_r"] = round(float(sp.sp_r), 4)
        row["zero_frac"] = round(sp.zero_fraction(), 4)  # SST's goal: >= target_r

    def finish(self, run, step, phase, state):
        # the norm scales of SST's start, for Dri (written before the phase counts as done)
        checkpoint.save_state_dict({"scales": state.sparsifier.scales.detach().cpu()}, _scales_path(run, step))


@register_phase_kind
class SSTMSL(SST):
    """SST under MSL (docs/method.md §4, eq. 9): KL + AT to the previous model as teacher, the
    classifier frozen; the teacher becomes the student whenever the student's validation
    accuracy is higher (``cfg.teacher_update``). ``cfg.msl_ce`` adds CE on the labels."""

    name = "sst_msl"

    def flops_per_image(self, fwd, students):
        return 3 * fwd + fwd  # + teacher forward

    msl = True

    def set_up(self, run, step, phase, state, batches):
        cfg, model = run.cfg, state.students[0]  # the incoming model itself
        state.teacher = _frozen_copy(model)
        state.frozen = classifier_params(model)
        for p in state.frozen:
            p.requires_grad_(False)
        super().set_up(run, step, phase, state, batches)
        # distillation on the blocks whose maps carry spatial information (a 1x1 map has none)
        state.extra["blocks"] = spatial_blocks(model, run.example(phase.parts), cfg.at_min_size, arg="at_min_size")
        state.teacher_val = run.acc(state.teacher, phase.parts)

    def batch_loss(self, run, state, nets, xb, yb, gen):
        cfg, names, teacher = run.cfg, state.extra["blocks"], state.teacher
        x = augmented(run, xb, gen)
        with autocast(run):
            with torch.no_grad(), capture_blocks(teacher, names) as tf:
                t_logits = teacher(x)
                t_feats = [tf[n].float() for n in names]
            with capture_blocks(nets[0], names) as sf:
                s_logits = nets[0](x)
                s_feats = [sf[n].float() for n in names]
            loss = losses.msl_loss(t_logits.float(), s_logits.float(), t_feats, s_feats,
                                   at_weight=cfg.at_weight, T=cfg.kd_temperature)
            return loss + F.cross_entropy(s_logits.float(), yb) if cfg.msl_ce else loss

    def epoch_end(self, run, phase, state, epoch, vals, row):
        super().epoch_end(run, phase, state, epoch, vals, row)
        if run.cfg.teacher_update and vals[0] > state.teacher_val:
            state.teacher.load_state_dict(state.students[0].state_dict())  # docs/method.md §4 teacher update
            state.teacher_val = vals[0]
            row["teacher_updated"] = 1


@register_phase_kind
class AOD(PhaseKind):
    """AOD (docs/method.md §2-3): ``cfg.students`` copies of the incoming model, each with its
    smallest factors re-drawn by Dri (``cfg.dri_I``), trained on two views (mirrored and
    cropped) with CE + consistency + the students' mutual distillation (eqs. 5-8)."""

    name = "aod"

    def models(self, cfg):
        return cfg.students

    def flops_per_image(self, fwd, students):
        return students * 2 * 3 * fwd  # two views per student

    def students(self, run, step, phase, model):
        cfg, out = run.cfg, []
        scales = _sst_scales(run, step)  # Dri ranks and maps back in the units SST used
        for i in range(cfg.students):
            s = copy.deepcopy(model)
            if cfg.dri:
                g = torch.Generator(device="cpu").manual_seed(phase_seed(run.seed, step, f"dri{i}"))
                rescale(s, target_r=cfg.target_r, I=cfg.dri_I[i], generator=g, ranking=cfg.ranking, scales=scales)
            out.append(s)
        return out

    def batch_loss(self, run, state, nets, xb, yb, gen):
        cfg = run.cfg
        xf, xc = augment.two_views(xb, generator=gen, flip=cfg.aod_flip)
        xf, xc = normalized(run, xf), normalized(run, xc)
        with autocast(run):
            if len(nets) == 2:
                out = [(s(xf), s(xc)) for s in nets]
                l1, l2, _ = losses.aod_losses(out[0][0], out[0][1], out[1][0], out[1][1], yb,
                                              alpha=cfg.alpha, T=cfg.kd_temperature)
                return l1 + l2
            lf, lc = nets[0](xf), nets[0](xc)
            return F.cross_entropy(lf.float(), yb) + cfg.alpha * losses.consistency_loss(lf, lc)


@register_phase_kind
class DML(PhaseKind):
    """Deep mutual learning (docs/method.md §9): two copies of the incoming model, each with CE
    + KL to the peer's prediction."""

    name = "dml"

    def models(self, cfg):
        return 2

    def flops_per_image(self, fwd, students):
        return 2 * 3 * fwd

    def students(self, run, step, phase, model):
        return [copy.deepcopy(model), copy.deepcopy(model)]

    def batch_loss(self, run, state, nets, xb, yb, gen):
        x = augmented(run, xb, gen)
        with autocast(run):
            # each student sees its own augmentation draw: two copies of one model on one batch never
            # diverge (KL and its gradient exactly 0); the KL then compares the two students'
            # predictions on two augmentations of the same images (docs/method.md §9)
            x2 = augmented(run, xb, gen)
            a, b = nets[0](x), nets[1](x2)
            return losses.dml_loss(a, b, yb) + losses.dml_loss(b, a, yb)


@register_phase_kind
class LwM(FineTune):
    """Learning without Memorizing (docs/method.md §9): CE + KD + Grad-CAM attention
    distillation from the incoming model (frozen teacher) on the last block with a map
    larger than 1x1."""

    name = "lwm"

    def flops_per_image(self, fwd, students):
        # + teacher forward (Grad-CAM only back-propagates from the logits to the last block)
        return 3 * fwd + fwd

    def set_up(self, run, step, phase, state, batches):
        model = state.students[0]  # the incoming model itself
        state.teacher = _frozen_copy(model)
        state.extra["last_block"] = spatial_blocks(model, run.example(phase.parts), 2,
                                                   arg="lwm block (map larger than 1x1)")[-1:]

    def batch_loss(self, run, state, nets, xb, yb, gen):
        cfg, last_block, teacher = run.cfg, state.extra["last_block"], state.teacher
        x = augmented(run, xb, gen)
        with autocast(run):
            # the teacher is frozen: its Grad-CAM needs a graph, so the input carries the grad
            with capture_blocks(teacher, last_block) as tf:
                t_logits = teacher(x.detach().requires_grad_(True))
                t_feat = tf[last_block[0]]
            with capture_blocks(nets[0], last_block) as sf:
                s_logits = nets[0](x)
                s_feat = sf[last_block[0]]
            return losses.lwm_loss(s_logits.float(), t_logits.float(), yb, s_feat, t_feat,
                                   beta=cfg.lwm_beta, gamma=cfg.lwm_gamma, T=cfg.kd_temperature)


# --------------------------------------------------------------------------- warm starts
@register_warm_start
class ShrinkPerturb(WarmStart):
    """Shrink & Perturb (filtersurgery.ops.warmstart): noise drawn from a freshly initialised,
    seeded model of the same spec."""

    name = "shrink-perturb"

    def apply(self, run, step, phase, model, x, y):
        g = torch.Generator().manual_seed(phase_seed(run.seed, step, phase.name, "noise:"))
        warmstart.prepare_step("shrink-perturb", model, cfg=run.cfg, generator=g,
                               init=run.new_model(seed_offset=1000 + step, fresh=True))


@register_warm_start
class Dash(WarmStart):
    """DASH (filtersurgery.ops.warmstart): one gradient pass over the phase's training images,
    normalized but not augmented."""

    name = "dash"

    def apply(self, run, step, phase, model, x, y):
        cl = memory_format(run)
        loader = BatchLoader(x, y, run.cfg.batch_size, shuffle=False, device=run.device)
        norm = lambda x: augment.normalize(x, run.data.mean, run.data.std, memory_format=cl)  # noqa: E731
        warmstart.prepare_step("dash", model, loader, cfg=run.cfg, transform=norm, amp=run.amp)

    def flops(self, fwd, n_images):
        return 3 * fwd * n_images  # one gradient pass over the part


# --------------------------------------------------------------------------- steps
def plan_step(cfg: TrainConfig, step: int) -> List[Phase]:
    """The phases of step ``step`` (1-based) for ``cfg.method`` (module docstring): step 1 trains
    Data1 from scratch; later steps are the registered plan of the method
    (:func:`~filtersurgery.engine.registry.register_plan`)."""
    if step == 1:
        return [Phase("scratch", "scratch", [0], cfg.scratch_lr, cfg.step1_epochs or cfg.epochs)]
    return registry.plan_for(cfg.method)(cfg, step)


def _framework_plan(cfg: TrainConfig, step: int, selective: bool = True) -> List[Phase]:
    """SST (on Data1 at step 2; with MSL on Data_k later), then Dri + AOD on Data_k (docs/method.md
    §1-4). ``selective=False`` is the BST baseline; ``cfg.sst=False`` leaves AOD alone."""
    E, k = cfg.epochs, step - 1
    aod = Phase("aod", "aod", [k], cfg.step_lr, E)
    if not cfg.sst:
        return [aod]
    if step == 2:
        sst = Phase("sst", "sst", [0], cfg.sst_lr, E, selective)
    elif cfg.msl:
        sst = Phase("sst", "sst_msl", [k], cfg.sst_lr, E, selective)
    else:
        sst = Phase("sst", "sst", [k], cfg.sst_lr, E, selective)
    return [sst, aod]


def _one_phase(name: str, kind: str, warm_start: Optional[str] = None):
    """The plan of a baseline that trains one phase of ``kind`` on Data_k at the new-data lr."""
    def plan(cfg: TrainConfig, step: int) -> List[Phase]:
        return [Phase(name, kind, [step - 1], cfg.step_lr, cfg.epochs, warm_start=warm_start)]
    plan.__name__ = plan.__qualname__ = f"plan_{name.replace('-', '_')}"
    return plan


def _joint_plan(cfg: TrainConfig, step: int) -> List[Phase]:
    """Joint training: from scratch on all data seen so far (Data1..Data_k)."""
    return [Phase("joint", "scratch", list(range(step)), cfg.scratch_lr, cfg.epochs)]


# registration order is the order of METHODS (help texts, tables)
registry.register_plan("framework", _framework_plan)
registry.register_plan("finetune", _one_phase("finetune", "finetune"))
registry.register_plan("bst", lambda cfg, step: _framework_plan(cfg, step, selective=False))
registry.register_plan("dml", _one_phase("dml", "dml"))
registry.register_plan("lwm", _one_phase("lwm", "lwm"))
registry.register_plan("joint", _joint_plan)
for _m in warmstart.WARMSTART_METHODS:  # the op on the incoming model, then fine-tuning on Data_k
    registry.register_plan(_m, _one_phase(_m, "finetune", warm_start=_m))


def _open_run(run: Run) -> Dict:
    """Create the run's folders and return its ``metrics.json`` so far (its config replaced by the run's);
    a folder that holds a run with other settings (:func:`~filtersurgery.engine.trainer.resume_keys`, the
    model's identity among them) is refused in one line before anything is written."""
    out, cfg = run.out, run.cfg
    metrics_path = out / "metrics.json"
    metrics = checkpoint.read_json(metrics_path) if metrics_path.exists() else {}
    record = {**cfg.record(), "seed": run.seed}
    old = metrics.get("config")
    if isinstance(old, dict):
        checkpoint.refuse_other_settings(out, old, record, keys=[k for k in resume_keys() if k in old])
    checkpoint.make_dir(out, "out")
    run.work.mkdir(exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"out: directory {out} is not writable")
    metrics.setdefault("preprocess", preprocess_info(run.data))
    metrics.setdefault("steps", [])
    metrics["config"] = record
    return metrics


def _train_step(run: Run, step: int, model: nn.Module, step1_from: Optional[str]):
    """Train the phases of ``step`` from ``model`` (step 1: or load ``step1_from``);
    returns the step's model and the phases that trained."""
    if step == 1 and step1_from is not None and Path(step1_from).exists():
        model.load_state_dict(checkpoint.load_state_dict(step1_from, device=str(run.device)))
        return model, []
    phases, received = plan_step(run.cfg, step), []
    for phase in phases:
        received.append(run.acc(model, phase.parts) if step > 1 else None)  # also right on a resume
        model = run_phase(run, step, phase, model)
    return model, list(zip(phases, received))


def _phase_record(run: Run, step: int, phase: Phase, val_in: Optional[float]) -> Dict:
    """One phase's do-no-harm numbers for ``metrics.json``: the validation accuracy of the model it received
    (``val_in``), its lowest and last epoch (best student), and SST's fraction of factors at zero."""
    rows = [r for r in _epoch_rows(run) if r.get("step") == str(step) and r.get("phase") == phase.name]
    vals = [max(float(r[k]) for k in ("val_acc0", "val_acc1") if r.get(k) not in (None, "")) for r in rows]
    rec = {"phase": phase.name, "val_in": None if val_in is None else round(val_in, 4),
           "val_min": round(min(vals), 4) if vals else None, "val_end": round(vals[-1], 4) if vals else None}
    if rows and rows[-1].get("zero_frac") not in (None, ""):
        rec["zero_frac"] = float(rows[-1]["zero_frac"])
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
               step1_from: Optional[str] = None, until_step: Optional[int] = None,
               on_step: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run ``cfg.steps`` steps of ``cfg.method`` for one seed; returns the metrics dict.

    Writes ``out_dir/stepK.safetensors``, ``out_dir/metrics.json``, ``out_dir/epochs.csv``.
    Re-running with the same ``out_dir`` resumes. ``step1_from``: a ``step1.safetensors``
    to reuse (the step-1 model is the same for every method of a seed); ``until_step``:
    stop after that step (the rest can be run later into the same ``out_dir``); ``on_step``:
    called with each newly trained step's ``metrics.json`` entry as soon as it is written.
    """
    run = Run(cfg, seed, Path(out_dir), data)  # validates the config, loads the data, checks the model
    with checkpoint.run_lock(run.out) if is_main_process() else contextlib.nullcontext():
        metrics = _open_run(run)
        _run_steps(run, metrics, step1_from, until_step, on_step)
        if is_main_process():
            checkpoint.remove_empty_dir(run.work)
    return metrics


def _run_steps(run: Run, metrics: Dict, step1_from: Optional[str], until_step: Optional[int],
               on_step: Optional[Callable[[Dict], None]]) -> None:
    """Steps ``1..until_step`` (default all): load a finished step's checkpoint, train the others."""
    done = {s["step"] for s in metrics["steps"]}
    model, fwd = run.new_model(), []
    for step in range(1, (until_step or run.cfg.steps) + 1):
        ckpt = run.out / f"step{step}.safetensors"
        if step in done and ckpt.exists():
            model.load_state_dict(checkpoint.load_state_dict(ckpt, device=str(run.device)))
            continue
        model, entry = _step_entry(run, step, model, step1_from, fwd)
        _save_step(run, step, model, metrics, entry)
        if on_step is not None and is_main_process():
            on_step(entry)


def _step_entry(run: Run, step: int, model: nn.Module, step1_from: Optional[str], fwd: List[int]):
    """Train ``step`` from ``model``; returns the step's model and its ``metrics.json`` entry (test and
    validation accuracy, the incoming model's validation accuracy and every phase's, seconds, FLOPs)."""
    t0 = time.time()
    cur = plan_step(run.cfg, step)[-1].parts  # the step's last phase's data parts: its validation split
    val_in = run.acc(model, cur) if step > 1 else None  # the model the step received
    model, phases_run = _train_step(run, step, model, step1_from)
    if not fwd:
        fwd.append(forward_flops(model, run.data, run.device))
    flops = sum(phase_flops(p, fwd[0], len(run.part_xy(p.parts, "train")[1]), phase_kind(p.kind).models(run.cfg))
                for p, _ in phases_run)
    entry = {"step": step, "test_acc": round(run.acc(model), 4), "val_acc": round(run.acc(model, cur), 4),
             "train_acc": round(run.train_acc(model, plan_step(run.cfg, step)[-1].parts), 4),
             "seconds": round(time.time() - t0, 2), "train_flops": flops, "phases": [p.name for p, _ in phases_run]}
    if val_in is not None:
        _record_harm(run, step, phases_run, val_in, entry, len(run.part_xy(cur, "val")[1]))
    return model, entry


def single_step(cfg: TrainConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None, **kw) -> Dict:
    """The single-step (1:1) experiment: ``multi_step`` with ``split='single'``, 2 steps."""
    return multi_step(replace(cfg, split="single", steps=2), out_dir, seed=seed, data=data, **kw)


__all__ = [
    # the multi-step framework
    "plan_step", "multi_step", "single_step", "SST", "SSTMSL", "AOD", "DML", "LwM", "ShrinkPerturb", "Dash",
    "warmstart",
    # the engine's names, public here as filtersurgery.train.*
    "METHODS", "SINGLE_RUN_METHODS", "STATE_FILE", "TrainConfig", "Run", "Phase", "PhaseKind", "PhaseState",
    "WarmStart", "PHASE_KINDS", "WARM_STARTS", "run_phase", "phase_flops", "phase_kind", "phase_seed",
    "register_phase_kind", "register_warm_start", "resume_point", "write_metrics", "preprocess_info", "evaluate",
    "forward_flops", "classifier_params", "resolve_device", "amp_dtype", "dist_info", "is_main_process", "barrier",
    "load_dataset", "split_parts", "build_model", "RANKINGS", "SparsityConfig",
]
