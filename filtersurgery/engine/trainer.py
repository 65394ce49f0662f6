"""The one training loop: ``run_phase`` trains one :class:`~filtersurgery.engine.phase.Phase` of a step.

SGD with momentum and weight decay, a cosine schedule per phase, AMP,
DistributedDataParallel under torchrun, a resumable state after every epoch
(``.work/state.pt``) and the phase's output model (with what it hands the next phase) when it
finishes, so a killed run re-run with the same arguments continues from its last finished
epoch. What trains, and with which loss, is the phase object's; the loop never changes for a
new kind of phase.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from filtersurgery.data import BatchLoader
from filtersurgery.engine import checkpoint
from filtersurgery.engine.distributed import barrier, ddp_wrap, dist_info, is_main_process, sync_buffers
from filtersurgery.engine.epochs import check_finite_loss, restore_rng, run_epochs, save_training_state
from filtersurgery.engine.loop import sgd_batches
from filtersurgery.engine.phase import Phase, PhaseContext, csv_columns
from filtersurgery.engine.run import Run, make_scaler, make_sgd, phase_seed

__all__ = ["run_phase", "HANDOFF_PREFIX", "epoch_columns"]

HANDOFF_PREFIX = "handoff."  # keys of a phase's output file that hold what it hands the next phase


def epoch_columns() -> List[str]:
    """The header of ``epochs.csv``: the loop's columns, every phase class's own (:attr:`Phase.columns`),
    ``seconds`` and ``extra`` (a JSON object of whatever else a row holds)."""
    return ["step", "phase", "epoch", "lr", "train_loss", "val_acc0", "val_acc1", *csv_columns(), "seconds"]


@dataclass
class _PhaseLoop:
    """The moving parts of one phase's training: its models, loader, SGD, schedule, AMP scaler."""

    students: List[nn.Module]
    loader: BatchLoader
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # the augmentation generator
    batches: int  # per epoch (``cfg.max_batches`` applied)
    state_path: Path  # the resumable state file


def run_phase(run: Run, step: int, phase: Phase, model: nn.Module,
              received: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """Train ``phase`` of ``step`` from ``model``; returns the phase's output model and what it hands the
    step's next phase (:meth:`Phase.finish`). ``received``: what the previous phase handed over.

    Writes ``.work/state.pt`` after every epoch (resume) and ``.work/stepK_NAME.safetensors`` (the output
    model and, under ``handoff.*`` keys, the handoff) when done; a finished phase is loaded from it.
    """
    done_path = run.work / f"step{step}_{phase.name}.safetensors"
    _refuse_old_layout(run, step)
    clash = next((k for k in model.state_dict() if k.startswith(HANDOFF_PREFIX)), None)
    if clash is not None:  # a phase file could not tell the model's tensor from the handoff
        raise ValueError(f"model: its state_dict key {clash!r} starts with {HANDOFF_PREFIX!r}, which the trainer's "
                         f"phase files reserve; rename that module")
    if done_path.exists():  # finished in an earlier (killed) run
        return _load_done(run, done_path, model)
    if received:
        phase.receive(received)
    ctx = run.context(step, phase.name, phase.parts)
    loop = _set_up(run, ctx, phase, model)
    start_epoch = _resume(ctx, phase, loop)
    _train_epochs(run, ctx, phase, loop, start_epoch)
    return _finish(run, ctx, phase, loop.students, done_path)


def _refuse_old_layout(run: Run, step: int) -> None:
    """A ``.work/`` left by an older version, whose SST handed its scales over in a separate file, cannot
    be resumed (its finished phases lack the handoff): refused in one line."""
    old = sorted(run.work.glob(f"step{step}_*_scales.safetensors"))
    if old:
        raise ValueError(f"{run.out}: {old[0].name} in .work/ was written by an older filtersurgery, whose "
                         f"unfinished step {step} cannot be resumed; delete {run.work} to train step {step} again")


def _load_done(run: Run, path: Path, model: nn.Module) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The output model and handoff of a phase that finished in an earlier run."""
    sd = checkpoint.load_state_dict(path, device=str(run.device))
    handoff = {k[len(HANDOFF_PREFIX):]: v.cpu() for k, v in sd.items() if k.startswith(HANDOFF_PREFIX)}
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(HANDOFF_PREFIX)})
    return model, handoff


def _resumes(state_path: Path, step: int, phase: Phase) -> bool:
    """True when ``state_path`` holds a saved epoch of this step's ``phase``."""
    if not state_path.exists():
        return False
    extra = checkpoint.peek_training_state(state_path)
    return extra.get("step") == step and extra.get("phase") == phase.name


def _set_up(run: Run, ctx: PhaseContext, phase: Phase, model: nn.Module) -> _PhaseLoop:
    """The warm start, the loader, the phase's models and set-up, SGD and the cosine schedule.

    The order fixes the random streams: the phase's models (new models re-seed the global
    RNG) before the phase's seed, the phase's set-up (teacher copies, probes) after it.
    """
    cfg, dev, step = run.cfg, run.device, ctx.step
    x_tr, y_tr = ctx.train_images()
    state_path = run.work / checkpoint.STATE_FILE
    if phase.warm_start is not None and not _resumes(state_path, step, phase):
        phase.warm_start.apply(ctx, model, x_tr, y_tr)
    world = dist_info()[1]  # under torchrun each rank takes its share of every epoch (BatchLoader)
    loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev,
                         seed=phase_seed(run.seed, step, phase.name, "order:"), drop_last=len(y_tr) > cfg.batch_size * world)
    students = phase.students(ctx, model)
    # seeded after the phase's models (new_model re-seeds the global RNG for its initialisation)
    torch.manual_seed(phase_seed(run.seed, step, phase.name))
    gen = torch.Generator(device=dev).manual_seed(phase_seed(run.seed, step, phase.name))  # no host sync
    batches = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    phase.set_up(ctx, students, batches)
    params = [p for s in students for p in s.parameters() if p.requires_grad]
    opt = make_sgd(params, phase.lr, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs * max(1, batches))
    return _PhaseLoop(students, loader, opt, sched, make_scaler(run), gen, batches, state_path)


