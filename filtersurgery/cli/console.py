"""What ``filtersurgery run`` tells its user: the start banner, the duration estimate, where
a re-run resumes, and the one line printed on Ctrl-C.

Nothing here changes what is trained. The estimate times a few SGD batches of a throwaway
copy of the model on random inputs, inside ``torch.random.fork_rng``: the run's random
streams are the same with or without it.

Duration estimate (:func:`estimate_seconds`): ``seconds per batch`` (measured) times the
run's *batch-equivalents*: for every phase still to train, ``batches per epoch x epochs x
cost factor`` (the factor is the phase's training FLOPs per image relative to plain
cross-entropy training, ``Phase.cost_factor()``: 1 for ``Scratch`` /
``FineTune`` / ``SST``, 4/3 for ``SSTMSL``, 4 for two-student ``AOD``, 2 for ``DML``,
``LwM`` and ``Scratch2``), plus the validation pass after every epoch and the test pass
after every step at 1/3 of a training batch per evaluated batch (a forward pass only). It
leaves out data decoding of lazy image folders, checkpoint writes and the one-off costs of
a step (tracing, FLOP counting), so it is a lower bound; it is printed as ``about``.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from filtersurgery.engine import checkpoint
from filtersurgery.data import ImageData, split_parts
from filtersurgery.engine import registry
from filtersurgery.engine.config import METHODS, TrainConfig
from filtersurgery.engine.metrics import resume_point
from filtersurgery.engine.phase import Phase
from filtersurgery.methods.multistep import MultiStepConfig, plan_step
from filtersurgery.tracing.probe import example_input, preserve_mode

__all__ = ["PlannedPhase", "plan_run", "measure_batch_seconds", "estimate_seconds", "banner", "resume_line",
           "interrupted_line", "format_duration", "Resume", "find_resume"]

# cost of evaluating one batch relative to training one (a forward pass of three)
EVAL_COST = 1.0 / 3.0


@dataclass
class PlannedPhase:
    """One phase a run will train: where, on how many images, for how many epochs, at what cost."""

    step: int
    name: str
    kind: str
    train_images: int
    val_images: int
    epochs: int
    batches: int  # per epoch (after --max-batches)
    factor: float  # training cost per batch relative to plain cross-entropy
    models: int = 1  # models validated after every epoch

    def __repr__(self) -> str:
        return (f"PlannedPhase(step {self.step} {self.name}: {self.train_images} train / {self.val_images} val, "
                f"{self.batches} batches x {self.epochs} epochs, x{self.factor:g})")


# --------------------------------------------------------------------------- plan
def batches_per_epoch(n_train: int, cfg: TrainConfig, world: int = 1) -> int:
    """Batches of one epoch of the trainer's loader (``drop_last`` when more than one batch), capped by ``max_batches``."""
    per_rank = -(-n_train // world)
    n = per_rank // cfg.batch_size if n_train > cfg.batch_size * world else -(-per_rank // cfg.batch_size)
    return max(1, n) if cfg.max_batches is None else max(1, min(n, cfg.max_batches))


def _phase(cfg: TrainConfig, step: int, phase: Phase, sizes: Sequence[tuple]) -> PlannedPhase:
    n_train = sum(sizes[p][0] for p in phase.parts)
    n_val = sum(sizes[p][1] for p in phase.parts)
    return PlannedPhase(step, phase.name, phase.kind or type(phase).__name__, n_train, n_val, phase.epochs,
                        batches_per_epoch(n_train, cfg), phase.cost_factor(), models=phase.models())


def _part_sizes(y: torch.Tensor, parts: int, cfg: TrainConfig, seed: int) -> List[tuple]:
    """``[(train, val)]`` image counts of the trainer's split of labels ``y`` into ``parts``."""
    return [(len(tr), len(va)) for tr, va in split_parts(y, parts, seed=seed, val_fraction=cfg.val_fraction,
                                                         subset=cfg.subset)]


def plan_run(cfg: TrainConfig, data: ImageData, seed: int = 0, options=None) -> List[PlannedPhase]:
    """The phases one seed of ``cfg.method`` trains, with their sizes: a multi-step method's steps, or a
    single-run method's own plan (its :attr:`~filtersurgery.engine.registry.MethodSpec.plan`, given its
    ``options``; empty for ``growth``, whose number of epochs is decided while it trains). A multi-step
    method's ``options`` is its :class:`MultiStepConfig` (default: the defaults)."""
    if cfg.method in METHODS:
        opts = options if isinstance(options, MultiStepConfig) else MultiStepConfig()
        sizes = _part_sizes(data.train_y, cfg.steps if cfg.split == "multi" else 2, cfg, seed)
        return [_phase(cfg, k, ph, sizes) for k in range(1, cfg.steps + 1) for ph in plan_step(cfg, opts, k)]
    spec = registry.get(cfg.method) if cfg.method in registry.names() else None
    if spec is None or spec.plan is None:
        return []
    return [_phase(cfg, k, ph, _part_sizes(y, 1, cfg, seed)) for k, ph, y in spec.plan(cfg, options, data)]


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batch_seconds(model: torch.nn.Module, data: ImageData, batch_size: int, device,
                          amp: Optional[torch.dtype] = None, batches: int = 3, budget_s: float = 5.0) -> float:
    """Seconds of one SGD training batch of ``batch_size`` images (CE, forward + backward + step).

    ``model`` is trained on random inputs: pass a throwaway copy. On CUDA the batches
    have ``batch_size`` images; on CPU at most 32, scaled linearly to ``batch_size`` (CPU
    time per image hardly depends on the batch size). One warm-up batch, then up to
    ``batches`` timed ones within ``budget_s``; returns their median. The model runs in train
    mode; every module's mode is restored afterwards.
    """
    device = torch.device(device)
    n = batch_size if device.type == "cuda" else min(batch_size, 32)
    # from the global RNG of the device, on the device, as always (timed_batch forks the RNG around it)
    x = example_input(model, (data.in_chans, data.size, data.size), batch=n, generator=None, device=device)
    y = torch.randint(0, max(1, data.num_classes), (n,), device=device)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def one() -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    with preserve_mode(model, train=True):
        spent = one()  # warm-up (allocations, kernel selection)
        times: List[float] = []
        while len(times) < batches and (not times or spent < budget_s):
            times.append(one())
            spent += times[-1]
    return sorted(times)[len(times) // 2] * batch_size / n


def timed_batch(cfg: TrainConfig, data: ImageData, device, amp) -> float:
    """:func:`measure_batch_seconds` for a fresh ``cfg.model``; the global RNG states are left as they were."""
    from filtersurgery.models.factory import build_model

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, _ = build_model(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        sec = measure_batch_seconds(model, data, cfg.batch_size, device, amp)
    del model
    return sec


def estimate_seconds(plan: Sequence[PlannedPhase], sec_per_batch: float, cfg: TrainConfig, n_test: int,
                     skip: Optional["Resume"] = None) -> float:
    """Seconds to train one seed's ``plan`` (module docstring), leaving out what ``skip`` says is done."""
    units = 0.0  # training-batch equivalents
    for p in plan:
        epochs = p.epochs - (0 if skip is None else skip.epochs_done(p))
        if epochs <= 0:
            continue
        val = p.val_images * p.models / cfg.batch_size * EVAL_COST
        units += epochs * (p.batches * p.factor + val)
    left = {p.step for p in plan} - set(skip.done_steps if skip is not None else [])
    units += len(left) * n_test / cfg.batch_size * EVAL_COST  # the test pass after every step
    return sec_per_batch * units


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- resume
@dataclass
class Resume:
    """What an earlier run left in a seed folder."""

    done_steps: List[int]
    complete: bool = False
    state: Optional[Dict] = None  # {"step", "phase", "epoch"} of the phase in progress
    finished_phases: Optional[List[tuple]] = None  # (step, phase) whose output model is saved
    growth_state: Optional[Dict] = None  # growth: {"phase", "epoch"} (0-based phase index)

    def epochs_done(self, p: PlannedPhase) -> int:
        """Epochs of planned phase ``p`` that need not be trained again."""
        if p.step in self.done_steps or (p.step, p.name) in (self.finished_phases or []):
            return p.epochs
        if self.state and self.state["step"] == p.step and self.state["phase"] == p.name:
            return min(p.epochs, self.state["epoch"])
        return 0

    @property
    def fresh(self) -> bool:
        """True when nothing of an earlier run is there."""
        return not (self.done_steps or self.complete or self.state or self.finished_phases or self.growth_state)


def find_resume(seed_dir, cfg: TrainConfig, n_sets: Optional[int] = None) -> Resume:
    """Read what an earlier run of ``cfg`` left in ``seed_dir`` (nothing is modified)."""
    d = Path(seed_dir)
    metrics = _json(d / "metrics.json")
    listed = sorted(int(e["step"]) for e in metrics.get("steps", []) if isinstance(e, dict) and "step" in e)
    if cfg.method in METHODS:
        done = [k for k in listed if (d / f"step{k}.safetensors").exists()]
        complete = all(k in done for k in range(1, cfg.steps + 1))
    else:
        complete = bool(listed) and (d / "step1.safetensors").exists()
        done = sorted(int(k) for k in _json(d / "progress.json").get("steps", {}))  # sharing / class-finetune
    finished = []
    for f in (d / ".work").glob("step*_*.safetensors"):
        head, _, name = f.stem.partition("_")
        if head[4:].isdigit():
            finished.append((int(head[4:]), name))
    growth = None
    if cfg.method == "growth" and (d / ".work" / "growth_state.pt").is_file():
        ex = checkpoint.peek_training_state(d / ".work" / "growth_state.pt")
        if "phase" in ex:
            growth = {"phase": int(ex["phase"]), "epoch": len(ex.get("curve", []))}
    state = None if complete else resume_point(d)
    if state is not None and (state["step"] in done or (state["step"], state["phase"]) in finished):
        state = None  # left by a phase that has finished since: the trainer ignores it too
    return Resume(done, complete, state, sorted(finished), growth)


def _json(path: Path) -> Dict:
    """A JSON object file, or ``{}`` when it is missing or not an object (errors are the run's to report)."""
    if not path.is_file():
        return {}
    try:
        obj = checkpoint.read_json(path)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def resume_line(seed: int, seed_dir, r: Resume, plan: Sequence[PlannedPhase]) -> Optional[str]:
    """``seed S: resuming at step K (PHASE), epoch E of N`` / ``seed S: already complete ...``; None for a fresh run."""
    if r.fresh:
        return None
    if r.complete:
        return (f"seed {seed}: already complete ({Path(seed_dir) / 'metrics.json'}); nothing to train "
                f"(use another --out, or delete the folder, to train again)")
    if r.growth_state is not None:
        g = r.growth_state
        return f"seed {seed}: resuming at growth phase {g['phase'] + 1}, epoch {g['epoch'] + 1}"
    done = f" (steps {_ranges(r.done_steps)} done earlier)" if r.done_steps else ""
    if r.state is not None:
        epochs = next((p.epochs for p in plan if p.step == r.state["step"] and p.name == r.state["phase"]), None)
        e = r.state["epoch"] + 1
        of = f" of {epochs}" if epochs else ""
        if epochs is not None and e > epochs:  # the phase's epochs are all done: only its output is left
            return f"seed {seed}: resuming at step {r.state['step']} ({r.state['phase']}), after its last epoch{done}"
        return f"seed {seed}: resuming at step {r.state['step']} ({r.state['phase']}), epoch {e}{of}{done}"
    pending = [k for k in sorted({p.step for p in plan}) if k not in r.done_steps]
    if pending and all(r.epochs_done(p) >= p.epochs for p in plan if p.step == pending[0]):
        # killed after the step's last phase, before its result was written (e.g. during the test evaluation)
        return (f"seed {seed}: resuming at step {pending[0]}: its training is done, only its evaluation and "
                f"checkpoint are left{done}")
    todo = [p for p in plan if r.epochs_done(p) < p.epochs]
    if todo:
        return f"seed {seed}: resuming at step {todo[0].step} ({todo[0].name}), epoch 1 of {todo[0].epochs}{done}"
    nxt = max(r.done_steps, default=0) + 1
    return f"seed {seed}: resuming at step {nxt}, epoch 1{done}"


def _ranges(ks: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    out: List[List[int]] = []
    for k in sorted(ks):
        if out and out[-1][1] + 1 == k:
            out[-1][1] = k
        else:
            out.append([k, k])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def interrupted_line(out: Path, seed: Optional[int]) -> str:
    """The one line printed on Ctrl-C: where the state is, and that the same command resumes."""
    if seed is None:
        return (f"interrupted before training started (nothing new was written to {out}); "
                f"run the same command again to start or resume")
    where = out / f"seed{seed}"
    return (f"interrupted; finished epochs and steps are saved in {where} (resume state in {where / '.work'}); "
            f"run the same command again to resume")


# --------------------------------------------------------------------------- banner
def banner(cfg: TrainConfig, data: ImageData, args: argparse.Namespace, out: Path, device: torch.device,
           amp: Optional[torch.dtype], plan: Sequence[PlannedPhase]) -> List[str]:
    """The lines printed when ``filtersurgery run`` starts (no estimate: see :func:`estimate_line`)."""
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, str(amp))
    shape = f"{data.in_chans}x{data.size}x{data.size}"
    lines = [f"filtersurgery run: method {cfg.method}, model {cfg.model}, seeds {' '.join(map(str, args.seeds))}",
             f"  device   {device} (amp {amp_name}{', channels_last' if cfg.channels_last else ''})",
             f"  data     {data.name} from {data.source or '?'}: {data.num_classes} classes, {shape}, "
             f"{len(data.train_y)} train / {len(data.test_y)} test images"]
    if plan:
        parts: Dict[int, PlannedPhase] = {}
        for p in plan:
            parts.setdefault(p.step, p)
        sizes = sorted({(p.train_images, p.val_images) for p in plan})
        what = "class set" if cfg.method in ("sharing", "class-finetune") else (
            "part" if cfg.method in METHODS else "data set")
        size_txt = ", ".join(f"{a} train + {b} val" for a, b in sizes[:4])
        sub = f" (--subset {cfg.subset})" if cfg.subset else ""
        lines.append(f"  images   per {what}: {size_txt}{sub}")
        batches = sorted({p.batches for p in plan})
        cap = f", capped by --max-batches {cfg.max_batches}" if cfg.max_batches else ""
        lines.append(f"  batches  {'/'.join(map(str, batches))} per epoch (batch size {cfg.batch_size}{cap})")
        steps = {}
        for p in plan:
            steps.setdefault(p.step, []).append(p.name)
        sched = " | ".join("+".join(v) for v in steps.values())
        lines.append(f"  epochs   {cfg.epochs} per phase; {len(steps)} step(s): {sched}")
        few = few_steps_line(plan)
        if few:
            lines.append(few)
    else:  # growth: one data set, the number of epochs per stage is decided while training
        n_train, n_val = _part_sizes(data.train_y, 1, cfg, args.seeds[0])[0]
        sub = f" (--subset {cfg.subset})" if cfg.subset else ""
        cap = f", capped by --max-batches {cfg.max_batches}" if cfg.max_batches else ""
        lines.append(f"  images   {n_train} train + {n_val} val{sub}")
        lines.append(f"  batches  {batches_per_epoch(n_train, cfg)} per epoch (batch size {cfg.batch_size}{cap})")
        lines.append(f"  epochs   at most {cfg.epochs} per stage (the growth rule decides)")
    lines.append(f"  output   {out}")
    return lines


# fewer batches per epoch or optimizer steps per phase than this and a phase trains too little to mean much:
# step 1 of the demo (cifar:resnet8, 1300 images, 6 epochs, seed 0) reaches 71.8% test accuracy with 20 batches
# of 64 per epoch and 51.3% with 5 batches of 256 (the same images and epochs: 120 vs 30 optimizer steps)
MIN_BATCHES_PER_EPOCH, MIN_STEPS_PER_PHASE = 10, 50


def few_steps_line(plan: Sequence[PlannedPhase]) -> Optional[str]:
    """``  warning  ...`` when a planned phase has fewer than :data:`MIN_BATCHES_PER_EPOCH` batches per epoch
    or :data:`MIN_STEPS_PER_PHASE` optimizer steps in all (the first such phase is named); else None."""
    short = [p for p in plan if p.batches < MIN_BATCHES_PER_EPOCH or p.batches * p.epochs < MIN_STEPS_PER_PHASE]
    if not short:
        return None
    p = short[0]
    return (f"  warning  step {p.step} {p.name} has {p.batches} batches per epoch, {p.batches * p.epochs} optimizer "
            f"steps in all ({len(short)} of {len(plan)} phases are this short): too few to train much (fewer than "
            f"{MIN_BATCHES_PER_EPOCH} per epoch or {MIN_STEPS_PER_PHASE} per phase); use more images (--subset), a "
            f"smaller --batch-size or more --epochs")


def estimate_line(plan: Sequence[PlannedPhase], sec_per_batch: float, cfg: TrainConfig, data: ImageData,
                  device: torch.device, resumes: Sequence[Resume] = ()) -> str:
    """``  estimate about 12 min (...)``: the time left over the seeds of ``resumes`` and how it was estimated."""
    how = (f"{sec_per_batch:.3g} s per batch of {cfg.batch_size} timed on {device}"
           + (", measured on 32-image batches and scaled" if device.type != "cuda" and cfg.batch_size > 32 else ""))
    if not plan:
        n_train = _part_sizes(data.train_y, 1, cfg, 0)[0][0]
        epoch = format_duration(batches_per_epoch(n_train, cfg) * sec_per_batch)
        return f"  estimate about {epoch} per epoch of the whole network ({how}); the number of epochs is decided while training"
    runs = list(resumes) or [None]
    sec = sum(estimate_seconds(plan, sec_per_batch, cfg, len(data.test_y), skip=r) for r in runs)
    left = " left" if any(r is not None and not r.fresh for r in runs) else ""
    per = f" for {len(runs)} seeds" if len(runs) > 1 else ""
    return f"  estimate about {format_duration(sec)}{left}{per} ({how}; training and validation, a lower bound)"
