"""``TrainConfig``: what every run needs, whatever the method (model, data, epochs, optimizer, runtime).

A method's own settings live in its options dataclass: the multi-step framework's in
``MultiStepConfig`` (``methods/multistep/config.py``), each single-run method's in the one it
registers (``engine/registry.py``). A field's :func:`~filtersurgery.engine.registry.option`
metadata names its ``filtersurgery run`` flag and help (the command line is built from it);
``resume=True`` marks the settings that must match for a re-run to resume into an existing
run folder (:func:`resume_keys`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import torch

from filtersurgery.engine.registry import MULTI_STEP_METHODS, SINGLE_RUN_METHODS, option, resume_fields
from filtersurgery.models.user import ModelSpec, check_model_spec, model_id

__all__ = ["TrainConfig", "resume_keys", "METHODS", "AMP_MODES", "MODEL_HELP", "DATA_HELP"]

# the multi-step methods: a live view of the plans registered by methods/multistep (framework, finetune,
# bst, dml, lwm, joint, shrink-perturb, dash); single-run methods register themselves (engine/registry.py)
METHODS = MULTI_STEP_METHODS
MODEL_HELP = ("timm:NAME, torchvision:NAME, cifar:resnetDEPTH (CIFAR-style ResNet, DEPTH = 6n+2, e.g. "
              "cifar:resnet20) or a bare timm NAME; random weights")
DATA_HELP = "fashion-mnist | cifar100 | imagefolder:PATH (PATH/train/CLASS/*, PATH/val/CLASS/*) | demo"
AMP_MODES = ("auto", "bf16", "fp16", "none")


def _method_help() -> str:
    """``--method``: every registered method, read when the parser is built."""
    return f"one of {', '.join(METHODS + tuple(SINGLE_RUN_METHODS))} (default %(default)s)"


def _lr_help() -> str:
    """``--lr``: what the learning rate means for each kind of method."""
    from filtersurgery.engine.registry import training_lr_methods

    d = TrainConfig.scratch_lr
    return (f"learning rate on new data: finetune, AOD, DML, LwM, shrink-perturb, dash (default 1e-2; "
            f"--recipe paper: 1e-3), sharing branches, class-finetune (default 1e-3); step 1, joint and base "
            f"networks train at {d}; for {', '.join(training_lr_methods())}: the training lr (default {d})")


@dataclass
class TrainConfig:
    """Everything a run needs, whatever the method; the method's own settings are its options dataclass."""

    # a name, or (Python API) an nn.Module or a zero-argument function returning one (models/user.py)
    model: ModelSpec = option("timm:resnet18", flag="--model", help=f"{MODEL_HELP} (default %(default)s)", type=str,
                              resume=True)
    data: str = option("fashion-mnist", flag="--data", help=f"{DATA_HELP} (default %(default)s)", resume=True)
    data_root: Optional[str] = option(None, flag="--data-root",
                                      help="folder holding the dataset files (docs/data.md: search order)")
    download: bool = option(False, flag="--download",
                            help="let torchvision download the dataset where the network allows")
    split: str = option("multi", flag="--split", choices=("single", "multi"), resume=True,  # "single": 1:1
                        help="multi: --steps equal parts; single: 1:1, 2 steps (default %(default)s)")
    steps: int = option(4, flag="--steps", resume=True,
                        help="number of steps/data parts (default 4 multi, 2 single)")
    method: str = option("framework", flag="--method", help=_method_help, resume=True)
    epochs: int = option(30, flag="--epochs", help="epochs per phase (default %(default)s)",  # SST and AOD each
                         resume=True)
    step1_epochs: Optional[int] = option(None, flag="--step1-epochs", resume=True,  # None: ``epochs``
                                         help="epochs of step 1 (Data1 from scratch; default --epochs)")
    batch_size: int = option(256, flag="--batch-size", resume=True,
                             help="images per batch (per process under torchrun) (default %(default)s)")
    lr: Optional[float] = option(None, flag="--lr", help=_lr_help, resume=True)  # new-data lr (step_lr, new_lr)
    scratch_lr: float = 0.1  # step 1 and joint
    momentum: float = 0.9
    weight_decay: float = 5e-4
    subset: Optional[int] = option(None, flag="--subset", resume=True,  # training images per part
                                   help="N training images per data part (quick runs)")
    image_size: Optional[int] = option(  # image folders only (default: the images' own size, else 224)
        None, flag="--image-size", metavar="PIXELS", resume=True,
        help="imagefolder only: decode images to PIXELS x PIXELS (default: the images' own size when "
             "they all share one, else 224)")
    val_fraction: float = 0.1
    # runtime
    device: str = option("auto", flag="--device", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    amp: str = option("auto", flag="--amp", choices=AMP_MODES,  # "auto": bf16 on CUDA, none on CPU
                      help="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler "
                           "(default %(default)s)")
    channels_last: bool = option(False, flag="--channels-last", help="train in the channels_last memory format")
    progress: bool = option(True, flag="--no-progress", dest="progress", help="no tqdm bars")
    max_batches: Optional[int] = option(None, flag="--max-batches", resume=True,  # cap batches per epoch
                                        help="cap batches per epoch (smoke tests)")
    # write the resumable state at most every this many seconds (0: after every epoch); the
    # epochs.csv rows of unsaved epochs are held back with it, so a kill never duplicates a row
    state_every: float = 0.0

    def validate(self) -> None:
        """One-line ValueError naming the bad field and its allowed range (the first bad field, in field order)."""
        for check in (self._check_method, self._check_counts, self._check_data, self._check_runtime,
                      self._check_lrs):
            check()

    def record(self) -> Dict[str, Any]:
        """The settings as a JSON-ready dict (``metrics.json``'s ``config``): a user model is recorded as
        ``user:CLASS:FINGERPRINT`` (:func:`~filtersurgery.models.user.model_id`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {"model": model_id(self.model), **copy.deepcopy(out)}

    def _check_method(self) -> None:
        """``model``, ``method`` (multi-step or registered single-run), ``split`` and ``steps``."""
        check_model_spec(self.model)
        if self.method not in METHODS and self.method not in SINGLE_RUN_METHODS:
            allowed = ", ".join(METHODS + tuple(SINGLE_RUN_METHODS))
            raise ValueError(f"method: must be one of {allowed}, got {self.method!r}")
        if self.split not in ("single", "multi"):
            raise ValueError(f"split: must be 'single' or 'multi', got {self.split!r}")
        if self.method not in SINGLE_RUN_METHODS and self.steps < 2:  # single-run: one data set, no steps
            raise ValueError(f"steps: must be >= 2 (step 1 trains Data1, later steps add data), got {self.steps}")
        if self.split == "single" and self.steps != 2:
            raise ValueError(f"steps: --split single means exactly 2 steps (1:1), got {self.steps}")

    def _check_counts(self) -> None:
        """``epochs``, ``step1_epochs``, ``batch_size``."""
        if self.epochs <= 0:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.step1_epochs is not None and self.step1_epochs <= 0:
            raise ValueError(f"step1_epochs: must be None or >= 1, got {self.step1_epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def _check_data(self) -> None:
        """``val_fraction``, ``image_size``, ``subset``."""
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size: must be an integer >= 1 (pixels), got {self.image_size!r}")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"subset: must be >= 1 images per part, got {self.subset}")

    def _check_runtime(self) -> None:
        """``amp``, ``state_every``, ``max_batches``, ``device``."""
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: must be one of auto, bf16, fp16, none, got {self.amp!r}")
        if not (math.isfinite(self.state_every) and self.state_every >= 0):
            raise ValueError(f"state_every: must be a finite number of seconds >= 0, got {self.state_every}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches: must be None or >= 1, got {self.max_batches}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None

    def _check_lrs(self) -> None:
        """``lr``, ``scratch_lr``: None (where allowed) or > 0."""
        for name in ("lr", "scratch_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}: must be > 0, got {v}")

    @property
    def new_lr(self) -> float:
        """The learning rate of sharing branches and class fine-tuning (``lr``, default 1e-3)."""
        return 1e-3 if self.lr is None else self.lr


def resume_keys(options: Optional[type] = None) -> List[str]:
    """The settings that must match for a re-run to resume into an existing run folder: the fields of
    :class:`TrainConfig` (and of the method's ``options`` dataclass) declared with ``option(..., resume=True)``
    (``model`` compares names or user-model ids)."""
    return resume_fields(TrainConfig) + (resume_fields(options) if options is not None else [])