def _resume(ctx: PhaseContext, phase: Phase, loop: _PhaseLoop) -> int:
    """Load a saved epoch of this step's ``phase`` into ``loop``; returns the epochs already done (0: none)."""
    if not loop.state_path.exists():
        return 0
    st = checkpoint.load_training_state(loop.state_path)
    extra = st["extra"]
    if extra.get("step") != ctx.step or extra.get("phase") != phase.name:
        return 0
    if "phase_state" not in extra:
        raise ValueError(f"{loop.state_path} was written by an older filtersurgery and cannot be resumed; "
                         f"delete it to train step {ctx.step}'s {phase.name} phase again")
    sd = st["model"]
    for i, s in enumerate(loop.students):
        s.load_state_dict({k[len(f"s{i}.") :]: v for k, v in sd.items() if k.startswith(f"s{i}.")})
    loop.opt.load_state_dict(st["optimizer"])
    loop.sched.load_state_dict(extra["sched"])
    phase.load_state_dict(extra["phase_state"])
    restore_rng(extra, loop.gen)
    return int(extra["epoch"])


def _train_epochs(run: Run, ctx: PhaseContext, phase: Phase, loop: _PhaseLoop, start_epoch: int) -> None:
    """Epochs ``start_epoch..phase.epochs-1`` through the engine's epoch driver
    (:func:`~filtersurgery.engine.epochs.run_epochs`): train, validate, fill the row; the state is
    saved after every epoch (or every ``cfg.state_every`` seconds and after the last), then the rows are logged."""
    for s in loop.students:
        s.train()
    nets = ddp_wrap(loop.students, run.device)  # what the batch loss calls (the students without torchrun)
    desc = f"{run.cfg.method} seed{run.seed} step{ctx.step} {phase.name}"
    base = epoch_columns()

    def one_epoch(epoch: int) -> Dict:
        t0 = time.time()
        total, nb = _train_epoch(run, ctx, phase, loop, nets, epoch, desc)
        phase.after_batches(ctx, loop.students, epoch)
        sync_buffers(loop.students)  # torchrun: BN running statistics averaged over ranks
        row = {"step": ctx.step, "phase": phase.name, "epoch": epoch + 1, "lr": loop.opt.param_groups[0]["lr"],
               "train_loss": float(total) / max(1, nb), "seconds": round(time.time() - t0, 3)}
        _epoch_end(ctx, phase, loop.students, epoch, row)
        extra = {k: v for k, v in row.items() if k not in base}
        return {**{k: row.get(k, "") for k in base}, "extra": json.dumps(extra) if extra else ""}

    run_epochs(start_epoch, lambda e: e >= phase.epochs, one_epoch, lambda e: _save_state(ctx, phase, loop, e),
               run.log_epoch, run.cfg.state_every)


