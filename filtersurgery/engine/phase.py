"""A phase is one object: what one training stage of a step trains, on which data, with which loss.

A step's plan is a list of :class:`Phase` objects (``FineTune("finetune", [1], lr=1e-2, epochs=30)``,
the multi-step framework's ``SST(...)``, ``AOD(...)``). The object owns everything about its
phase: its options (given to its constructor), its per-phase state (a teacher, a sparsifier,
frozen parameters), its set-up, the loss of one batch, what happens at an epoch's start and
end, its training FLOPs, the columns it adds to ``epochs.csv``, what it hands the next phase
(:meth:`Phase.finish` returns it, :meth:`Phase.receive` takes it) and its resumable state
(:meth:`Phase.state_dict`). The one loop around it, ``run_phase`` (``engine/trainer.py``), calls:

    warm start        Phase.warm_start (a WarmStart object), once, not on a resume
    students(ctx, m)  the trained models, made from the incoming model, *before* the phase's
                      RNG seed (a new model re-seeds the global RNG)
    (seed)            the phase's global RNG seed and augmentation generator
    set_up            teacher, frozen parameters, sparsifier, whatever the loss needs
    epoch_start       per epoch, before its batches (SST: SP_r and its targets)
    batch_loss        per batch; ``grad_hook`` (if not None) after the gradients are unscaled
    after_batches     per epoch, before validation (SST: re-estimate BN statistics)
    epoch_end         per epoch, after validation: log items (``columns``), teacher updates
    finish            the handoff to the next phase (SST: its norm scales), on every rank

A phase never sees the run: it gets a :class:`PhaseContext` with what it may use (the device,
AMP, the data's normalization, its own training and validation images, new models).
The plain kinds live here (:class:`Scratch`, :class:`Scratch2`, :class:`FineTune`); the
framework's in ``methods/multistep/phases.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.data import augment

__all__ = ["Phase", "PhaseContext", "WarmStart", "Scratch", "Scratch2", "FineTune", "csv_columns"]


@dataclass
class PhaseContext:
    """What a phase may use of the run that trains it (built by ``run_phase`` for one step's phase)."""

    step: int
    name: str  # the phase's name (seeds of its random streams)
    seed: int  # the run's seed
    device: torch.device
    amp: Optional[torch.dtype]  # autocast dtype (None: fp32)
    channels_last: bool
    batch_size: int
    mean: Sequence[float]  # the data's normalization
    std: Sequence[float]
    train_images: Callable[[], Tuple[torch.Tensor, torch.Tensor]]  # the phase's uint8 training images, labels
    accuracy: Callable[[nn.Module], float]  # validation accuracy (%) on the phase's parts, fp32
    example: Callable[[int], torch.Tensor]  # n normalized validation images of the phase's parts, on the device
    new_model: Callable[..., nn.Module]  # ``new_model(seed_offset=0, fresh=False)``: the run's model, seeded
    # accuracy (%) on the phase's un-augmented training images, fp32 (None: not available)
    train_accuracy: Optional[Callable[[nn.Module], float]] = None

    @property
    def memory_format(self) -> torch.memory_format:
        """The run's memory format (``channels_last`` with ``TrainConfig.channels_last``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``x`` normalized with the data's mean/std, in the run's memory format."""
        return augment.normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def augmented(self, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random crop + flip of the uint8 batch ``xb`` (drawn from ``gen``), normalized."""
        return self.normalized(augment.random_crop_flip(xb, generator=gen))

    def autocast(self):
        """The run's autocast context (disabled without AMP)."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def cross_entropy(self, net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Cross-entropy of ``net`` on one random crop + flip of the batch, under autocast (fp32 logits): the
        loss of plain training (``Scratch``, ``FineTune``; growth's stages)."""
        x = self.augmented(xb, gen)
        with self.autocast():
            return F.cross_entropy(net(x).float(), yb)


# columns phase classes add to epochs.csv, in the order the classes are defined (the file's one header)
_COLUMNS: List[str] = []


def csv_columns() -> List[str]:
    """Every ``epochs.csv`` column a phase class declares (:attr:`Phase.columns`), in definition order."""
    return list(_COLUMNS)


class WarmStart:
    """A one-off operation on the incoming model before a phase's first epoch (``Phase.warm_start``)."""

    name: str = ""

    def apply(self, ctx: PhaseContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Change ``model`` in place; ``x``, ``y``: the phase's uint8 training images and labels."""
        raise NotImplementedError(f"warm start {type(self).__name__}: apply() is not implemented")

    def flops(self, fwd: int, n_images: int) -> int:
        """FLOPs of the operation on ``n_images`` training images (``fwd``: one forward pass)."""
        return 0


class Phase:
    """One training phase of a step (module docstring). Subclasses override what differs.

    ``name`` names the phase in logs and files (``stepK_NAME.safetensors``); ``parts`` are the
    data parts (0-based) whose training and validation splits it uses; ``lr`` and ``epochs`` its
    cosine schedule. ``callback(models, epoch, lr) -> dict | None`` runs after every epoch's
    batches (per-epoch surgery of the single-run methods: kernel reactivation, Weight
    Evolution, filter grafting); its items go to the row's ``extra``.
    """

    kind: str = ""  # what the phase does, in words for banners and docs (the class's own name when empty)
    columns: Tuple[str, ...] = ()  # the epochs.csv columns this kind adds (filled in epoch_end)
    grad_hook: Any = None  # called as grad_hook.step() after the gradients are unscaled (SST's sparsifier)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _COLUMNS.extend(c for c in cls.columns if c not in _COLUMNS)

    def __init__(self, name: str, parts: Sequence[int], lr: float, epochs: int,
                 warm_start: Optional[WarmStart] = None,
                 callback: Optional[Callable[[List[nn.Module], int, float], Optional[Dict]]] = None):
        self.name, self.parts, self.lr, self.epochs = name, list(parts), lr, epochs
        self.warm_start, self.callback = warm_start, callback
        self.frozen: List[nn.Parameter] = []  # trained models' parameters kept fixed during the phase

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, parts={self.parts}, lr={self.lr:g}, epochs={self.epochs})"

    # -- what it costs
    def models(self) -> int:
        """How many models the phase trains (and validates after every epoch)."""
        return 1

    def flops_per_image(self, fwd: int) -> int:
        """Training FLOPs per image and epoch from ``fwd`` FLOPs of one forward pass: 3x forward per trained
        model-image (forward + backward), 1x per frozen-teacher image."""
        return 3 * fwd

    def cost_factor(self) -> float:
        """Training FLOPs per image relative to plain cross-entropy training of one model."""
        return self.flops_per_image(1) / 3

    def flops(self, fwd: int, n_images: int) -> int:
        """Training FLOPs of the whole phase on ``n_images`` training images, its warm start included."""
        once = self.warm_start.flops(fwd, n_images) if self.warm_start is not None else 0
        return self.flops_per_image(fwd) * n_images * self.epochs + once

    # -- the hooks of run_phase, in call order
    def receive(self, handoff: Dict[str, torch.Tensor]) -> None:
        """Take what the step's previous phase handed over (:meth:`finish`); default: nothing."""

    def students(self, ctx: PhaseContext, model: nn.Module) -> List[nn.Module]:
        """The models the phase trains, made from the incoming ``model`` (before the phase's seed)."""
        raise NotImplementedError(f"phase {type(self).__name__}: students() is not implemented")

    def set_up(self, ctx: PhaseContext, students: List[nn.Module], batches: int) -> None:
        """Build what the loss needs (after the phase's seed); ``batches`` per epoch."""

    def epoch_start(self, ctx: PhaseContext, epoch: int) -> None:
        """Before the batches of ``epoch`` (0-based)."""

    def batch_loss(self, ctx: PhaseContext, nets: List[nn.Module], xb: torch.Tensor, yb: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        """The loss of one uint8 batch ``xb`` (labels ``yb``); ``nets`` are the students as trained (wrapped in
        DistributedDataParallel under torchrun); augmentations draw from ``gen``."""
        raise NotImplementedError(f"phase {type(self).__name__}: batch_loss() is not implemented")

    def after_batches(self, ctx: PhaseContext, students: List[nn.Module], epoch: int) -> None:
        """After every epoch's batches, before the students are validated."""

    def epoch_end(self, ctx: PhaseContext, students: List[nn.Module], epoch: int, vals: List[float],
                  row: Dict[str, Any]) -> None:
        """After every epoch's validation (``vals``: the students' accuracies): fill this phase's ``columns``
        of ``row``, update a teacher, ..."""

    def finish(self, ctx: PhaseContext, students: List[nn.Module]) -> Dict[str, torch.Tensor]:
        """What the next phase of the step receives (saved with this phase's output); default nothing."""
        return {}

    # -- resume
    def state_dict(self) -> Dict[str, Any]:
        """The phase's own resumable state (teacher weights, a sparsifier's schedule, ...)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`set_up`)."""


# --------------------------------------------------------------------------- plain training
class _CrossEntropy(Phase):
    """Cross-entropy of one model on one augmented view of each batch."""

    def batch_loss(self, ctx, nets, xb, yb, gen):
        return ctx.cross_entropy(nets[0], xb, yb, gen)


class Scratch(_CrossEntropy):
    """A freshly initialized model (the run's seed), trained with cross-entropy."""

    kind = "scratch"

    def students(self, ctx, model):
        return [ctx.new_model()]


class Scratch2(Phase):
    """Two independently initialized models, each trained with cross-entropy (filter grafting)."""

    kind = "scratch2"

    def models(self):
        return 2

    def flops_per_image(self, fwd):
        return 2 * 3 * fwd

    def students(self, ctx, model):
        return [ctx.new_model(), ctx.new_model(seed_offset=1)]

    def batch_loss(self, ctx, nets, xb, yb, gen):
        x = ctx.augmented(xb, gen)
        with ctx.autocast():
            return sum(F.cross_entropy(s(x).float(), yb) for s in nets)


class FineTune(_CrossEntropy):
    """The incoming model, trained further with cross-entropy."""

    kind = "finetune"

    def students(self, ctx, model):
        return [model]
