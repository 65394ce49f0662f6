"""Phases and phase kinds: what one phase of a step trains, and how.

A :class:`Phase` is one entry of a step's plan (name, data parts, lr, epochs). Its ``kind``
names a :class:`PhaseKind`, one object that owns everything kind-specific: which models the
phase trains, what its loss needs, the loss of one batch, its training FLOPs, its per-epoch
log items and what it leaves behind. ``run_phase`` (``engine/trainer.py``) is the one loop
for every kind and calls the kind in this order::

    warm start        Phase.warm_start (a registered WarmStart), once, not on a resume
    kind.students     the trained models, *before* the phase's RNG seed (a new model re-seeds
                      the global RNG; deep copies and Dri draws come from the incoming model)
    (seed)            the phase's global RNG seed and augmentation generator
    kind.set_up       teacher, frozen parameters, sparsifier, whatever the loss needs
    kind.batch_loss   per batch
    kind.after_batches per epoch, after its batches, before validation
    kind.epoch_end    per epoch, after validation: log items, teacher updates
    kind.finish       rank 0, before the phase's output model is written

A new phase kind is one subclass of :class:`PhaseKind` with a ``name``, registered with
``@register_phase_kind``. The kinds of plain training (``scratch``, ``scratch2``,
``finetune``) live here; the multi-step framework's (``sst``, ``sst_msl``, ``aod``, ``dml``,
``lwm``) and the warm starts (``shrink-perturb``, ``dash``) in
``filtersurgery/methods/multistep.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.data import augment

if TYPE_CHECKING:  # pragma: no cover
    from filtersurgery.engine.trainer import Run, TrainConfig


@dataclass
class Phase:
    """One training phase of a step: which models train, on which data, with what loss."""

    name: str
    kind: str  # the name of a registered PhaseKind: scratch | scratch2 | finetune | sst | sst_msl | aod | dml | lwm
    parts: List[int]  # data parts (0-based) whose train/val split is used
    lr: float
    epochs: int
    selective: bool = True
    # called after every epoch's batches, before the resumable state is saved:
    # ``epoch_end(models, epoch, lr) -> dict | None`` (the dict's items go to the log row).
    # Single-run methods use it for per-epoch surgery (kernel reactivation, weight
    # evolution, filter grafting).
    epoch_end: Optional[Callable[[List[nn.Module], int, float], Optional[Dict]]] = None
    # a warm-start operation applied to the incoming model before the phase's first epoch
    # (the name of a registered WarmStart: "shrink-perturb" or "dash")
    warm_start: Optional[str] = None


@dataclass
class PhaseState:
    """What a phase trains and what its loss needs (built by ``PhaseKind.students`` and ``set_up``).

    ``run_phase`` saves the students, the teacher, the sparsifier and ``teacher_val`` in the
    resumable state and restores them on a resume; ``frozen`` parameters get their gradients
    back when the phase ends.
    """

    students: List[nn.Module]  # the trained models (state keys ``s0.``, ``s1.``)
    teacher: Optional[nn.Module] = None  # a frozen model the loss compares with (state keys ``t.``)
    # SST / BST's gradient hook (ops.sparsity.Sparsifier): ``set_epoch(epoch, epochs)`` before every
    # epoch, ``step()`` after the gradients are unscaled, ``state_dict()`` in the resumable state
    sparsifier: Any = None
    frozen: List[nn.Parameter] = field(default_factory=list)  # trained models' parameters kept fixed
    teacher_val: Optional[float] = None  # MSL: the teacher's validation accuracy (kept across a resume)
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else the batch loss needs


class PhaseKind:
    """One kind of phase: its models, set-up, batch loss, FLOPs and hooks (module docstring).

    Subclasses set ``name`` and override what differs; ``@register_phase_kind`` makes them
    available to ``Phase(kind=name)``.
    """

    name: str = ""

    def models(self, cfg: "TrainConfig") -> int:
        """How many models the phase trains (and validates after every epoch)."""
        return 1

    def flops_per_image(self, fwd: int, students: int) -> int:
        """Training FLOPs per image and epoch, from ``fwd`` FLOPs of one forward pass: 3x forward
        per trained model-image (forward + backward), 1x per frozen-teacher image. ``students``:
        the number of models the phase trains where the kind's cost depends on it (AOD)."""
        return 3 * fwd

    def cost_factor(self, students: int) -> float:
        """Training FLOPs per image relative to plain cross-entropy training of one model."""
        return self.flops_per_image(1, students) / 3

    def students(self, run: "Run", step: int, phase: Phase, model: nn.Module) -> List[nn.Module]:
        """The models the phase trains, made from the incoming ``model`` (before the phase's seed)."""
        raise NotImplementedError(f"phase kind {self.name!r}: students() is not implemented")

    def set_up(self, run: "Run", step: int, phase: Phase, state: PhaseState, batches: int) -> None:
        """Fill ``state`` with what the loss needs (after the phase's seed); ``batches`` per epoch."""

    def batch_loss(self, run: "Run", state: PhaseState, nets: List[nn.Module], xb: torch.Tensor,
                   yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The loss of one uint8 batch ``xb`` (labels ``yb``); ``nets`` are the students as
        trained (wrapped in DistributedDataParallel under torchrun); augmentations draw from ``gen``."""
        raise NotImplementedError(f"phase kind {self.name!r}: batch_loss() is not implemented")

    def after_batches(self, run: "Run", phase: Phase, state: PhaseState, epoch: int) -> None:
        """After every epoch's batches, before the models are validated (e.g. re-estimate BN statistics)."""

    def epoch_end(self, run: "Run", phase: Phase, state: PhaseState, epoch: int, vals: List[float],
                  row: Dict[str, Any]) -> None:
        """After every epoch's validation (``vals``: the students' accuracies): add log items to
        ``row`` (an ``epochs.csv`` row), update a teacher, ..."""

    def finish(self, run: "Run", step: int, phase: Phase, state: PhaseState) -> None:
        """Write what the phase leaves besides its output model (rank 0, before that model is written)."""


class WarmStart:
    """A one-off operation on the incoming model before a phase's first epoch (``Phase.warm_start``).

    Subclasses set ``name``, implement ``apply`` and register with ``@register_warm_start``.
    """

    name: str = ""

    def apply(self, run: "Run", step: int, phase: Phase, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Change ``model`` in place; ``x``, ``y``: the phase's uint8 training images and labels."""
        raise NotImplementedError(f"warm start {self.name!r}: apply() is not implemented")

    def flops(self, fwd: int, n_images: int) -> int:
        """FLOPs of the operation on ``n_images`` training images (``fwd``: one forward pass)."""
        return 0


# the tables survive importlib.reload of this module (the kinds registered by other modules stay, and
# modules that imported the tables by name keep seeing the same objects)
PHASE_KINDS: Dict[str, PhaseKind] = globals().get("PHASE_KINDS", {})
WARM_STARTS: Dict[str, WarmStart] = globals().get("WARM_STARTS", {})


def _register(table: Dict[str, Any], cls: type, what: str) -> type:
    if not cls.name:
        raise ValueError(f"name: {cls.__name__} needs a non-empty {what} name")
    old = table.get(cls.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"name: {what} {cls.name!r} is registered already by {type(old).__qualname__}")
    table[cls.name] = cls()
    return cls


def register_phase_kind(cls: type) -> type:
    """Class decorator: make the :class:`PhaseKind` subclass ``cls`` the kind named ``cls.name``."""
    return _register(PHASE_KINDS, cls, "phase kind")


def register_warm_start(cls: type) -> type:
    """Class decorator: make the :class:`WarmStart` subclass ``cls`` the warm start named ``cls.name``."""
    return _register(WARM_STARTS, cls, "warm start")


def phase_kind(name: str) -> PhaseKind:
    """The registered :class:`PhaseKind` named ``name`` (one-line ``ValueError`` naming ``kind``)."""
    if name not in PHASE_KINDS:
        raise ValueError(f"kind: must be a registered phase kind ({', '.join(PHASE_KINDS)}), got {name!r}")
    return PHASE_KINDS[name]


def warm_start_op(name: str) -> WarmStart:
    """The registered :class:`WarmStart` named ``name`` (one-line ``ValueError`` naming ``warm_start``)."""
    if name not in WARM_STARTS:
        raise ValueError(f"warm_start: must be a registered warm start ({', '.join(WARM_STARTS)}), got {name!r}")
    return WARM_STARTS[name]


def phase_flops(phase: Phase, fwd: int, n_images: int, students: int) -> int:
    """Training FLOPs of a phase: 3x forward per trained model-image, 1x per frozen-teacher image
    (``PhaseKind.flops_per_image``), plus its warm start's one-off cost (DASH: one gradient pass)."""
    per_img = phase_kind(phase.kind).flops_per_image(fwd, students)
    once = warm_start_op(phase.warm_start).flops(fwd, n_images) if phase.warm_start is not None else 0
    return per_img * n_images * phase.epochs + once


# --------------------------------------------------------------------------- helpers of batch losses
def memory_format(run: "Run") -> torch.memory_format:
    """The run's memory format (``channels_last`` with ``cfg.channels_last``)."""
    return torch.channels_last if run.cfg.channels_last else torch.contiguous_format


def normalized(run: "Run", x: torch.Tensor) -> torch.Tensor:
    """Images ``x`` normalized with the data's mean/std, in the run's memory format."""
    return augment.normalize(x, run.data.mean, run.data.std).contiguous(memory_format=memory_format(run))


def augmented(run: "Run", xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random crop + flip of the uint8 batch ``xb`` (drawn from ``gen``), normalized."""
    return normalized(run, augment.random_crop_flip(xb, generator=gen))


def autocast(run: "Run"):
    """The run's autocast context (``cfg.amp``; disabled without AMP)."""
    return torch.autocast(device_type=run.device.type, dtype=run.amp, enabled=run.amp is not None)


def cross_entropy_batch(run: "Run", net: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy of ``net`` on one random crop + flip of the batch, under the run's autocast
    (fp32 logits): the loss of plain training (phase kinds ``scratch``, ``finetune``; growth's stages)."""
    x = augmented(run, xb, gen)
    with autocast(run):
        return F.cross_entropy(net(x).float(), yb)


# --------------------------------------------------------------------------- plain training
class CrossEntropy(PhaseKind):
    """Cross-entropy of one model on one augmented view of each batch."""

    def batch_loss(self, run, state, nets, xb, yb, gen):
        return cross_entropy_batch(run, nets[0], xb, yb, gen)


@register_phase_kind
class Scratch(CrossEntropy):
    """A freshly initialized model (the run's seed), trained with cross-entropy."""

    name = "scratch"

    def students(self, run, step, phase, model):
        return [run.new_model()]


@register_phase_kind
class Scratch2(PhaseKind):
    """Two independently initialized models, each trained with cross-entropy (filter grafting)."""

    name = "scratch2"

    def models(self, cfg):
        return 2

    def flops_per_image(self, fwd, students):
        return 2 * 3 * fwd

    def students(self, run, step, phase, model):
        return [run.new_model(), run.new_model(seed_offset=1)]

    def batch_loss(self, run, state, nets, xb, yb, gen):
        x = augmented(run, xb, gen)
        with autocast(run):
            return sum(F.cross_entropy(s(x).float(), yb) for s in nets)


@register_phase_kind
class FineTune(CrossEntropy):
    """The incoming model, trained further with cross-entropy."""

    name = "finetune"

    def students(self, run, step, phase, model):
        return [model]