def _train_epoch(run: Run, ctx: PhaseContext, phase: Phase, loop: _PhaseLoop, nets: List[nn.Module], epoch: int,
                 desc: str) -> Tuple[Union[torch.Tensor, float], int]:
    """One epoch's batches through :func:`~filtersurgery.engine.loop.sgd_batches` (loss, backward, the
    phase's gradient hook, SGD and schedule steps). Returns the summed loss and the number of batches."""
    loop.loader.set_epoch(epoch)
    phase.epoch_start(ctx, epoch)
    it = _progress(loop.loader, desc=f"{desc} ep{epoch + 1}/{phase.epochs}", total=loop.batches, enable=run.cfg.progress)
    total, nb = sgd_batches(itertools.islice(it, loop.batches),
                            lambda xb, yb: _batch_loss(ctx, phase, nets, xb, yb, loop.gen),
                            loop.opt, scaler=loop.scaler, sparsifier=phase.grad_hook, sched=loop.sched)
    check_finite_loss(total, f"step {ctx.step} phase {phase.name} epoch {epoch + 1}",  # once per epoch
                      _last_good_state(run, ctx.step, phase, loop.state_path))
    return total, nb


def _last_good_state(run: Run, step: int, phase: Phase, state_path: Path) -> Path:
    """The file that holds the last good state before this phase's current epoch: the resumable state once
    an epoch of this phase is saved, else the latest output of a finished phase of this step, else the
    previous step's checkpoint (else the state file, which step 1's first epoch has not written yet)."""
    if _resumes(state_path, step, phase):
        return state_path
    done = sorted(run.work.glob(f"step{step}_*.safetensors"), key=lambda p: p.stat().st_mtime)
    if done:
        return done[-1]
    prev_step = run.out / f"step{step - 1}.safetensors"
    return prev_step if step > 1 and prev_step.exists() else state_path


def _epoch_end(ctx: PhaseContext, phase: Phase, students: List[nn.Module], epoch: int, row: Dict) -> None:
    """Fill the epoch's log ``row``: the phase's callback, the students' validation accuracy
    (``val_acc0``, ``val_acc1``), then the phase's ``epoch_end``."""
    if phase.callback is not None:
        row.update(phase.callback(students, epoch, row["lr"]) or {})
    vals = [ctx.accuracy(s) for s in students]
    for i, v in enumerate(vals):
        row[f"val_acc{i}"] = round(v, 3)
    phase.epoch_end(ctx, students, epoch, vals, row)


def _save_state(ctx: PhaseContext, phase: Phase, loop: _PhaseLoop, epoch: int) -> None:
    """Write the resumable state after ``epoch``: the models (``s0.``, ``s1.``), optimizer, schedule, the
    phase's own state (teacher, sparsifier, ...), RNG states (rank 0 writes)."""
    sd = {f"s{i}.{k}": v for i, s in enumerate(loop.students) for k, v in s.state_dict().items()}
    if is_main_process():
        save_training_state(
            loop.state_path, sd, loop.opt.state_dict(),
            {"step": ctx.step, "phase": phase.name, "epoch": epoch + 1, "sched": loop.sched.state_dict(),
             "phase_state": phase.state_dict()},
            gen=loop.gen,
        )


def _finish(run: Run, ctx: PhaseContext, phase: Phase, students: List[nn.Module],
            done_path: Path) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The phase's output: its one model, or the better student on the current data's validation split
    (docs/method.md §3), and its handoff; both are written by rank 0."""
    for p in phase.frozen:
        p.requires_grad_(True)
    if len(students) == 1:
        out = students[0]
    else:
        vals = [ctx.accuracy(s) for s in students]
        out = students[max(range(len(students)), key=lambda i: vals[i])]
    handoff = {k: v.detach().cpu() for k, v in phase.finish(ctx, students).items()}
    if is_main_process():
        sd = {**out.state_dict(), **{HANDOFF_PREFIX + k: v for k, v in handoff.items()}}
        checkpoint.save_state_dict(sd, done_path)
    barrier()
    return out, handoff


def _progress(it, desc: str, total: int, enable: bool):
    if not enable:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _batch_loss(ctx: PhaseContext, phase: Phase, nets: List[nn.Module], xb: torch.Tensor, yb: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
    """The loss of one batch of ``phase`` (patch point for tests)."""
    return phase.batch_loss(ctx, nets, xb, yb, gen)
